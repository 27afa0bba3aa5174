"""The webhook listener end to end: a real Outrigger (in process, real sockets) with a
``webhooks`` section, real clients, and an in-memory sink standing in for the store.

Proves: 200 on a valid event with the raw bytes and headers handed on; duplicates acknowledged;
401 signature_invalid / signature_expired with nothing handed on and nothing echoed; 404 / 405;
413 from Content-Length before any body byte is read, and for a chunked body that grows too big;
503 store_unavailable; 431 for headers over the limits; the metric, span and access log line;
hot reload of a rotated secret on the same socket; drain waits for a webhook in flight.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.config.model import WebhookRouteSettings
from tests.conftest import WEBHOOK_SECRET, AccessLog, RunningProxy, StartProxy, free_port
from tests.e2e.procs import assert_error
from tests.fakes import Reply, call
from tests.webhooks.memory_sink import MemorySink
from tests.webhooks.test_verify import sign_github, sign_stripe

STRIPE_PATH = "/webhooks/stripe"
GITHUB_PATH = "/webhooks/github"
BODY = b'{"id": "evt_1", "type": "invoice.paid"}'


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


def webhooks_section(secret_file: Path, port: int, **github: Any) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "routes": [
            {
                "path": STRIPE_PATH,
                "verify": {"scheme": "stripe", "secret": f"${{file:{secret_file}}}"},
                "forward": "http://127.0.0.1:9/stripe",
            },
            {
                "path": GITHUB_PATH,
                "verify": {"scheme": "github", "secret": f"${{file:{secret_file}}}"},
                "forward": "http://127.0.0.1:9/github",
                "max_body_bytes": "1KiB",
                **github,
            },
        ],
    }


@pytest.fixture
async def proxy(start_proxy: StartProxy, sink: MemorySink, secret_file: Path) -> RunningProxy:
    return await start_proxy([], webhook_sink=sink, webhooks=webhooks_section(secret_file, free_port()))


def base(proxy: RunningProxy) -> str:
    webhooks = proxy.config.main.webhooks
    assert webhooks is not None
    return f"http://127.0.0.1:{webhooks.listen.port}"


def stripe_headers(body: bytes = BODY, secret: str = WEBHOOK_SECRET, at: int | None = None) -> dict[str, str]:
    signed = sign_stripe(secret, body, int(time.time()) if at is None else at)
    return {**signed, "Content-Type": "application/json"}


def github_headers(body: bytes, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    return {**sign_github(secret, body, 0), "X-GitHub-Delivery": "d-1"}


async def post(proxy: RunningProxy, path: str, body: bytes, headers: dict[str, str]) -> Reply:
    return await call("POST", base(proxy) + path, data=body, headers=headers)


async def metric(proxy: RunningProxy, route: str, result: str) -> float:
    reply = await call("GET", f"http://127.0.0.1:{proxy.admin_port}/metrics")
    prefix = f'outrigger_webhooks_total{{result="{result}",route="{route}"}} '
    lines = [line for line in reply.body.decode().splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


async def test_a_valid_event_is_handed_on_with_its_raw_bytes_and_acknowledged(
    proxy: RunningProxy, sink: MemorySink
) -> None:
    reply = await post(proxy, STRIPE_PATH, BODY, stripe_headers())
    assert (reply.status, reply.json()) == (200, {"status": "stored"})
    [(route, event)] = sink.events
    assert (route.name, route.settings.forward) == (STRIPE_PATH, "http://127.0.0.1:9/stripe")
    assert isinstance(route.settings, WebhookRouteSettings)
    assert (event.route, event.scheme, event.event_id) == (STRIPE_PATH, "stripe", "evt_1")
    assert event.body == BODY
    sent = {name.lower(): value for name, value in event.headers}
    assert sent["stripe-signature"].startswith("t=")
    assert sent["content-type"] == "application/json"
    assert abs(event.received_at - time.time()) < 60
    assert await metric(proxy, STRIPE_PATH, "accepted") == 1


async def test_bytes_are_verified_as_sent_never_decoded_or_decompressed(
    proxy: RunningProxy, sink: MemorySink
) -> None:
    body = gzip.compress(b'{"zen": "Keep it logically awesome."}')  # binary, not UTF-8
    headers = {**github_headers(body), "Content-Encoding": "gzip", "Content-Type": "application/json"}
    reply = await post(proxy, GITHUB_PATH, body, headers)
    assert reply.status == 200, reply.body
    assert sink.events[0][1].body == body
    assert sink.events[0][1].event_id == "d-1"


async def test_a_redelivery_is_acknowledged_as_a_duplicate(proxy: RunningProxy, sink: MemorySink) -> None:
    for _ in range(2):
        reply = await post(proxy, STRIPE_PATH, BODY, stripe_headers())
        assert reply.status == 200
    assert reply.json() == {"status": "duplicate"}
    assert len(sink.events) == 1
    assert await metric(proxy, STRIPE_PATH, "duplicate") == 1


async def test_a_bad_signature_is_401_and_nothing_is_handed_on_or_echoed(
    proxy: RunningProxy, sink: MemorySink
) -> None:
    forged = stripe_headers(secret="whsec_attacker")
    reply = await post(proxy, STRIPE_PATH, BODY, forged)
    error = assert_error(
        reply.status, reply.headers, reply.body, expected_status=401, error_type="signature_invalid"
    )
    signature = forged["Stripe-Signature"].split("v1=")[1]
    assert signature not in reply.body.decode()
    assert WEBHOOK_SECRET not in reply.body.decode()
    assert "Stripe-Signature" in error["message"]
    missing = await post(proxy, STRIPE_PATH, BODY, {"Content-Type": "application/json"})
    assert missing.status == 401
    assert sink.events == []
    assert await metric(proxy, STRIPE_PATH, "signature_invalid") == 2


async def test_an_old_timestamp_is_401_signature_expired(proxy: RunningProxy, sink: MemorySink) -> None:
    reply = await post(proxy, STRIPE_PATH, BODY, stripe_headers(at=int(time.time()) - 3600))
    assert_error(reply.status, reply.headers, reply.body, expected_status=401, error_type="signature_expired")
    assert sink.events == []
    assert await metric(proxy, STRIPE_PATH, "signature_expired") == 1


async def test_unknown_path_is_404_and_other_methods_405(proxy: RunningProxy, sink: MemorySink) -> None:
    reply = await post(proxy, STRIPE_PATH + "/", BODY, stripe_headers())
    assert_error(reply.status, reply.headers, reply.body, expected_status=404, error_type="not_found")
    reply = await call("GET", base(proxy) + STRIPE_PATH)
    assert_error(
        reply.status, reply.headers, reply.body, expected_status=405, error_type="method_not_allowed"
    )
    assert reply.headers["Allow"] == "POST"
    assert sink.events == []


async def test_a_query_string_does_not_change_the_route(proxy: RunningProxy, sink: MemorySink) -> None:
    reply = await post(proxy, STRIPE_PATH + "?source=test", BODY, stripe_headers())
    assert reply.status == 200
    assert len(sink.events) == 1


async def raw_exchange(proxy: RunningProxy, head: bytes, body: bytes = b"") -> tuple[bytes, bool]:
    """Send `head` (and `body`) on a raw socket; the answer, and whether the server then closed."""
    port = int(base(proxy).rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.read(65536)
            closed = (await reader.read(65536)) == b""
        return answer, closed
    finally:
        writer.close()


async def test_a_declared_body_too_large_is_413_before_any_of_it_is_read(
    proxy: RunningProxy, sink: MemorySink
) -> None:
    head = (
        f"POST {GITHUB_PATH} HTTP/1.1\r\nHost: hooks\r\nContent-Length: {10 * 1024 * 1024}\r\n"
        "X-Hub-Signature-256: sha256=00\r\n\r\n"
    ).encode()
    answer, closed = await raw_exchange(proxy, head)  # not one body byte sent
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b'"body_too_large"' in answer
    assert closed
    assert sink.events == []
    assert await metric(proxy, GITHUB_PATH, "too_large") == 1
    assert await metric(proxy, GITHUB_PATH, "signature_invalid") == 0  # refused before verification


async def test_a_chunked_body_growing_past_the_limit_is_413(proxy: RunningProxy, sink: MemorySink) -> None:
    head = f"POST {GITHUB_PATH} HTTP/1.1\r\nHost: hooks\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    chunk = b"x" * 800
    body = b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
    answer, closed = await raw_exchange(proxy, head, body)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert closed
    assert sink.events == []


async def test_headers_over_the_limits_are_431(
    start_proxy: StartProxy, sink: MemorySink, secret_file: Path
) -> None:
    proxy = await start_proxy(
        [],
        webhook_sink=sink,
        webhooks=webhooks_section(secret_file, free_port()),
        limits={"max_header_bytes": 2048},
    )
    reply = await post(proxy, STRIPE_PATH, BODY, {**stripe_headers(), "X-Padding": "p" * 4096})
    assert_error(reply.status, reply.headers, reply.body, expected_status=431, error_type="headers_too_large")
    assert sink.events == []


@pytest.mark.parametrize("broken", ["unavailable", "failing"])
async def test_a_store_that_cannot_take_the_event_is_503(
    proxy: RunningProxy, sink: MemorySink, broken: str
) -> None:
    setattr(sink, "available" if broken == "unavailable" else "failing", broken != "unavailable")
    reply = await post(proxy, STRIPE_PATH, BODY, stripe_headers())
    assert_error(reply.status, reply.headers, reply.body, expected_status=503, error_type="store_unavailable")
    assert await metric(proxy, STRIPE_PATH, "unavailable") == 1


async def test_span_and_access_log_line_name_the_route_and_result_never_the_secret(
    start_proxy: StartProxy,
    sink: MemorySink,
    secret_file: Path,
    access_log: AccessLog,
    span_exporter: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    proxy = await start_proxy([], webhook_sink=sink, webhooks=webhooks_section(secret_file, free_port()))
    tracer, exporter = span_exporter
    proxy.server.telemetry.tracing.tracer = tracer
    ok = await post(proxy, STRIPE_PATH + "?token=abc", BODY, stripe_headers())
    forged = await post(proxy, STRIPE_PATH, BODY, stripe_headers(secret="whsec_x"))
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == [f"POST {STRIPE_PATH}"] * 2
    assert all(s.kind is trace.SpanKind.SERVER for s in spans)
    attributes = [dict(s.attributes or {}) for s in spans]
    assert attributes[0]["outrigger.webhook.route"] == STRIPE_PATH
    assert attributes[0]["outrigger.webhook.result"] == "accepted"
    assert attributes[0]["outrigger.webhook.event_id"] == "evt_1"
    assert attributes[0]["url.path"] == STRIPE_PATH
    assert attributes[1]["outrigger.webhook.result"] == "signature_invalid"
    assert attributes[1]["error.type"] == "signature_invalid"
    lines = [e for e in access_log.entries if e.get("listener") == "webhooks"]
    assert [(e["status"], e["route"], e["result"]) for e in lines] == [
        (200, STRIPE_PATH, "accepted"),
        (401, STRIPE_PATH, "signature_invalid"),
    ]
    assert lines[0]["request_id"] == ok.headers["x-request-id"]
    assert lines[1]["request_id"] == forged.headers["x-request-id"]
    assert lines[0]["path"] == f"{STRIPE_PATH}?token=REDACTED"
    text = json.dumps([*lines, *attributes], default=str)
    assert WEBHOOK_SECRET not in text
    assert "v1=" not in text


async def test_config_shows_webhook_secrets_only_as_references(
    start_proxy: StartProxy, sink: MemorySink, secret_file: Path
) -> None:
    section = webhooks_section(secret_file, free_port())
    section["routes"][1]["verify"]["secret"] = "typed-in-secret"
    proxy = await start_proxy([], webhook_sink=sink, webhooks=section)
    document = (await call("GET", f"http://127.0.0.1:{proxy.admin_port}/config")).json()
    routes = document["main"]["webhooks"]["routes"]
    assert routes[0]["verify"]["secret"] == f"${{file:{secret_file}}}"
    assert routes[1]["verify"]["secret"] == "<redacted>"
    assert "typed-in-secret" not in json.dumps(document)


async def test_a_rotated_secret_file_applies_on_reload_without_a_new_listener(
    proxy: RunningProxy, sink: MemorySink, secret_file: Path
) -> None:
    assert (await post(proxy, STRIPE_PATH, BODY, stripe_headers())).status == 200
    await asyncio.to_thread(secret_file.write_text, "whsec_rotated\n")
    reload = await call("POST", f"http://127.0.0.1:{proxy.admin_port}/reload")
    assert reload.json()["ok"], reload.body
    body = b'{"id": "evt_2"}'
    assert (await post(proxy, STRIPE_PATH, body, stripe_headers(body, secret="whsec_rotated"))).status == 200
    old = await post(proxy, STRIPE_PATH, body, stripe_headers(body))
    assert old.status == 401
    assert [e.event_id for _, e in sink.events] == ["evt_1", "evt_2"]


async def test_a_new_route_applies_on_reload_and_moving_the_listener_is_refused(
    proxy: RunningProxy, sink: MemorySink, secret_file: Path, tmp_path: Path
) -> None:
    config_path = proxy.config.path
    written = yaml.safe_load(config_path.read_text())
    written["webhooks"]["routes"].append(
        {
            "path": "/webhooks/new",
            "verify": {"scheme": "github", "secret": "k"},
            "forward": "http://127.0.0.1:9/",
        }
    )
    await asyncio.to_thread(config_path.write_text, yaml.safe_dump(written))
    assert (await call("POST", f"http://127.0.0.1:{proxy.admin_port}/reload")).json()["ok"]
    assert (await post(proxy, "/webhooks/new", b"{}", github_headers(b"{}", "k"))).status == 200
    written["webhooks"]["listen"]["port"] = free_port()
    await asyncio.to_thread(config_path.write_text, yaml.safe_dump(written))
    refused = (await call("POST", f"http://127.0.0.1:{proxy.admin_port}/reload")).json()
    assert not refused["ok"]
    assert "webhooks.listen changed: restart Outrigger" in refused["error"]
    assert (await post(proxy, STRIPE_PATH, BODY, stripe_headers())).status == 200  # the old one still serves


@pytest.fixture
async def gated(start_proxy: StartProxy, secret_file: Path) -> AsyncIterator[tuple[RunningProxy, MemorySink]]:
    sink = MemorySink(gate=asyncio.Event())
    proxy = await start_proxy([], webhook_sink=sink, webhooks=webhooks_section(secret_file, free_port()))
    yield proxy, sink
    assert sink.gate is not None
    sink.gate.set()


async def test_shutdown_waits_for_a_webhook_in_flight(gated: tuple[RunningProxy, MemorySink]) -> None:
    proxy, sink = gated
    request = asyncio.create_task(post(proxy, STRIPE_PATH, BODY, stripe_headers()))
    async with asyncio.timeout(5):
        await sink.entered.wait()
    stopping = asyncio.create_task(proxy.server.stop())
    await asyncio.sleep(0.2)
    assert not stopping.done()  # the listener stopped accepting, but waits for the request
    assert sink.gate is not None
    sink.gate.set()
    assert (await request).status == 200
    async with asyncio.timeout(5):
        await stopping
