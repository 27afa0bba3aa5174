"""Inbound webhooks end to end (SPEC 11): a real Outrigger, a provider signing with its own
library (stripe), a real aiohttp app on loopback, the admin API, metrics and traces.

Proves: a verified event is stored, acknowledged 200 and forwarded to the app once, however often
the provider redelivers it; an app that is down gets the event, byte for byte and with its
signature, once it is back; an app that keeps failing leaves the event dead, visible and retryable;
a reload's new ``forward`` applies to events already stored, and a removed route's events wait;
each forward attempt is a span linked to the webhook request, whose context reaches the app; an
event acknowledged before kill -9 of a real `outrigger run` is delivered after the restart.
"""

from __future__ import annotations

import asyncio
import functools
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from pytest_aiohttp import AiohttpServer

from proxy.delivery import worker
from tests.conftest import Launch, RunningProxy, StartProxy, free_port, write_config
from tests.e2e.otlp_receiver import OtlpReceiver
from tests.e2e.procs import wait_until
from tests.e2e.test_delivery_e2e import admin, settled
from tests.fakes import Reply, ScriptedUpstream, call
from tests.webhooks.test_listener import stripe_headers

PATH = "/webhooks/stripe"
BODY = b'{"id": "evt_e2e_1", "object": "event", "type": "invoice.paid",  "data": {"amount": 1}}'
"""Odd spacing on purpose: the app must get these bytes, not a re-serialisation."""
FAST = {"backoff": {"base": "100ms", "max": "300ms"}, "ttl": "1h"}


def webhooks(secret_file: Path, app: str, **delivery: Any) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "routes": [
            {
                "path": PATH,
                "verify": {"scheme": "stripe", "secret": f"${{file:{secret_file}}}"},
                "forward": f"{app}/stripe/events?from=outrigger",
                "delivery": {"max_attempts": 100, **FAST, **delivery},
            }
        ],
    }


async def send(proxy: RunningProxy, headers: dict[str, str], body: bytes = BODY) -> Reply:
    listen = proxy.config.main.webhooks
    assert listen is not None
    return await call("POST", f"http://127.0.0.1:{listen.listen.port}{PATH}", data=body, headers=headers)


async def only_delivery(proxy: Any, state: str | None = None) -> dict[str, Any]:
    query = f"?state={state}" if state else ""
    [view] = (await admin(proxy, "GET", f"/deliveries{query}")).json()["deliveries"]
    return view  # type: ignore[no-any-return]


async def test_three_redeliveries_of_one_event_reach_the_app_once(
    start_proxy: StartProxy, aiohttp_server: AiohttpServer, secret_file: Path
) -> None:
    app = await ScriptedUpstream(200).start(aiohttp_server)
    proxy = await start_proxy([], webhooks=webhooks(secret_file, app.url))

    replies = [
        await send(proxy, stripe_headers(BODY)) for _ in range(3)
    ]  # re-signed each time, as Stripe does

    assert [(r.status, r.json()["status"]) for r in replies] == [
        (200, "stored"),
        (200, "duplicate"),
        (200, "duplicate"),
    ]
    view = await settled(proxy, (await only_delivery(proxy))["id"], "done")
    assert (view["kind"], view["source"], view["last_status"], view["attempts"]) == ("webhook", PATH, 200, 1)
    await asyncio.sleep(0.5)  # a second forward would have happened by now
    assert app.count == 1
    text = (await admin(proxy, "GET", "/metrics")).body.decode()
    assert f'outrigger_webhooks_total{{result="accepted",route="{PATH}"}} 1.0' in text
    assert f'outrigger_webhooks_total{{result="duplicate",route="{PATH}"}} 2.0' in text
    assert f'outrigger_deliveries_total{{result="accepted",source="{PATH}"}} 1.0' in text
    assert f'outrigger_deliveries_total{{result="duplicate",source="{PATH}"}} 2.0' in text
    assert f'outrigger_deliveries_total{{result="delivered",source="{PATH}"}} 1.0' in text
    assert f'outrigger_deliveries{{source="{PATH}",state="done"}} 1.0' in text


async def test_an_app_down_for_5s_gets_the_event_byte_for_byte_once_it_is_back(
    start_proxy: StartProxy, aiohttp_server: AiohttpServer, secret_file: Path
) -> None:
    app_port = free_port()
    proxy = await start_proxy([], webhooks=webhooks(secret_file, f"http://127.0.0.1:{app_port}"))
    signed = stripe_headers(BODY)
    extra = {"X-Provider-Note": "kept", "X-Outrigger-Webhook-Verified": "forged", "Connection": "keep-alive"}

    reply = await send(proxy, {**signed, **extra})

    assert (reply.status, reply.json()) == (200, {"status": "stored"})
    await asyncio.sleep(5)  # the app is down: every attempt so far is a connect failure
    waiting = await only_delivery(proxy, "pending")
    assert waiting["attempts"] >= 3
    assert waiting["last_error"] == "connect-failure"
    assert waiting["host"] == "127.0.0.1"
    assert waiting["path"] == "/stripe/events"  # the forward path; never a query value
    app = await ScriptedUpstream(202).start(functools.partial(aiohttp_server, port=app_port))
    view = await settled(proxy, waiting["id"], "done")
    assert view["last_status"] == 202
    [seen] = app.seen
    assert (seen.method, seen.path_qs, seen.body) == ("POST", "/stripe/events?from=outrigger", BODY)
    assert seen.headers["Stripe-Signature"] == signed["Stripe-Signature"]
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["X-Provider-Note"] == "kept"
    assert seen.headers.getall("x-outrigger-webhook-verified") == ["stripe"]  # the sender's forgery dropped
    assert seen.headers["x-outrigger-delivery-id"] == view["id"]
    assert seen.headers["Host"] == f"127.0.0.1:{app_port}"
    assert seen.headers["Content-Length"] == str(len(BODY))


async def test_an_app_failing_for_ever_leaves_the_event_dead_until_retried(
    start_proxy: StartProxy, aiohttp_server: AiohttpServer, secret_file: Path
) -> None:
    app = await ScriptedUpstream(500, 500, 500, 200).start(aiohttp_server)  # "fixed" after three
    proxy = await start_proxy([], webhooks=webhooks(secret_file, app.url, max_attempts=3))

    assert (await send(proxy, stripe_headers(BODY))).status == 200

    dead = await settled(proxy, (await only_delivery(proxy))["id"], "dead")
    assert (dead["attempts"], dead["last_status"]) == (3, 500)
    assert "gave up after 3 attempt(s)" in dead["last_error"]
    assert [d["id"] for d in (await admin(proxy, "GET", "/deliveries?state=dead")).json()["deliveries"]] == [
        dead["id"]
    ]
    assert app.count == 3
    text = (await admin(proxy, "GET", "/metrics")).body.decode()
    assert f'outrigger_deliveries_total{{result="dead",source="{PATH}"}} 1.0' in text
    assert f'outrigger_deliveries{{source="{PATH}",state="dead"}} 1.0' in text
    assert (await send(proxy, stripe_headers(BODY))).json() == {"status": "duplicate"}  # dead is not gone

    retried = await admin(proxy, "POST", f"/deliveries/{dead['id']}/retry")

    assert (retried.status, retried.json()["state"]) == (200, "pending")
    done = await settled(proxy, dead["id"], "done")
    assert (done["last_status"], done["attempts"]) == (200, 1)
    assert app.count == 4
    assert {seen.body for seen in app.seen} == {BODY}
    assert {seen.headers["x-outrigger-delivery-id"] for seen in app.seen} == {dead["id"]}


async def test_each_forward_attempt_is_a_span_linked_to_the_webhook_request(
    receiver: OtlpReceiver, start_proxy: StartProxy, aiohttp_server: AiohttpServer, secret_file: Path
) -> None:
    app = await ScriptedUpstream(503, 200).start(aiohttp_server)
    assert app.server is not None
    proxy = await start_proxy(
        [],
        webhooks=webhooks(secret_file, app.url),
        telemetry={"traces": {"endpoint": receiver.endpoint}},
    )

    assert (await send(proxy, stripe_headers(BODY))).status == 200
    delivery_id = (await only_delivery(proxy))["id"]
    await settled(proxy, delivery_id, "done")
    await proxy.server.stop()  # flushes the exporter

    [webhook] = [s for s in receiver.servers() if s.name == f"POST {PATH}"]
    attempts = [s for s in receiver.spans if s.name == "delivery POST"]
    assert [s.attributes["outrigger.delivery.attempt"] for s in attempts] == [1, 2]
    for span, seen in zip(attempts, app.seen, strict=True):
        assert span.attributes["outrigger.delivery.id"] == delivery_id
        assert span.attributes["outrigger.delivery.source"] == PATH
        assert span.trace_id != webhook.trace_id  # a trace of its own ...
        assert span.links == ((webhook.trace_id, webhook.span_id),)  # ... linked to the webhook request
        [client] = [c for c in receiver.clients() if c.parent_span_id == span.span_id]
        assert client.attributes["server.port"] == app.server.port
        assert (
            client.attributes["url.full"] == f"http://127.0.0.1:{app.server.port}/stripe/events?from=REDACTED"
        )
        assert seen.headers["traceparent"].split("-")[1:3] == [client.trace_id, client.span_id]
    assert [s.attributes.get("http.response.status_code") for s in attempts] == [503, 200]


async def test_a_webhooks_section_starts_the_store_with_the_listener(
    start_proxy: StartProxy, secret_file: Path, tmp_path: Path
) -> None:
    proxy = await start_proxy([], webhooks=webhooks(secret_file, f"http://127.0.0.1:{free_port()}"))
    assert proxy.server.deliveries is not None
    assert await wait_until(lambda: (tmp_path / "outrigger-data" / "deliveries.db").exists(), within=5)


async def test_an_event_stored_before_kill_9_is_delivered_after_the_restart(
    launch: Launch, tmp_path: Path, secret_file: Path, aiohttp_server: AiohttpServer
) -> None:
    app_port = free_port()
    section = webhooks(secret_file, f"http://127.0.0.1:{app_port}")
    config = write_config(tmp_path, [], webhooks=section, drain_idle="100ms", drain_timeout="2s")
    first = launch(config)
    await first.wait_ready()
    url = f"http://127.0.0.1:{section['listen']['port']}{PATH}"
    reply = await call("POST", url, data=BODY, headers=stripe_headers(BODY))  # ready: listening too
    assert (reply.status, reply.json()) == (200, {"status": "stored"})
    first.send(signal.SIGKILL)  # the app was never up: the event is stored, not delivered
    assert await first.wait_exit(within=5) == -signal.SIGKILL

    app = await ScriptedUpstream(200).start(functools.partial(aiohttp_server, port=app_port))
    second = launch(config)
    await second.wait_ready()

    view = await settled(second, (await only_delivery(second))["id"], "done")
    assert (view["kind"], view["source"], view["last_status"]) == ("webhook", PATH, 200)
    [seen] = app.seen
    assert seen.body == BODY
    assert seen.headers["x-outrigger-delivery-id"] == view["id"]
    assert seen.headers["x-outrigger-webhook-verified"] == "stripe"


async def test_stored_events_follow_a_reload_of_their_route_and_wait_while_it_is_gone(
    start_proxy: StartProxy,
    aiohttp_server: AiohttpServer,
    secret_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker, "UNCONFIGURED_RECHECK_S", 0.2)
    failing = await ScriptedUpstream(503).start(aiohttp_server)
    working = await ScriptedUpstream(202).start(aiohttp_server)
    section = webhooks(secret_file, failing.url)
    proxy = await start_proxy([], webhooks=section)
    assert (await send(proxy, stripe_headers(BODY))).status == 200
    assert await wait_until(lambda: failing.count >= 1, within=5)
    delivery_id = (await only_delivery(proxy))["id"]

    await reload_routes(proxy, tmp_path, [])

    async def waiting() -> bool:
        view = (await admin(proxy, "GET", f"/deliveries/{delivery_id}")).json()
        return "webhook route /webhooks/stripe is not in the current config" in (view["last_error"] or "")

    assert await wait_until(waiting, within=5)
    moved = webhooks(secret_file, working.url)["routes"]
    await reload_routes(proxy, tmp_path, moved)
    done = await settled(proxy, delivery_id, "done")
    assert done["last_status"] == 202
    assert [seen.body for seen in working.seen] == [BODY]  # the forward URL in force at delivery time


async def reload_routes(proxy: RunningProxy, tmp_path: Path, routes: list[dict[str, Any]]) -> None:
    """The same webhook listener (restart-only), other routes; reloaded through the admin API."""
    path = tmp_path / "config.yaml"
    main = yaml.safe_load(path.read_text())
    main["webhooks"]["routes"] = routes
    path.write_text(yaml.safe_dump(main))
    reply = await admin(proxy, "POST", "/reload")
    assert reply.status == 200, reply.body
