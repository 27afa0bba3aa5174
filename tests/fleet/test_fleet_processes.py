"""Fleet mode with real processes (SPEC 12): three `outrigger run` sidecars share one Redis.

Each sidecar has its own main config (``fleet:`` naming the test's `redis_server` and a key prefix
of the test's own) and the same policy, ``fleet.test``, on a dedicated port of its own, in front of
one aiohttp upstream in the test process that records when each request arrived and from which
sidecar (the ``X-Sidecar`` header the load sends, which Outrigger passes through).

- a ``scope: fleet`` rate limit holds for the fleet as a whole, not per sidecar;
- with Redis killed mid-run nothing fails: each sidecar falls back to its local bucket (the fleet
  then passes about three times the rate), shows it in /metrics and /state, and rejoins the shared
  bucket when Redis is back;
- a ``scope: fleet`` breaker opened through one sidecar refuses requests on the others at once.

Every wait is bounded; every listener is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpServer

from tests.conftest import free_port, loopback_policy, write_config
from tests.e2e.procs import ERROR_HEADER, OutriggerProcess, assert_error, config_ports, wait_until
from tests.fleet.conftest import RedisServer

HOST = "fleet.test"
"""The one policy's name (its first host), the same in every sidecar: what the fleet shares."""
RATE = 50
FLEET_RATE_LIMIT = {"rate": RATE, "per": "1s", "burst": 1, "max_wait": "100ms", "scope": "fleet"}
FLEET_BREAKER = {"failure_threshold": 3, "reset_timeout": "30s", "scope": "fleet"}
BACKEND_UP = "outrigger_fleet_backend_up"

WORKERS = 10
"""Concurrent clients per sidecar: always more demand than even a sidecar's local limit."""
REFUSED_PAUSE = 0.03
"""A worker's pause after a refusal, so refused requests do not spin the two test CPUs."""
MAX_REQUESTS_PER_WORKER = 5000
"""Bounds every worker loop, whatever its deadline."""
REQUEST_TIMEOUT = 5.0


# --------------------------------------------------------------------------- upstream


@dataclass
class Upstream:
    """Answers every request `status` (body ``upstream says N``) and records (arrival, sidecar)."""

    status: int = 200
    arrivals: list[tuple[float, str]] = field(default_factory=list)
    url: str = ""

    async def start(self, aiohttp_server: AiohttpServer) -> Upstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        server = await aiohttp_server(app)
        self.url = f"http://127.0.0.1:{server.port}"
        return self

    async def _handle(self, request: web.Request) -> web.Response:
        self.arrivals.append((asyncio.get_running_loop().time(), request.headers.get("X-Sidecar", "")))
        return web.Response(status=self.status, text=f"upstream says {self.status}")

    def count(self, start: float, end: float, sidecar: str | None = None) -> int:
        """Requests that arrived in [start, end) (loop time), from `sidecar` or from any."""
        return sum(1 for t, s in self.arrivals if start <= t < end and sidecar in (None, s))

    def shares(self, start: float, end: float, sidecars: list[Sidecar]) -> dict[str, int]:
        return {s.name: self.count(start, end, s.name) for s in sidecars}


# --------------------------------------------------------------------------- sidecars


@dataclass
class Sidecar:
    name: str
    process: OutriggerProcess
    port: int
    """The policy's dedicated port: requests sent there need no Host header."""
    admin_port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def backend_up(self) -> float | None:
        """``outrigger_fleet_backend_up`` as /metrics shows it; None when absent or unreachable."""
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as client,
                client.get(f"http://127.0.0.1:{self.admin_port}/metrics") as response,
            ):
                assert response.status == 200, response.status
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        for family in text_string_to_metric_families(text):
            if family.name == BACKEND_UP:
                assert family.type == "gauge", family
                samples = [s for s in family.samples if s.name == BACKEND_UP]
                assert len(samples) == 1, samples
                assert samples[0].labels == {}, samples
                return float(samples[0].value)
        return None

    async def policy_state(self) -> dict[str, Any]:
        """The policy's entry in /state."""
        status, body = await self.process.admin_get("/state")
        assert status == 200, body
        assert isinstance(body, dict), body
        assert HOST in body, body
        entry: dict[str, Any] = body[HOST]
        return entry


StartFleet = Callable[..., Awaitable[list[Sidecar]]]


@pytest.fixture
def start_fleet(tmp_path: Path) -> Iterator[StartFleet]:
    """Start sidecars ``a``, ``b`` and ``c`` for `redis` with one policy ``fleet.test`` (its
    settings as keywords) and wait until each is ready; every process is killed at teardown."""
    started: list[OutriggerProcess] = []

    async def start(redis: RedisServer, upstream: str, **policy: Any) -> list[Sidecar]:
        fleet = {"redis": redis.url, "key_prefix": f"t-{uuid.uuid4().hex}", "timeout": "50ms"}
        sidecars = []
        for name in ("a", "b", "c"):
            directory = tmp_path / name
            directory.mkdir()
            port = free_port()
            config = write_config(
                directory,
                [loopback_policy(upstream, host=HOST, listen=port, **policy)],
                fleet=fleet,
                drain_idle="100ms",
                drain_timeout="1s",
            )
            _, admin_port = config_ports(config)
            process = OutriggerProcess(config, admin_port, directory)
            started.append(process)
            sidecars.append(Sidecar(name, process.start(), port, admin_port))
        await asyncio.gather(*(s.process.wait_ready(within=20) for s in sidecars))
        return sidecars

    yield start
    for process in started:
        process.kill()


# --------------------------------------------------------------------------- load


Outcome = tuple[int, str | None]
"""Status and ``x-outrigger-error`` of one request; (0, exception name) when the exchange broke."""
ALLOWED: set[Outcome] = {(200, None), (429, "rate_limited")}


@dataclass
class Refusal:
    status: int
    headers: Mapping[str, str]
    body: bytes


class Load:
    """`WORKERS` concurrent clients per sidecar, each sending GETs one after the other until the
    deadline or `stop`; the outcome of every request is counted by sidecar."""

    def __init__(self, sidecars: list[Sidecar]) -> None:
        self.sidecars = sidecars
        self.stop = asyncio.Event()
        self.outcomes: dict[str, Counter[Outcome]] = defaultdict(Counter)
        self.refusals: dict[str, Refusal] = {}
        """The first 429 of each sidecar, to check its shape."""

    async def run(self, until: float) -> None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        connector = aiohttp.TCPConnector(limit=len(self.sidecars) * WORKERS)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as client:
            workers = [self._worker(client, s, until) for s in self.sidecars for _ in range(WORKERS)]
            await asyncio.gather(*workers)

    async def _worker(self, client: aiohttp.ClientSession, sidecar: Sidecar, until: float) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(MAX_REQUESTS_PER_WORKER):
            if self.stop.is_set() or loop.time() >= until:
                return
            outcome: Outcome
            try:
                headers = {"X-Sidecar": sidecar.name}
                async with client.get(f"{sidecar.base}/v1/things", headers=headers) as reply:
                    body = await reply.read()
                    outcome = (reply.status, reply.headers.get(ERROR_HEADER))
                    if reply.status == 429 and sidecar.name not in self.refusals:
                        self.refusals[sidecar.name] = Refusal(reply.status, reply.headers, body)
            except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
                outcome = (0, type(exc).__name__)
            self.outcomes[sidecar.name][outcome] += 1
            if outcome[0] != 200:
                await asyncio.sleep(REFUSED_PAUSE)

    def passed(self, sidecar: Sidecar) -> int:
        return self.outcomes[sidecar.name][(200, None)]

    def assert_passed_or_rate_limited(self) -> None:
        """Every request either went through (200) or was Outrigger's 429 ``rate_limited``."""
        for sidecar in self.sidecars:
            outcomes = self.outcomes[sidecar.name]
            unexpected = {o: n for o, n in outcomes.items() if o not in ALLOWED}
            assert not unexpected, f"sidecar {sidecar.name}: {dict(outcomes)}"
            assert self.passed(sidecar) > 0, f"sidecar {sidecar.name} passed nothing: {dict(outcomes)}"
            refusal = self.refusals.get(sidecar.name)
            assert refusal is not None, f"sidecar {sidecar.name} never refused: the load was too light"
            assert_error(
                refusal.status,
                refusal.headers,
                refusal.body,
                expected_status=429,
                error_type="rate_limited",
                host=HOST,
            )
            assert refusal.headers.get("Retry-After"), dict(refusal.headers)


def per_second(count: int, seconds: float) -> str:
    return f"{count} in {seconds:g}s = {count / seconds:.1f}/s"


async def all_report(sidecars: list[Sidecar], up: float) -> bool:
    values = await asyncio.gather(*(s.backend_up() for s in sidecars))
    return all(v == up for v in values)


async def assert_backend(sidecars: list[Sidecar], section: str, backend: str) -> None:
    """Each sidecar's /state: `section` is fleet-scoped, with its backend `backend`."""
    for sidecar in sidecars:
        state = (await sidecar.policy_state())[section]
        assert state is not None, f"sidecar {sidecar.name}: no {section} in /state"
        assert state["scope"] == "fleet", (sidecar.name, state)
        assert state["fleet_backend"] == backend, (sidecar.name, state)


async def reported(sidecars: list[Sidecar], up: bool, within: float, since: str) -> float:
    """Wait until every sidecar's metric and /state show the backend `up`; the time they all did."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await wait_until(lambda: all_report(sidecars, up=float(up)), within=within, interval=0.05), [
        await s.backend_up() for s in sidecars
    ]
    done = loop.time()
    word = "up" if up else "down"
    print(f"every sidecar reported the backend {word} {done - began:.2f}s after {since}")
    await assert_backend(sidecars, "rate_limit", word)
    return done


# --------------------------------------------------------------------------- rate limit


LOAD_SECONDS = 5.5
WINDOW = (0.25, 5.25)
"""The measured window, in seconds after the load started: clear of the start and the end."""


async def test_a_fleet_rate_limit_is_one_bucket_for_every_sidecar(
    aiohttp_server: AiohttpServer, redis_server: RedisServer, start_fleet: StartFleet
) -> None:
    """rate 50/s, three saturated sidecars for 5.5 s: the upstream sees 50/s +/- 10% in all."""
    upstream = await Upstream().start(aiohttp_server)
    sidecars = await start_fleet(redis_server, upstream.url, rate_limit=FLEET_RATE_LIMIT)
    loop = asyncio.get_running_loop()
    load = Load(sidecars)
    started = loop.time()
    await asyncio.wait_for(load.run(until=started + LOAD_SECONDS), timeout=LOAD_SECONDS + 15)

    start, end = started + WINDOW[0], started + WINDOW[1]
    seconds = end - start
    total = upstream.count(start, end)
    shares = upstream.shares(start, end, sidecars)
    print(f"fleet rate limit: {per_second(total, seconds)} (expected {RATE}/s), by sidecar {shares}")
    assert RATE * seconds * 0.9 <= total <= RATE * seconds * 1.1, (per_second(total, seconds), shares)
    for name, share in shares.items():  # all three take part (one sidecar alone would also make 50/s)
        assert share >= 0.15 * total, (name, shares)
    load.assert_passed_or_rate_limited()
    for sidecar in sidecars:
        assert await sidecar.backend_up() == 1, sidecar.name
    await assert_backend(sidecars, "rate_limit", "up")


async def test_with_redis_gone_each_sidecar_limits_alone_and_rejoins_when_it_is_back(
    aiohttp_server: AiohttpServer, redis_server: RedisServer, start_fleet: StartFleet
) -> None:
    """Redis killed after 2 s of load: no request fails because of it; the fleet passes about
    3 x 50/s (each sidecar its own local 50/s) while /metrics and /state say the backend is down;
    Redis back: each sidecar reports it up within seconds and the fleet is back at 50/s."""
    upstream = await Upstream().start(aiohttp_server)
    sidecars = await start_fleet(redis_server, upstream.url, rate_limit=FLEET_RATE_LIMIT)
    loop = asyncio.get_running_loop()
    load = Load(sidecars)
    started = loop.time()
    running = asyncio.create_task(load.run(until=started + 30))
    try:
        # shared: 50/s for the fleet
        await asyncio.sleep(2.0)
        shared = upstream.count(started + 0.25, started + 2.0)
        print(f"before the kill: {per_second(shared, 1.75)}")
        assert RATE * 1.75 * 0.8 <= shared <= RATE * 1.75 * 1.2, per_second(shared, 1.75)
        assert await all_report(sidecars, up=1), "the fleet backend was not up before the kill"

        # Redis gone: each sidecar on its own bucket
        await asyncio.to_thread(redis_server.stop)
        down_at = await reported(sidecars, up=False, within=3, since="the kill")
        await asyncio.sleep(max(0.0, down_at + 2.2 - loop.time()))
        alone = upstream.count(down_at + 0.2, down_at + 2.2)
        shares = upstream.shares(down_at + 0.2, down_at + 2.2, sidecars)
        print(f"Redis down: {per_second(alone, 2.0)}, by sidecar {shares}")
        assert alone > 100 * 2.0, ("the sidecars still share one limit?", per_second(alone, 2.0), shares)
        for name, share in shares.items():  # failing open means the local limit, not no limit
            assert share <= RATE * 2.0 * 1.1 + 2, ("above its local limit", name, shares)

        # Redis back: everyone rejoins the shared bucket
        await asyncio.to_thread(redis_server.start)
        rejoined = await reported(sidecars, up=True, within=5, since="the restart")
        await asyncio.sleep(max(0.0, rejoined + 2.5 - loop.time()))
        again = upstream.count(rejoined + 0.5, rejoined + 2.5)
        shares = upstream.shares(rejoined + 0.5, rejoined + 2.5, sidecars)
        print(f"after the rejoin: {per_second(again, 2.0)}, by sidecar {shares}")
        assert RATE * 2.0 * 0.8 <= again <= RATE * 2.0 * 1.2, (per_second(again, 2.0), shares)
    finally:
        load.stop.set()
        await asyncio.wait({running}, timeout=REQUEST_TIMEOUT + 5)
    assert running.done(), "the load did not stop"
    running.result()
    load.assert_passed_or_rate_limited()


# --------------------------------------------------------------------------- breaker


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes
    elapsed: float


async def get(client: aiohttp.ClientSession, base: str) -> Reply:
    loop = asyncio.get_running_loop()
    sent = loop.time()
    async with client.get(f"{base}/v1/things") as response:
        body = await response.read()
        return Reply(response.status, response.headers, body, loop.time() - sent)


async def test_a_fleet_breaker_opened_through_one_sidecar_refuses_on_the_others(
    aiohttp_server: AiohttpServer, redis_server: RedisServer, start_fleet: StartFleet
) -> None:
    """Three 503s through sidecar a open the shared breaker: b and c refuse at once with 503
    ``circuit_open`` and the upstream has seen exactly those three requests."""
    upstream = await Upstream(status=503).start(aiohttp_server)
    a, b, c = await start_fleet(redis_server, upstream.url, circuit_breaker=FLEET_BREAKER)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as client:
        for _ in range(3):
            reply = await get(client, a.base)
            assert reply.status == 503, reply
            assert ERROR_HEADER not in reply.headers, "the upstream's own 503, passed through"
            assert reply.body == b"upstream says 503", reply
        assert len(upstream.arrivals) == 3

        for sidecar in (b, c):
            reply = await get(client, sidecar.base)
            assert_error(
                reply.status,
                reply.headers,
                reply.body,
                expected_status=503,
                error_type="circuit_open",
                host=HOST,
            )
            assert reply.elapsed < 0.5, (sidecar.name, reply.elapsed)
            retry_after = reply.headers.get("Retry-After", "")
            assert retry_after.isdigit(), (sidecar.name, retry_after)
            assert 1 <= int(retry_after) <= 30, (sidecar.name, retry_after)
    assert len(upstream.arrivals) == 3, "an open fleet breaker must not contact the upstream"

    for sidecar in (a, b):
        breaker = (await sidecar.policy_state())["circuit_breaker"]
        assert breaker is not None, sidecar.name
        assert breaker["state"] == "open", (sidecar.name, breaker)
        assert breaker["scope"] == "fleet", (sidecar.name, breaker)
        assert breaker["fleet_backend"] == "up", (sidecar.name, breaker)
