"""The SQLite delivery store: schema migrations, the delivery life cycle, dedupe, durability."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from proxy import errors
from proxy.delivery.sqlite import DB_NAME, DONE_RETENTION_S, MIGRATIONS, SCHEMA_VERSION, SqliteStore
from proxy.delivery.store import NewDelivery, Outcome

NOW = 1_700_000_000.0


def new(n: int = 0, **extra: object) -> NewDelivery:
    fields: dict[str, object] = {
        "kind": "policy",
        "source": "api.test",
        "method": "POST",
        "host": "api.test",
        "path_qs": f"/v1/things/{n}?q=secret",
        "headers": (("Idempotency-Key", f"key-{n}"), ("Content-Type", "application/json")),
        "body": f'{{"n": {n}}}'.encode(),
        "expires_at": NOW + 3600,
        "target": "https://api.test:443",
        **extra,
    }
    return NewDelivery(**fields)  # type: ignore[arg-type]


async def test_created_on_first_use_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "data" / "nested")
    await store.open()
    await store.close()
    connection = sqlite3.connect(tmp_path / "data" / "nested" / DB_NAME)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_an_older_schema_is_migrated_and_keeps_its_deliveries(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    old = sqlite3.connect(tmp_path / "data" / DB_NAME)
    for statement in MIGRATIONS[0]:  # what schema version 1 created
        old.execute(statement)
    old.execute("PRAGMA user_version = 1")
    old.execute(
        "INSERT INTO deliveries (id, kind, source, state, method, host, path_qs, target, headers, body,"
        " created_at, expires_at, next_attempt_at) VALUES ('old', 'policy', 'api.test', 'pending', 'POST',"
        " 'api.test', '/v1', 'https://api.test:443', '[]', x'', ?, ?, ?)",
        (NOW, NOW + 3600, NOW),
    )
    old.commit()
    old.close()

    store = SqliteStore(tmp_path / "data")
    await store.open()
    try:
        kept = await store.get("old")
        assert kept is not None
        assert kept.state == "pending"
        first = await store.enqueue(new(1, dedupe_key="evt_1", dedupe_window=60), NOW)  # needs version 2
        assert not first.duplicate
    finally:
        await store.close()
    assert sqlite3.connect(tmp_path / "data" / DB_NAME).execute("PRAGMA user_version").fetchone()[0] == 2


async def test_a_newer_schema_than_this_build_knows_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    newer = sqlite3.connect(tmp_path / "data" / DB_NAME)
    newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer.close()
    store = SqliteStore(tmp_path / "data")
    with pytest.raises(errors.StoreUnavailable, match="downgrade"):
        await store.open()
    await store.close()


async def test_enqueue_claim_record_done(store: SqliteStore) -> None:
    stored = await store.enqueue(new(1), NOW)

    claimed = await store.claim(NOW, 10, 60)

    assert [d.id for d in claimed] == [stored.id]
    delivery = claimed[0]
    assert delivery.body == b'{"n": 1}'
    assert delivery.headers == (("Idempotency-Key", "key-1"), ("Content-Type", "application/json"))
    assert await store.claim(NOW, 10, 60) == []  # leased
    await store.record(stored.id, Outcome("done", NOW + 1, 201))
    done = await store.get(stored.id)
    assert done is not None
    assert (done.state, done.attempts, done.last_status, done.finished_at) == ("done", 1, 201, NOW + 1)
    assert await store.counts() == {("api.test", "done"): 1}


async def test_a_failed_attempt_waits_until_its_next_attempt_time(store: SqliteStore) -> None:
    stored = await store.enqueue(new(), NOW)
    await store.claim(NOW, 10, 60)

    await store.record(stored.id, Outcome("pending", NOW, 503, None, next_attempt_at=NOW + 5))

    assert await store.claim(NOW + 4, 10, 60) == []
    assert await store.next_due() == NOW + 5
    again = await store.claim(NOW + 5, 10, 60)
    assert [(d.id, d.attempts, d.last_status) for d in again] == [(stored.id, 1, 503)]


async def test_an_unrecorded_claim_is_due_again_when_its_lease_ends_or_the_store_reopens(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "data")
    await store.open()
    stored = await store.enqueue(new(), NOW)
    assert len(await store.claim(NOW, 10, lease=30)) == 1
    assert await store.claim(NOW + 29, 10, 30) == []
    assert [d.id for d in await store.claim(NOW + 30, 10, 30)] == [stored.id]
    await store.close()  # as after kill -9: the claim was never recorded

    reopened = SqliteStore(tmp_path / "data")
    await reopened.open()
    try:
        assert [d.id for d in await reopened.claim(NOW + 31, 10, 30)] == [stored.id]
    finally:
        await reopened.close()


async def test_claims_come_oldest_due_first_up_to_the_limit(store: SqliteStore) -> None:
    ids = [(await store.enqueue(new(n), NOW + n)).id for n in range(3)]

    first = await store.claim(NOW + 10, 2, 60)
    rest = await store.claim(NOW + 10, 2, 60)

    assert [d.id for d in first] == ids[:2]
    assert [d.id for d in rest] == ids[2:]


async def test_dead_then_retry_makes_it_pending_with_fresh_attempts_and_ttl(store: SqliteStore) -> None:
    stored = await store.enqueue(new(expires_at=NOW + 100), NOW)
    await store.claim(NOW, 1, 60)
    await store.record(stored.id, Outcome("dead", NOW + 50, 503, "gave up"))
    assert [d.id for d in await store.list("dead", 10)] == [stored.id]

    retried = await store.retry(stored.id, NOW + 500)

    assert retried is not None
    assert (retried.state, retried.attempts, retried.next_attempt_at) == ("pending", 0, NOW + 500)
    assert retried.expires_at == NOW + 600  # the same ttl again, from now
    assert await store.retry(stored.id, NOW + 501) is None  # only dead ones
    assert [d.id for d in await store.claim(NOW + 500, 1, 60)] == [stored.id]


async def test_delete_forgets_a_delivery(store: SqliteStore) -> None:
    stored = await store.enqueue(new(), NOW)

    assert await store.delete(stored.id) is True

    assert await store.get(stored.id) is None
    assert await store.delete(stored.id) is False
    assert await store.claim(NOW, 10, 60) == []


async def test_a_redelivery_within_the_dedupe_window_gets_the_first_id(store: SqliteStore) -> None:
    first = await store.enqueue(new(1, kind="webhook", dedupe_key="evt_1", dedupe_window=60), NOW)
    again = await store.enqueue(new(2, kind="webhook", dedupe_key="evt_1", dedupe_window=60), NOW + 59)
    other_source = await store.enqueue(
        new(3, kind="webhook", source="/other", dedupe_key="evt_1", dedupe_window=60), NOW + 1
    )
    after_window = await store.enqueue(new(4, kind="webhook", dedupe_key="evt_1", dedupe_window=60), NOW + 60)

    assert not first.duplicate
    assert (again.id, again.duplicate) == (first.id, True)
    assert not other_source.duplicate
    assert not after_window.duplicate
    assert after_window.id != first.id
    assert len(await store.list(None, 10)) == 3  # the duplicate stored nothing


async def test_list_filters_by_state_newest_first(store: SqliteStore) -> None:
    older = await store.enqueue(new(1), NOW)
    newer = await store.enqueue(new(2), NOW + 1)
    done = await store.enqueue(new(3), NOW + 2)
    await store.claim(NOW + 2, 10, 60)
    await store.record(done.id, Outcome("done", NOW + 3, 200))

    assert [d.id for d in await store.list("pending", 10)] == [newer.id, older.id]
    assert [d.id for d in await store.list(None, 2)] == [done.id, newer.id]
    assert await store.counts() == {("api.test", "pending"): 2, ("api.test", "done"): 1}


async def test_purge_forgets_old_done_deliveries_and_expired_dedupe_keys(store: SqliteStore) -> None:
    done = await store.enqueue(new(1, dedupe_key="evt", dedupe_window=10), NOW)
    await store.claim(NOW, 10, 60)
    await store.record(done.id, Outcome("done", NOW, 200))

    assert await store.purge(NOW + DONE_RETENTION_S + 1) == 2

    assert await store.get(done.id) is None
    assert not (await store.enqueue(new(2, dedupe_key="evt", dedupe_window=10), NOW + 11)).duplicate


async def test_what_enqueue_returned_survives_a_reopen(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "data")
    await store.open()
    ids = [(await store.enqueue(new(n), NOW)).id for n in range(20)]
    await store.close()

    raw = sqlite3.connect(tmp_path / "data" / DB_NAME)  # another connection, as another process
    assert sorted(row[0] for row in raw.execute("SELECT id FROM deliveries")) == sorted(ids)


async def test_a_full_database_raises_store_unavailable_and_keeps_what_was_stored(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "data")
    await store.open()
    kept = (await store.enqueue(new(0), NOW)).id
    await store._call(lambda c: c.execute("PRAGMA max_page_count = 8"))  # SQLITE_FULL, as a full disk

    with pytest.raises(errors.StoreUnavailable, match="full"):
        await store.enqueue(new(1, body=b"x" * 64 * 1024), NOW)

    assert [d.id for d in await store.list(None, 10)] == [kept]
    await store.close()


async def test_a_closed_store_refuses_with_store_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "data")
    with pytest.raises(errors.StoreUnavailable):
        await store.enqueue(new(), NOW)
