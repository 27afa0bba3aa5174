"""Fire-and-forget delivery end to end (SPEC 11): real Outrigger, real upstreams, the admin API."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

import pytest
import yaml
from pytest_aiohttp import AiohttpServer

from proxy.cli import main
from proxy.delivery import worker
from tests.conftest import StartProxy, free_port, loopback_policy
from tests.e2e.otlp_receiver import OtlpReceiver
from tests.e2e.procs import assert_error, wait_until
from tests.fakes import Reply, ScriptedUpstream, app_request, call

FAST = {"backoff": {"base": "50ms", "max": "200ms"}}
"""Delivery retries a test can wait for."""


def delivery_policy(upstream: str, delivery: dict[str, Any] | None = None, **policy: Any) -> dict[str, Any]:
    return loopback_policy(upstream, delivery={**FAST, **(delivery or {})}, **policy)


async def fire(proxy: Any, data: bytes = b'{"amount": 1}', headers: dict[str, str] | None = None) -> Reply:
    return await app_request(
        proxy, "POST", "/v1/charges", headers={"Prefer": "respond-async", **(headers or {})}, data=data
    )


async def admin(proxy: Any, method: str, path: str) -> Reply:
    return await call(method, f"http://127.0.0.1:{proxy.admin_port}{path}")


async def settled(proxy: Any, delivery_id: str, state: str, within: float = 10.0) -> dict[str, Any]:
    """The delivery's admin view once it is in `state` (fails after `within` seconds)."""
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal seen
        seen = (await admin(proxy, "GET", f"/deliveries/{delivery_id}")).json()
        return seen.get("state") == state

    assert await wait_until(reached, within=within, interval=0.05), seen
    return seen


async def test_accepted_with_202_id_and_location_then_delivered_once_the_upstream_is_up(
    start_proxy: StartProxy, aiohttp_server: AiohttpServer
) -> None:
    port = free_port()
    proxy = await start_proxy([delivery_policy(f"http://127.0.0.1:{port}")])

    reply = await fire(proxy)

    assert reply.status == 202, reply.body
    delivery_id = reply.headers["x-outrigger-delivery-id"]
    assert reply.headers["Location"] == f"/deliveries/{delivery_id}"
    assert reply.json() == {"id": delivery_id, "state": "pending", "location": f"/deliveries/{delivery_id}"}
    await wait_until(
        lambda: _attempted(proxy, delivery_id), within=5
    )  # at least one attempt failed against nothing
    upstream = await ScriptedUpstream(200).start(functools.partial(aiohttp_server, port=port))
    view = await settled(proxy, delivery_id, "done")
    assert view["last_status"] == 200
    assert view["attempts"] >= 2
    assert upstream.count == 1
    seen = upstream.seen[0]
    assert seen.method == "POST"
    assert seen.path_qs == "/v1/charges"
    assert seen.body == b'{"amount": 1}'
    assert "Prefer" not in seen.headers
    assert seen.headers["Idempotency-Key"]


async def _attempted(proxy: Any, delivery_id: str) -> bool:
    view = (await admin(proxy, "GET", f"/deliveries/{delivery_id}")).json()
    return bool(view["attempts"] >= 1)


async def test_every_attempt_carries_the_same_injected_idempotency_key(
    start_proxy: StartProxy, aiohttp_server: AiohttpServer
) -> None:
    upstream = await ScriptedUpstream(503, 503, 200).start(aiohttp_server)
    proxy = await start_proxy([delivery_policy(upstream.url)])

    delivery_id = (await fire(proxy)).headers["x-outrigger-delivery-id"]

    view = await settled(proxy, delivery_id, "done")
    assert view["attempts"] == 3
    keys = upstream.keys()
    assert len(keys) == 3
    assert keys[0]
    assert keys == [keys[0]] * 3


async def test_an_app_supplied_key_is_kept_on_every_attempt(
    start_proxy: StartProxy, aiohttp_server: AiohttpServer
) -> None:
    upstream = await ScriptedUpstream(502, 200).start(aiohttp_server)
    proxy = await start_proxy([delivery_policy(upstream.url, idempotency={"header": "X-Key"})])

    delivery_id = (await fire(proxy, headers={"X-Key": "app-key-1"})).headers["x-outrigger-delivery-id"]

    await settled(proxy, delivery_id, "done")
    assert upstream.keys("X-Key") == ["app-key-1", "app-key-1"]


async def test_a_non_retryable_answer_is_done_and_keeps_its_status(
    start_proxy: StartProxy, aiohttp_server: AiohttpServer
) -> None:
    upstream = await ScriptedUpstream(400).start(aiohttp_server)
    proxy = await start_proxy([delivery_policy(upstream.url)])

    delivery_id = (await fire(proxy)).headers["x-outrigger-delivery-id"]

    view = await settled(proxy, delivery_id, "done")
    assert view["last_status"] == 400
    assert view["attempts"] == 1
    assert upstream.count == 1
    listed = (await admin(proxy, "GET", "/deliveries?state=done")).json()["deliveries"]
    assert [d["id"] for d in listed] == [delivery_id]


async def test_dead_after_max_attempts_then_retry_redelivers_and_delete_forgets(
    start_proxy: StartProxy, aiohttp_server: AiohttpServer
) -> None:
    upstream = await ScriptedUpstream(503, 503, 503, 201).start(aiohttp_server)
    proxy = await start_proxy([delivery_policy(upstream.url, {"max_attempts": 3})])

    delivery_id = (await fire(proxy)).headers["x-outrigger-delivery-id"]

    dead = await settled(proxy, delivery_id, "dead")
    assert dead["attempts"] == 3
    assert dead["last_status"] == 503
    assert "gave up after 3 attempt(s)" in dead["last_error"]
    assert [d["id"] for d in (await admin(proxy, "GET", "/deliveries?state=dead")).json()["deliveries"]] == [
        delivery_id
    ]
    assert upstream.count == 3

    retried = await admin(proxy, "POST", f"/deliveries/{delivery_id}/retry")
    assert retried.status == 200
    assert retried.json()["state"] == "pending"
    done = await settled(proxy, delivery_id, "done")
    assert done["last_status"] == 201
    assert upstream.count == 4
    assert len(set(upstream.keys())) == 1  # the redelivery is the same request, same key

    again = await admin(proxy, "POST", f"/deliveries/{delivery_id}/retry")
    assert again.status == 409
    deleted = await admin(proxy, "DELETE", f"/deliveries/{delivery_id}")
    assert deleted.status == 200
    assert (await admin(proxy, "GET", f"/deliveries/{delivery_id}")).status == 404
    assert (await admin(proxy, "DELETE", f"/deliveries/{delivery_id}")).status == 404


async def test_a_body_above_max_body_bytes_is_refused_413_and_nothing_is_stored(
    start_proxy: StartProxy, aiohttp_server: AiohttpServer
) -> None:
    upstream = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy([delivery_policy(upstream.url, {"max_body_bytes": "1KiB"})])

    reply = await fire(proxy, data=b"x" * 1025)

    assert_error(reply.status, reply.headers, reply.body, expected_status=413, error_type="body_too_large")
    assert (await admin(proxy, "GET", "/deliveries")).json() == {"deliveries": []}
    ok = await fire(proxy, data=b"x" * 1024)
    assert ok.status == 202
    assert upstream.count <= 1


async def test_a_policy_without_delivery_proxies_respond_async_requests_normally(
    start_proxy: StartProxy, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    upstream = await ScriptedUpstream(201).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)])

    reply = await fire(proxy)

    assert reply.status == 201
    assert upstream.seen[0].headers["Prefer"] == "respond-async"
    assert proxy.server.deliveries is None
    assert not (tmp_path / "outrigger-data").exists()
    assert (await admin(proxy, "GET", "/deliveries")).status == 404


async def test_each_delivery_attempt_is_a_span_linked_to_the_accepting_request(
    receiver: OtlpReceiver, start_proxy: StartProxy, aiohttp_server: AiohttpServer
) -> None:
    upstream = await ScriptedUpstream(503, 200).start(aiohttp_server)
    telemetry = {"traces": {"endpoint": receiver.endpoint}}
    proxy = await start_proxy([delivery_policy(upstream.url)], telemetry=telemetry)

    delivery_id = (await fire(proxy)).headers["x-outrigger-delivery-id"]
    await settled(proxy, delivery_id, "done")
    await proxy.server.stop()  # flushes the exporter

    accepted = [s for s in receiver.servers() if s.attributes.get("outrigger.delivery.id") == delivery_id]
    assert len(accepted) == 1
    attempts = [s for s in receiver.spans if s.name == "delivery POST"]
    assert [s.attributes["outrigger.delivery.attempt"] for s in attempts] == [1, 2]
    for span in attempts:
        assert span.attributes["outrigger.delivery.id"] == delivery_id
        assert span.trace_id != accepted[0].trace_id  # a trace of its own ...
        assert span.links == ((accepted[0].trace_id, accepted[0].span_id),)  # ... linked to the 202's
        clients = [c for c in receiver.clients() if c.parent_span_id == span.span_id]
        assert len(clients) == 1  # the pipeline's CLIENT span is the attempt span's child


async def test_metrics_show_results_states_and_the_store_size(
    start_proxy: StartProxy, aiohttp_server: AiohttpServer
) -> None:
    upstream = await ScriptedUpstream(200, 400).start(aiohttp_server)
    proxy = await start_proxy([delivery_policy(upstream.url)])
    first = (await fire(proxy)).headers["x-outrigger-delivery-id"]
    await settled(proxy, first, "done")
    second = (await fire(proxy)).headers["x-outrigger-delivery-id"]
    await settled(proxy, second, "done")

    text = (await admin(proxy, "GET", "/metrics")).body.decode()

    assert 'outrigger_deliveries{source="upstream.test",state="done"} 2.0' in text
    assert 'outrigger_deliveries_total{result="accepted",source="upstream.test"} 2.0' in text
    assert 'outrigger_deliveries_total{result="delivered",source="upstream.test"} 1.0' in text
    assert 'outrigger_deliveries_total{result="rejected",source="upstream.test"} 1.0' in text
    size = next(line for line in text.splitlines() if line.startswith("outrigger_delivery_store_bytes "))
    assert float(size.split()[1]) > 0
    assert (
        'outrigger_attempts_total{host="upstream.test",outcome="4xx"} 1.0' in text
    )  # replayed attempts count


async def test_the_worker_follows_reloads_and_a_vanished_policy_waits(
    start_proxy: StartProxy, aiohttp_server: AiohttpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "UNCONFIGURED_RECHECK_S", 0.2)
    failing = await ScriptedUpstream(503).start(aiohttp_server)
    working = await ScriptedUpstream(204).start(aiohttp_server)
    proxy = await start_proxy([delivery_policy(failing.url)])
    delivery_id = (await fire(proxy)).headers["x-outrigger-delivery-id"]
    assert await wait_until(lambda: failing.count >= 1, within=5)

    await _reload(proxy, tmp_path, [loopback_policy(working.url, host="other.test")])

    async def waiting() -> bool:
        view = (await admin(proxy, "GET", f"/deliveries/{delivery_id}")).json()
        return "not in the current config" in (view["last_error"] or "")

    assert await wait_until(waiting, within=5)
    attempts = (await admin(proxy, "GET", f"/deliveries/{delivery_id}")).json()["attempts"]
    await _reload(proxy, tmp_path, [delivery_policy(working.url)])
    done = await settled(proxy, delivery_id, "done")
    assert done["last_status"] == 204
    assert done["attempts"] == attempts + 1  # waiting counted no attempt
    assert working.count == 1


async def _reload(proxy: Any, tmp_path: Path, policies: list[dict[str, Any]]) -> None:
    (tmp_path / "policies" / "test.yaml").write_text(yaml.safe_dump(policies))
    reply = await admin(proxy, "POST", "/reload")
    assert reply.status == 200, reply.body


async def test_the_cli_lists_shows_and_retries(
    start_proxy: StartProxy, aiohttp_server: AiohttpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream = await ScriptedUpstream(503, 503, 202).start(aiohttp_server)
    proxy = await start_proxy([delivery_policy(upstream.url, {"max_attempts": 2})])
    delivery_id = (await fire(proxy)).headers["x-outrigger-delivery-id"]
    await settled(proxy, delivery_id, "dead")
    base = ["--admin", f"http://127.0.0.1:{proxy.admin_port}"]
    capsys.readouterr()

    assert await asyncio.to_thread(main, ["deliveries", "list", "--state", "dead", *base]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["ID", "STATE", "SOURCE", "METHOD", "PATH", "ATTEMPTS", "LAST", "CREATED"]
    assert listing[1].split()[:6] == [delivery_id, "dead", "upstream.test", "POST", "/v1/charges", "2"]
    assert await asyncio.to_thread(main, ["deliveries", "show", delivery_id, *base]) == 0
    shown = capsys.readouterr().out
    assert f"id            {delivery_id}" in shown
    assert "last outcome  503 status 503; gave up after 2 attempt(s)" in shown
    assert await asyncio.to_thread(main, ["deliveries", "retry", delivery_id, *base]) == 0
    assert "pending again" in capsys.readouterr().out
    await settled(proxy, delivery_id, "done")
    assert await asyncio.to_thread(main, ["deliveries", "show", "nope", *base]) == 1
    assert "no delivery nope" in capsys.readouterr().err
