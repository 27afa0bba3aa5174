"""The admin API on its own loopback port: health, readiness, effective config and live state.

Each endpoint is driven by real traffic through a real Outrigger so that what
it reports (breaker state and failure count, retry budget, limiter capacity,
provider pause and quota, bulkhead in-flight/queued, replay cache size) is
shown to follow what actually happened.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningProxy, StartProxy, loopback_policy, write_config
from tests.e2e.procs import OutriggerProcess, config_ports
from tests.fakes import AiohttpServerFactory, Gate, ScriptedUpstream, app_request

HOST = "upstream.test"
FAST_BACKOFF = {"base": "10ms", "max": "10ms"}


@pytest.fixture
async def admin() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def get_json(session: aiohttp.ClientSession, proxy: RunningProxy, path: str) -> tuple[int, Any]:
    async with session.get(f"http://127.0.0.1:{proxy.admin_port}{path}") as response:
        assert response.headers["Content-Type"].startswith("application/json")
        return response.status, await response.json()


async def state_of(session: aiohttp.ClientSession, proxy: RunningProxy, policy: str = HOST) -> dict[str, Any]:
    status, body = await get_json(session, proxy, "/state")
    assert status == 200
    section: dict[str, Any] = body[policy]
    return section


# --------------------------------------------------------------------------- health and readiness


async def test_healthz(admin: aiohttp.ClientSession, start_proxy: StartProxy) -> None:
    proxy = await start_proxy([loopback_policy("http://127.0.0.1:9")])
    assert await get_json(admin, proxy, "/healthz") == (200, {"status": "ok"})


async def test_readyz_reports_the_config_version(
    admin: aiohttp.ClientSession, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([loopback_policy("http://127.0.0.1:9")])
    status, body = await get_json(admin, proxy, "/readyz")
    assert status == 200
    assert body == {"status": "ready", "config_version": proxy.config.version}
    assert len(proxy.config.version) >= 8


async def test_readyz_is_503_while_draining(
    admin: aiohttp.ClientSession, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    gate = Gate()
    upstream = await ScriptedUpstream(gate).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)], drain_timeout="10s")
    assert (await get_json(admin, proxy, "/readyz"))[0] == 200
    in_flight = asyncio.create_task(app_request(proxy))
    await gate.wait_arrivals(1)

    stopping = asyncio.create_task(proxy.server.stop())
    try:
        for _ in range(100):
            status, body = await get_json(admin, proxy, "/readyz")
            if status == 503:
                break
            await asyncio.sleep(0.02)
        assert status == 503, body
        assert body == {"status": "not ready", "draining": True}
        assert not stopping.done(), "stop() returned while a request was still in flight"
        assert (await get_json(admin, proxy, "/healthz"))[0] == 200  # alive while draining
    finally:
        gate.open.set()
    assert (await in_flight).status == 200  # drained, not cut
    await asyncio.wait_for(stopping, 10)
    assert (await get_json(admin, proxy, "/readyz"))[0] == 503


# --------------------------------------------------------------------------- /config


async def test_config_is_the_effective_merged_config_with_secrets_redacted(
    admin: aiohttp.ClientSession, tmp_path: Path, start_proxy: StartProxy
) -> None:
    (tmp_path / "token").write_text("sk_live_from_file_123\n")
    policy = loopback_policy(
        "http://127.0.0.1:9",
        timeouts={"per_try": "2s"},
        headers={
            "set": {
                "Authorization": "Bearer ${file:token}",
                "X-Api-Key": "inline-literal-key-456",
                "X-Client": "not-a-secret",
            }
        },
        routes=[{"match": {"method": "POST", "path": "/v1/slow/*"}, "timeouts": {"per_try": "15s"}}],
    )
    proxy = await start_proxy(
        [policy],
        defaults={"timeouts": {"total": "20s"}, "retries": {"max_attempts": 4}},
    )

    status, body = await get_json(admin, proxy, "/config")

    assert status == 200
    assert body["version"] == proxy.config.version
    assert body["version"] == (await get_json(admin, proxy, "/readyz"))[1]["config_version"]
    assert body["last_reload_error"] is None
    assert body["path"] == str(proxy.config.path)
    assert body["main"]["listen"] == {"host": "127.0.0.1", "port": proxy.port}
    assert body["main"]["admin"] == {"host": "127.0.0.1", "port": proxy.admin_port}
    assert body["main"]["defaults"]["timeouts"]["total"] == "20s"
    (shown,) = body["policies"]
    assert shown["hosts"] == [HOST]
    assert shown["upstream"] == "http://127.0.0.1:9"
    assert shown["source"].endswith("policies/test.yaml:1")
    settings = shown["settings"]
    # merged: built-in connect, the policy's per_try, the defaults' total and retries
    assert settings["timeouts"] == {"connect": "2s", "per_try": "2s", "total": "20s", "idle": "1m"}
    assert settings["retries"]["max_attempts"] == 4
    assert settings["allow_private_addresses"] is True
    headers = settings["headers"]["set"]
    assert headers["Authorization"] == "Bearer ${file:token}"  # where it comes from, not what it is
    assert "inline-literal-key-456" not in str(body)
    assert headers["X-Api-Key"] == "<redacted>"
    assert headers["X-Client"] == "not-a-secret"
    (route,) = shown["routes"]
    assert route["match"] == {"method": ["POST"], "path": "/v1/slow/*"}
    assert route["settings"]["timeouts"] == {"connect": "2s", "per_try": "15s", "total": "20s", "idle": "1m"}
    assert route["settings"]["retries"]["max_attempts"] == 4
    assert route["settings"]["headers"]["set"]["X-Api-Key"] == "<redacted>"
    assert "sk_live_from_file_123" not in str(body)


# --------------------------------------------------------------------------- /state


async def test_state_has_a_section_per_policy_and_null_for_absent_layers(
    admin: aiohttp.ClientSession, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        [
            loopback_policy("http://127.0.0.1:9", host="plain.test"),
            loopback_policy(
                "http://127.0.0.1:9",
                host="full.test",
                retries={},
                circuit_breaker={},
                rate_limit={},
                concurrency={},
                idempotency={"replay": {}},
            ),
        ]
    )
    status, body = await get_json(admin, proxy, "/state")
    assert status == 200
    assert set(body) == {"plain.test", "full.test"}
    assert body["plain.test"] == {
        "circuit_breaker": None,
        "retry_budget": None,
        "rate_limit": None,
        "concurrency": None,
        "replay_cache": None,
        "cache": None,
    }
    full = body["full.test"]
    assert full["circuit_breaker"] == {
        "scope": "local",
        "state": "closed",
        "consecutive_failures": 0,
        "transitions": 0,
        "seconds_until_half_open": 0,
    }
    assert full["retry_budget"] == {"requests": 0, "retries": 0}
    assert full["rate_limit"] == {
        "scope": "local",
        "has_capacity": True,
        "tokens": full["rate_limit"]["tokens"],
        "paused_for_seconds": 0.0,
        "queued": {"high": 0, "normal": 0, "low": 0},
        "pacing": None,
        "provider_quota": None,
    }
    assert full["rate_limit"]["tokens"] >= 1
    assert full["concurrency"] == {"in_flight": 0, "queued": 0}


async def test_state_empty_replay_cache_shows_zero_entries(
    admin: aiohttp.ClientSession, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([loopback_policy("http://127.0.0.1:9", idempotency={"replay": {}})])
    assert (await state_of(admin, proxy))["replay_cache"] == {"entries": 0}


async def test_state_breaker_follows_failures(
    admin: aiohttp.ClientSession, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(503, 503, 200, 503, 503, 503).start(aiohttp_server)
    proxy = await start_proxy(
        [loopback_policy(upstream.url, circuit_breaker={"failure_threshold": 3, "reset_timeout": "30s"})]
    )

    failures = []
    for _ in range(3):  # 503, 503, 200: the success resets the count
        await app_request(proxy)
        failures.append((await state_of(admin, proxy))["circuit_breaker"]["consecutive_failures"])
    assert failures == [1, 2, 0]
    for _ in range(3):
        await app_request(proxy)
    breaker = (await state_of(admin, proxy))["circuit_breaker"]
    assert breaker["state"] == "open"
    assert breaker["consecutive_failures"] >= 3
    assert 25 < breaker["seconds_until_half_open"] <= 30


async def test_state_retry_budget_counts_requests_and_retries(
    admin: aiohttp.ClientSession, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(503, 503, 200).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url, retries={"on": [503], "backoff": FAST_BACKOFF})])

    assert (await app_request(proxy)).status == 200
    assert (await app_request(proxy)).status == 200

    assert (await state_of(admin, proxy))["retry_budget"] == {"requests": 2, "retries": 2}


async def test_state_rate_limit_capacity_pause_and_provider_quota(
    admin: aiohttp.ClientSession, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(
        (200, {"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "7", "X-RateLimit-Reset": "60"}, b"ok"),
        (429, {"Retry-After": "30"}, b"slow down"),
    ).start(aiohttp_server)
    proxy = await start_proxy(
        [
            loopback_policy(upstream.url, rate_limit={"rate": 100, "burst": 100}),
            loopback_policy(
                upstream.url,
                host="tight.test",
                rate_limit={"rate": 1, "per": "1m", "burst": 1, "max_wait": "0s"},
            ),
        ]
    )
    assert (await state_of(admin, proxy, "tight.test"))["rate_limit"]["has_capacity"] is True
    assert (await app_request(proxy, host="tight.test")).status == 200
    assert (await state_of(admin, proxy, "tight.test"))["rate_limit"]["has_capacity"] is False

    assert (await app_request(proxy)).status == 429  # the 429 after the tight.test 200
    limiter = (await state_of(admin, proxy))["rate_limit"]
    assert 25 < limiter["paused_for_seconds"] <= 30
    # the quota reported by the first answer is still the last one known for tight.test
    quota = (await state_of(admin, proxy, "tight.test"))["rate_limit"]["provider_quota"]
    assert quota["limit"] == 100
    assert quota["remaining"] == 7
    assert 55 <= quota["reset_seconds"] <= 60
    # and the paused policy refuses locally without calling the upstream
    before = upstream.count
    refused = await app_request(proxy)
    assert refused.status == 429
    assert refused.headers["x-outrigger-error"] == "rate_limited"
    assert upstream.count == before


async def test_state_concurrency_in_flight_and_queued(
    admin: aiohttp.ClientSession, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    gate = Gate()
    upstream = await ScriptedUpstream(gate).start(aiohttp_server)
    proxy = await start_proxy(
        [
            loopback_policy(
                upstream.url, concurrency={"max_in_flight": 2, "max_queued": 5, "queue_timeout": "10s"}
            )
        ]
    )
    requests = [asyncio.create_task(app_request(proxy)) for _ in range(3)]
    try:
        await gate.wait_arrivals(2)
        for _ in range(100):
            concurrency = (await state_of(admin, proxy))["concurrency"]
            if concurrency["queued"] == 1:
                break
            await asyncio.sleep(0.02)
        assert concurrency == {"in_flight": 2, "queued": 1}
    finally:
        gate.open.set()
    assert [r.status for r in await asyncio.gather(*requests)] == [200, 200, 200]
    assert (await state_of(admin, proxy))["concurrency"] == {"in_flight": 0, "queued": 0}


async def test_state_replay_cache_entries(
    admin: aiohttp.ClientSession, aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream((201, {"Content-Type": "application/json"}, b'{"id": 1}')).start(
        aiohttp_server
    )
    proxy = await start_proxy([loopback_policy(upstream.url, idempotency={"replay": {}})])

    for key in ("k-1", "k-2", "k-1"):
        reply = await app_request(proxy, "POST", data=b"amount=1", headers={"Idempotency-Key": key})
        assert reply.status == 201

    assert (await state_of(admin, proxy))["replay_cache"] == {"entries": 2}
    assert upstream.count == 2  # the repeat of k-1 was replayed


# --------------------------------------------------------------------------- its own loopback port


def _refused(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        try:
            sock.connect((host, port))
        except (ConnectionRefusedError, TimeoutError, OSError):
            return True
        return False


async def test_admin_listens_on_its_own_loopback_port_only(tmp_path: Path) -> None:
    config = write_config(tmp_path, [loopback_policy("http://127.0.0.1:9")])
    main_port, admin_port = config_ports(config)
    proc = OutriggerProcess(config, admin_port, tmp_path).start()
    control = socket.socket()
    try:
        ready = await proc.wait_ready()
        assert ready["status"] == "ready"
        # 127.0.0.2 reaches a socket bound to all addresses (control)...
        control.bind(("0.0.0.0", 0))
        control.listen()
        if _refused("127.0.0.2", control.getsockname()[1]):
            pytest.skip("127.0.0.2 is not routed to loopback here")
        # ...but not the admin listener, which is bound to 127.0.0.1 alone
        assert _refused("127.0.0.2", admin_port)
        assert not _refused("127.0.0.1", admin_port)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
            async with client.get(f"http://127.0.0.1:{admin_port}/metrics") as response:
                assert response.status == 200
                assert "outrigger_requests_total" in await response.text()
            # the proxy port does not answer admin paths (it proxies them), the admin port does not proxy
            async with client.get(f"http://127.0.0.1:{main_port}/healthz") as response:
                assert response.status == 403
                assert response.headers["x-outrigger-error"] == "host_not_allowed"
            async with client.get(
                f"http://127.0.0.1:{admin_port}/v1/things", headers={"Host": HOST}
            ) as response:
                assert response.status == 404
                assert "x-outrigger-error" not in response.headers
    finally:
        control.close()
        proc.kill()


def test_admin_defaults_to_loopback_port_15000() -> None:
    from proxy.config.model import MainConfig

    defaults = MainConfig()
    assert (defaults.admin.host, defaults.admin.port) == ("127.0.0.1", 15000)
    assert defaults.admin.port != defaults.listen.port


async def test_proxy_listener_does_not_serve_the_admin_port(start_proxy: StartProxy) -> None:
    proxy = await start_proxy([loopback_policy("http://127.0.0.1:9")])
    assert proxy.admin_port != proxy.port
    assert proxy.server.bound_ports == [proxy.port]
