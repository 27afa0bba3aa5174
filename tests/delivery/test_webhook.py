"""The ``webhook`` source: which headers reach the app, what a forward request looks like, and how
the dispatcher judges the app's answers (a real `Runtime` and transport against a real aiohttp app).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from pytest_aiohttp import AiohttpServer

from proxy.config.loader import load_config
from proxy.config.model import WebhookRouteSettings
from proxy.delivery.store import Delivery
from proxy.delivery.webhook import WebhookDispatcher, forward_request, stored_headers
from proxy.delivery.worker import Attempt
from proxy.server.runtime import Runtime
from proxy.transport import UpstreamClient
from proxy.webhooks.routes import WebhookRoute
from proxy.webhooks.sink import VerifiedEvent
from tests.conftest import free_port, write_config
from tests.fakes import ScriptedUpstream

PATH = "/webhooks/acme"


def event(headers: list[tuple[str, str]], scheme: str = "github") -> VerifiedEvent:
    return VerifiedEvent(PATH, scheme, "e-1", b"{}", tuple(headers), received_at=0.0)


def stored(headers: tuple[tuple[str, str], ...] = (), body: bytes = b'{"a": 1}', **fields: Any) -> Delivery:
    values: dict[str, Any] = {
        "id": "d1",
        "kind": "webhook",
        "source": PATH,
        "state": "pending",
        "method": "POST",
        "host": "127.0.0.1",
        "path_qs": "/hooks",
        "target": "http://127.0.0.1:9/hooks",
        "traceparent": None,
        "created_at": 0.0,
        "expires_at": 1e12,
        "next_attempt_at": 0.0,
        "attempts": 0,
        "last_status": None,
        "last_error": None,
        "last_attempt_at": None,
        "finished_at": None,
        "headers": headers,
        "body": body,
    }
    return Delivery(**{**values, **fields})


def route(forward: str) -> WebhookRoute:
    settings = WebhookRouteSettings.model_validate(
        {"path": PATH, "verify": {"scheme": "github", "secret": "s"}, "forward": forward}
    )
    return WebhookRoute(settings, keys=(b"s",))


def test_hop_by_hop_host_expect_and_senders_outrigger_headers_are_dropped_the_rest_kept_in_order() -> None:
    headers = stored_headers(
        event(
            [
                ("Host", "hooks.example.com"),
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "named by Connection"),
                ("Keep-Alive", "timeout=5"),
                ("Transfer-Encoding", "chunked"),
                ("TE", "trailers"),
                ("Expect", "100-continue"),
                ("Content-Type", "application/json"),
                ("X-Hub-Signature-256", "sha256=abc"),
                ("X-GitHub-Delivery", "e-1"),
                ("X-Outrigger-Webhook-Verified", "forged"),
                ("x-outrigger-delivery-id", "forged"),
                ("X-Multi", "a"),
                ("X-Multi", "b"),
                ("Content-Length", "2"),
            ]
        )
    )

    assert headers == (
        ("Content-Type", "application/json"),
        ("X-Hub-Signature-256", "sha256=abc"),
        ("X-GitHub-Delivery", "e-1"),
        ("X-Multi", "a"),
        ("X-Multi", "b"),
        ("Content-Length", "2"),
        ("x-outrigger-webhook-verified", "github"),
    )


def test_a_forward_request_goes_to_the_forward_url_with_the_delivery_id_and_the_held_body() -> None:
    delivery = stored((("Content-Type", "application/json"), ("x-outrigger-webhook-verified", "github")))

    request = forward_request(route("http://[::1]:8080/app/hooks?src=outrigger"), delivery, Context(), False)

    assert (request.method, request.path_qs) == ("POST", "/app/hooks?src=outrigger")
    assert (request.target.scheme, request.target.host, request.target.port) == ("http", "::1", 8080)
    assert request.target.authority == "[::1]:8080"
    assert list(request.headers.items()) == [
        ("Content-Type", "application/json"),
        ("x-outrigger-webhook-verified", "github"),
        ("x-outrigger-delivery-id", "d1"),
    ]
    assert request.body.replayable
    assert request.body.length == len(b'{"a": 1}')
    assert request.body.for_attempt() == b'{"a": 1}'
    assert request.settings.allow_private_addresses  # the app is on loopback by design
    assert request.delivery_id == "d1"


def test_an_empty_body_is_sent_as_no_body_of_length_zero() -> None:
    request = forward_request(route("http://127.0.0.1:9/"), stored(body=b""), Context(), False)
    assert (request.body.for_attempt(), request.body.length) == (None, 0)


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient()
    yield upstream
    await upstream.close()


def runtime_for(tmp_path: Path, client: UpstreamClient, forward: str, **delivery: Any) -> Runtime:
    section = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "routes": [
            {
                "path": PATH,
                "verify": {"scheme": "github", "secret": "s"},
                "forward": forward,
                "delivery": {"backoff": {"base": "1s", "max": "30s"}, **delivery},
            }
        ],
    }
    return Runtime.build(
        load_config(write_config(tmp_path, [], webhooks=section)), client, trace.NoOpTracer()
    )


async def test_every_answer_but_a_2xx_is_retried_and_retry_after_is_capped_at_backoff_max(
    tmp_path: Path, client: UpstreamClient, aiohttp_server: AiohttpServer
) -> None:
    app = await ScriptedUpstream(404, 302, (429, {"Retry-After": "3600"}, b"slow"), 500, "reset", 201).start(
        aiohttp_server
    )
    runtime = runtime_for(tmp_path, client, f"{app.url}/hooks")
    dispatcher = WebhookDispatcher(lambda: runtime, lambda: 0.0)
    delivery = stored()
    assert dispatcher.settings(delivery) == runtime.config.main.webhooks.routes[0].delivery  # type: ignore[union-attr]

    attempts = [await dispatcher.send(delivery, Context(), False) for _ in range(6)]

    assert attempts == [
        Attempt(404, None, retryable=True),
        Attempt(302, None, retryable=True),  # redirects are not followed: the app must answer 2xx
        Attempt(429, None, retryable=True, retry_after=30.0),
        Attempt(500, None, retryable=True),
        Attempt(None, "reset", retryable=True),
        Attempt(201),
    ]
    assert [seen.path_qs for seen in app.seen] == ["/hooks"] * 6
    assert app.seen[0].headers["x-outrigger-delivery-id"] == "d1"


async def test_an_app_that_is_not_listening_is_a_retried_connect_failure(
    tmp_path: Path, client: UpstreamClient
) -> None:
    runtime = runtime_for(tmp_path, client, f"http://127.0.0.1:{free_port()}/hooks")
    dispatcher = WebhookDispatcher(lambda: runtime, lambda: 0.0)

    assert await dispatcher.send(stored(), Context(), False) == Attempt(
        None, "connect-failure", retryable=True
    )


def test_an_event_whose_route_is_gone_waits(tmp_path: Path, client: UpstreamClient) -> None:
    runtime = runtime_for(tmp_path, client, "http://127.0.0.1:9/hooks")
    dispatcher = WebhookDispatcher(lambda: runtime, lambda: 0.0)

    why = dispatcher.settings(stored(source="/webhooks/removed"))

    assert isinstance(why, str)
    assert "webhook route /webhooks/removed is not in the current config" in why
