"""The delivery store on SQLite (stdlib ``sqlite3``), in ``data_dir/deliveries.db``.

- One connection, owned by one thread of its own: the event loop never waits on disk, and
  SQLite sees a single writer.
- WAL journal with ``synchronous=FULL``: a commit has been fsynced when it returns, so an
  acknowledged request survives kill -9 of Outrigger and a crash of the node.
- Group commit: every job waiting when the thread comes round runs in one transaction and one
  fsync, so 50 concurrent requests cost a few fsyncs, not 50. Each job's result is handed back
  only after that commit; when the commit (or a job) fails, the batch is rolled back and each job
  is retried alone, so one failure never takes a neighbour with it and nothing half-written stays.
- Errors SQLite reports for the disk (full, read-only, I/O) become `errors.StoreUnavailable`.
- Claims are leases held in memory (one process owns the file): claiming writes nothing, so a
  full disk still lets the worker deliver what it holds, and a restart (or kill -9) releases
  every claim by itself.
- Schema versioned by ``PRAGMA user_version``; `MIGRATIONS` run in order on open.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import queue
import sqlite3
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from proxy import errors
from proxy.delivery.store import STATES, Delivery, Enqueued, NewDelivery, Outcome, State

log = logging.getLogger("outrigger.delivery.store")

T = TypeVar("T")

DB_NAME = "deliveries.db"
BATCH_MAX = 512
"""Jobs per transaction (one fsync): bounds the latency of the first job in a burst."""
DONE_RETENTION_S = 24 * 3600.0
"""A done delivery (status kept for inspection) is forgotten this long after it finished."""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: deliveries and the worker's index of due ones
        """CREATE TABLE deliveries (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            source TEXT NOT NULL,
            state TEXT NOT NULL,
            method TEXT NOT NULL,
            host TEXT NOT NULL,
            path_qs TEXT NOT NULL,
            target TEXT NOT NULL,
            headers TEXT NOT NULL,
            body BLOB NOT NULL,
            traceparent TEXT,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            next_attempt_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_status INTEGER,
            last_error TEXT,
            last_attempt_at REAL,
            finished_at REAL
        )""",
        "CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at)",
        "CREATE INDEX deliveries_created ON deliveries (created_at)",
    ),
    (  # 2: webhook dedupe: (source, event id) -> the delivery stored first, for a window
        """CREATE TABLE dedupe (
            source TEXT NOT NULL,
            key TEXT NOT NULL,
            delivery_id TEXT NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (source, key)
        )""",
        "CREATE INDEX dedupe_expiry ON dedupe (expires_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_FIELDS = tuple(f.name for f in dataclasses.fields(Delivery) if f.name not in ("headers", "body"))
"""`Delivery`'s fields bar the request itself: each is the column of the same name."""
_COLUMNS = ", ".join(_FIELDS)


class _Job:
    __slots__ = ("after_commit", "fn", "future")

    def __init__(
        self, fn: Callable[[sqlite3.Connection], Any], after_commit: Callable[[Any], None] | None
    ) -> None:
        self.fn = fn
        self.after_commit = after_commit
        """Runs with the result on the store's thread once the transaction is committed (so a
        rolled-back job leaves no trace in memory either)."""
        self.future: Future[Any] = Future()


def migrate(connection: sqlite3.Connection) -> int:
    """Bring the schema to `SCHEMA_VERSION`, one migration per transaction; returns the version
    found. A newer schema than this build knows (a downgrade) is refused."""
    found: int = connection.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise errors.StoreUnavailable(
            f"the delivery store has schema version {found}; this Outrigger knows up to"
            f" {SCHEMA_VERSION} (downgrade?)"
        )
    for version in range(found + 1, SCHEMA_VERSION + 1):
        connection.execute("BEGIN")
        try:
            for statement in MIGRATIONS[version - 1]:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {version}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    return found


def connect(path: Path) -> sqlite3.Connection:
    """The store's connection: WAL, fsync on every commit, autocommit (transactions by hand)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        connection.execute("PRAGMA busy_timeout = 5000")
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise errors.StoreUnavailable(f"{path}: cannot use WAL journal (got {mode})")
        connection.execute("PRAGMA synchronous = FULL")
    except BaseException:
        connection.close()
        raise
    return connection


def _unavailable(error: BaseException, path: Path) -> errors.OutriggerError:
    if isinstance(error, errors.OutriggerError):
        return error
    return errors.StoreUnavailable(f"delivery store {path}: {error}")


class SqliteStore:
    """`DeliveryStore` on SQLite; see the module docstring. `open` first, `close` at the end."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / DB_NAME
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._connection: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._leases: dict[str, float] = {}
        """Claimed delivery id -> lease end; touched only on the store's thread."""

    async def open(self) -> None:
        """Start the store's thread and create or migrate the database. Raises StoreUnavailable;
        later calls try to open it again."""
        self._thread = threading.Thread(target=self._run, name="outrigger-store", daemon=True)
        self._thread.start()
        await self._call(lambda _: None)
        log.info("delivery store %s open (schema version %d)", self.path, SCHEMA_VERSION)

    async def close(self) -> None:
        if self._thread is None:
            return
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # ------------------------------------------------------------------ the store's thread

    def _run(self) -> None:
        stopping = False
        while not stopping:
            job = self._jobs.get()
            batch: list[_Job] = []
            while True:
                if job is None:  # the stop sign: finish what came before it
                    stopping = True
                    break
                if job.future.set_running_or_notify_cancel():  # else its caller gave up: skip it
                    batch.append(job)
                if len(batch) >= BATCH_MAX:
                    break
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._execute(batch)
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _execute(self, batch: list[_Job]) -> None:
        """Run `batch` in one transaction; hand results back only once it is committed."""
        try:
            connection = self._connected()
        except Exception as error:
            for job in batch:
                job.future.set_exception(_unavailable(error, self.path))
            return
        results: list[Any] = []
        try:
            connection.execute("BEGIN")
            for job in batch:
                results.append(job.fn(connection))
            connection.execute("COMMIT")
        except Exception as error:
            if connection.in_transaction:
                try:
                    connection.execute("ROLLBACK")
                except sqlite3.Error:
                    self._reset()
            if len(batch) > 1:
                for job in batch:  # alone, so each gets its own verdict
                    self._execute([job])
                return
            if isinstance(error, sqlite3.DatabaseError) and not isinstance(error, sqlite3.IntegrityError):
                log.error("delivery store write failed: %s", error)
            batch[0].future.set_exception(_unavailable(error, self.path))
            return
        for job, result in zip(batch, results, strict=True):
            if job.after_commit is not None:
                job.after_commit(result)
            job.future.set_result(result)

    def _connected(self) -> sqlite3.Connection:
        if self._connection is None:
            connection = connect(self.path)
            try:
                found = migrate(connection)
            except BaseException:
                connection.close()
                raise
            if found != SCHEMA_VERSION:
                log.info("delivery store %s: schema %d -> %d", self.path, found, SCHEMA_VERSION)
            self._connection = connection
        return self._connection

    def _reset(self) -> None:
        """Drop a connection SQLite could not even roll back: the next job opens a fresh one."""
        if self._connection is not None:
            with contextlib.suppress(sqlite3.Error):
                self._connection.close()
            self._connection = None

    async def _call(
        self, fn: Callable[[sqlite3.Connection], T], after_commit: Callable[[T], None] | None = None
    ) -> T:
        if self._thread is None:
            raise errors.StoreUnavailable("the delivery store is closed")
        job = _Job(fn, after_commit)
        self._jobs.put(job)
        result: T = await asyncio.wrap_future(job.future)
        return result

    # ------------------------------------------------------------------ DeliveryStore

    async def enqueue(self, delivery: NewDelivery, now: float) -> Enqueued:
        return await self._call(lambda c: _enqueue(c, delivery, now))

    async def claim(self, now: float, limit: int, lease: float) -> Sequence[Delivery]:
        def claim(c: sqlite3.Connection) -> list[Delivery]:
            held = {key for key, until in self._leases.items() if until > now}
            rows = c.execute(
                f"SELECT {_COLUMNS}, headers, body FROM deliveries WHERE state = 'pending'"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
                (now, limit + len(held)),
            )
            found = (_delivery(row[:-2], _decode_headers(row[-2]), row[-1]) for row in rows)
            return [delivery for delivery in found if delivery.id not in held][:limit]

        def hold(claimed: list[Delivery]) -> None:
            self._leases = {key: until for key, until in self._leases.items() if until > now}
            self._leases.update((delivery.id, now + lease) for delivery in claimed)

        return await self._call(claim, hold)

    async def record(self, delivery_id: str, outcome: Outcome) -> None:
        # the claim ends only once the outcome is written: a failed write keeps it (no hot loop)
        def release(_: None) -> None:
            self._leases.pop(delivery_id, None)

        await self._call(lambda c: _record(c, delivery_id, outcome), release)

    async def next_due(self) -> float | None:
        def due(c: sqlite3.Connection) -> float | None:
            rows = c.execute(
                "SELECT id, next_attempt_at FROM deliveries WHERE state = 'pending'"
                " ORDER BY next_attempt_at LIMIT ?",
                (len(self._leases) + 1,),
            )
            times = [max(at, self._leases.get(key, 0.0)) for key, at in rows]
            return min(times) if times else None

        return await self._call(due)

    async def get(self, delivery_id: str) -> Delivery | None:
        def get(c: sqlite3.Connection) -> Delivery | None:
            row = c.execute(f"SELECT {_COLUMNS} FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
            return _delivery(row) if row is not None else None

        return await self._call(get)

    async def list(self, state: State | None, limit: int) -> Sequence[Delivery]:
        def rows(c: sqlite3.Connection) -> list[Delivery]:
            where, args = ("WHERE state = ?", (state,)) if state is not None else ("", ())
            cursor = c.execute(
                f"SELECT {_COLUMNS} FROM deliveries {where} ORDER BY created_at DESC LIMIT ?", (*args, limit)
            )
            return [_delivery(row) for row in cursor]

        return await self._call(rows)

    async def retry(self, delivery_id: str, now: float) -> Delivery | None:
        def retry(c: sqlite3.Connection) -> Delivery | None:
            row = c.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,"
                " expires_at = ? + (expires_at - created_at), finished_at = NULL"
                f" WHERE id = ? AND state = 'dead' RETURNING {_COLUMNS}",
                (now, now, delivery_id),
            ).fetchone()
            return _delivery(row) if row is not None else None

        return await self._call(retry)

    async def delete(self, delivery_id: str) -> bool:
        def delete(c: sqlite3.Connection) -> bool:
            return c.execute("DELETE FROM deliveries WHERE id = ?", (delivery_id,)).rowcount > 0

        return await self._call(delete)

    async def counts(self) -> dict[tuple[str, State], int]:
        def counts(c: sqlite3.Connection) -> dict[tuple[str, State], int]:
            rows = c.execute("SELECT source, state, COUNT(*) FROM deliveries GROUP BY source, state")
            return {(source, state): n for source, state, n in rows if state in STATES}

        return await self._call(counts)

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    async def purge(self, now: float) -> int:
        def purge(c: sqlite3.Connection) -> int:
            keys = c.execute("DELETE FROM dedupe WHERE expires_at <= ?", (now,)).rowcount
            done = c.execute(
                "DELETE FROM deliveries WHERE state = 'done' AND finished_at <= ?", (now - DONE_RETENTION_S,)
            ).rowcount
            return int(keys + done)

        return await self._call(purge)


# ---------------------------------------------------------------------- statements (store thread)


def _enqueue(c: sqlite3.Connection, d: NewDelivery, created: float) -> Enqueued:
    if d.dedupe_key is not None:
        row = c.execute(
            "SELECT delivery_id FROM dedupe WHERE source = ? AND key = ? AND expires_at > ?",
            (d.source, d.dedupe_key, created),
        ).fetchone()
        if row is not None:
            return Enqueued(row[0], duplicate=True)
    delivery_id = uuid.uuid4().hex
    c.execute(
        "INSERT INTO deliveries (id, kind, source, state, method, host, path_qs, target,"
        " headers, body, traceparent, created_at, expires_at, next_attempt_at)"
        " VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            delivery_id,
            d.kind,
            d.source,
            d.method,
            d.host,
            d.path_qs,
            d.target,
            _encode_headers(d.headers),
            d.body,
            d.traceparent,
            created,
            d.expires_at,
            created,
        ),
    )
    if d.dedupe_key is not None:
        c.execute(
            "INSERT OR REPLACE INTO dedupe (source, key, delivery_id, expires_at) VALUES (?, ?, ?, ?)",
            (d.source, d.dedupe_key, delivery_id, created + d.dedupe_window),
        )
    return Enqueued(delivery_id, duplicate=False)


def _record(c: sqlite3.Connection, delivery_id: str, o: Outcome) -> None:
    finished = o.at if o.state != "pending" else None
    attempted = 1 if o.counted else 0
    c.execute(
        "UPDATE deliveries SET state = ?, attempts = attempts + ?, last_status = ?, last_error = ?,"
        " last_attempt_at = CASE WHEN ? THEN ? ELSE last_attempt_at END,"
        " next_attempt_at = COALESCE(?, next_attempt_at), finished_at = ?,"
        # a done delivery is never sent again: its request need not take space any more
        " headers = CASE WHEN ? = 'done' THEN '[]' ELSE headers END,"
        " body = CASE WHEN ? = 'done' THEN x'' ELSE body END"
        " WHERE id = ?",
        (
            o.state,
            attempted,
            o.status,
            o.error,
            attempted,
            o.at,
            o.next_attempt_at,
            finished,
            o.state,
            o.state,
            delivery_id,
        ),
    )


def _encode_headers(headers: tuple[tuple[str, str], ...]) -> str:
    return json.dumps(headers, separators=(",", ":"))


def _decode_headers(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((name, value) for name, value in json.loads(text))


def _delivery(row: Sequence[Any], headers: tuple[tuple[str, str], ...] = (), body: bytes = b"") -> Delivery:
    return Delivery(**dict(zip(_FIELDS, row, strict=True)), headers=headers, body=bytes(body))
