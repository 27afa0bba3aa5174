"""Proof under fire (issue 14): 20,000 requests from 200 concurrent clients through a real
`outrigger run` process, 30 % of them sent to upstreams that fail on purpose, one fault class per
policy (host), so each class meets its own handling: retries, the breaker, timeouts.

| class              | upstream                                   | intended handling                     |
| ------------------ | ------------------------------------------ | ------------------------------------- |
| ok (70 %)          | raw: 200, Content-Length body              | passes through, complete              |
| refused            | a port nothing listens on                  | connect-failure: retried, breaker     |
| dns                | ``*.invalid`` (never resolves)             | connect-failure: retried, breaker     |
| tls                | TLS with a certificate nobody trusts       | connect-failure: retried, breaker     |
| reset_before_head  | raw: reads the request, RST                | reset: retried, then 502              |
| reset_mid_head     | raw: half a status line, RST               | reset: retried, then 502              |
| stall              | raw: never answers                         | per_try timeout: retried, then 504    |
| reset_mid_body     | raw: head + part of the body, RST          | never retried: the app sees a cut     |
| short_body         | raw: Content-Length body cut short, FIN    | never retried: the app sees a cut     |
| hang_after_head    | raw: head, then silence                    | idle timeout: the app sees a cut      |
| slow_drip          | raw: body in pieces 100 ms apart           | streams through, complete             |
| storm_503          | aiohttp: 503 for the first seconds, then ok | retries, breaker opens, then recovers |
| storm_429          | aiohttp: 429 Retry-After: 1, then ok       | Retry-After honoured, then recovers   |

What is asserted is in `test_twenty_thousand_requests_with_thirty_percent_faulted`. The load is
bounded in count (REQUESTS) and every request in time (the client deadline); the test as a whole
by its timeout marker.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpServer

from tests.conftest import Launch, free_port, loopback_policy, write_config
from tests.e2e.procs import OutriggerProcess, config_ports, wait_until
from tests.e2e.upstreams import RawScript, RawScriptedUpstream, TlsMaterial, response_bytes
from tests.fakes import ScriptedUpstream

REQUESTS = 20_000
CLIENTS = 200
FAULTED_SHARE = 0.30
WARMUP = 500
SEED = 14

TOTAL_S = 3.0
IDLE_S = 1.0
SLACK_S = 2.0
"""A loaded, shared 2-core machine: how late an answer may be past what the policy promises."""
HEAD_DEADLINE_S = TOTAL_S + SLACK_S
"""The response head (or Outrigger's own error) must arrive within `total`, plus slack."""
CLIENT_DEADLINE_S = TOTAL_S + IDLE_S + SLACK_S
"""The whole exchange: `total` until the head, then a body that is cut after `idle` of silence."""

BUDGET_RATIO = 0.2
BUDGET_MIN_PER_S = 2
BUDGET_WINDOW_S = 5.0
BUDGET = {"ratio": BUDGET_RATIO, "min_per_second": BUDGET_MIN_PER_S, "window": f"{BUDGET_WINDOW_S:g}s"}
STORM_S = 4.0
"""The storms last this long from their first request; the last part of the run sees recovery."""
RSS_GROWTH_LIMIT_MIB = 20.0
"""RSS after the run may exceed the warmed-up level by this much (CPython keeps freed arenas)."""
FD_TOLERANCE = 2

BODY = bytes(range(256)) * 8
"""2 KiB, every byte value: a short or mangled body cannot pass for it."""
CUT_AT = 512


def _head(length: int = len(BODY)) -> bytes:
    return response_bytes(
        f"HTTP/1.1 200 OK\nContent-Length: {length}\nContent-Type: application/octet-stream"
    )


RAW_SCRIPTS = {
    "/ok": RawScript(_head() + BODY),
    "/reset_before_head": RawScript(b"", after="reset"),
    "/reset_mid_head": RawScript(b"HTTP/1.1 200 OK\r\nContent-Len", after="reset"),
    "/stall": RawScript(b"", pause=3.0, after="close"),
    "/reset_mid_body": RawScript(_head() + BODY[:CUT_AT], pause=0.05, after="reset"),
    "/short_body": RawScript(_head() + BODY[:CUT_AT], after="close"),
    "/hang_after_head": RawScript(_head(), pause=3.0, after="close"),
    "/slow_drip": RawScript(
        _head(), trickle=tuple(BODY[i : i + 256] for i in range(0, len(BODY), 256)), trickle_interval=0.1
    ),
}
FAULTS = [
    "refused",
    "dns",
    "tls",
    "reset_before_head",
    "reset_mid_head",
    "stall",
    "reset_mid_body",
    "short_body",
    "hang_after_head",
    "slow_drip",
    "storm_503",
    "storm_429",
]
CUT = "cut"
"""Outcome: a head arrived, then the body broke off before its framing said it was complete."""
OK = "200 complete"
UNREACHABLE = "502 upstream_unreachable"
CIRCUIT_OPEN = "503 circuit_open"
ALLOWED: dict[str, set[str]] = {
    "ok": {OK},
    "refused": {UNREACHABLE, CIRCUIT_OPEN},
    "dns": {UNREACHABLE, CIRCUIT_OPEN},
    "tls": {UNREACHABLE, CIRCUIT_OPEN},
    "reset_before_head": {UNREACHABLE},
    "reset_mid_head": {UNREACHABLE},
    "stall": {"504 timeout", CIRCUIT_OPEN},
    "reset_mid_body": {CUT},
    "short_body": {CUT},
    "hang_after_head": {CUT},
    "slow_drip": {OK},
    "storm_503": {OK, "503 upstream", CIRCUIT_OPEN},
    "storm_429": {OK, "429 upstream"},
}
"""Every final answer a class may get. Retried classes also must show retries in /metrics."""
RETRIED = {"refused", "dns", "tls", "reset_before_head", "reset_mid_head", "stall", "storm_503", "storm_429"}
BREAKER_OPENS = {"refused", "dns", "tls", "storm_503"}


def host_of(fault: str) -> str:
    return f"{fault.replace('_', '-')}.chaos"


def _policy(name: str, upstream: str, **extra: Any) -> dict[str, Any]:
    return loopback_policy(
        upstream,
        host=host_of(name),
        timeouts={"connect": "500ms", "per_try": "500ms", "total": f"{TOTAL_S:g}s", "idle": f"{IDLE_S:g}s"},
        retries={
            "max_attempts": 3,
            "on": ["connect-failure", "reset", "timeout", 502, 503, 504, 429],
            "backoff": {"base": "20ms", "max": "200ms"},
            "retry_after": {"honour": True, "max": "2s"},
            "budget": BUDGET,
        },
        circuit_breaker={"failure_threshold": 5, "reset_timeout": "1s", "half_open_max": 1},
        idempotency={"header": "Idempotency-Key", "methods": ["POST"]},
        **extra,
    )


# --------------------------------------------------------------------------- the upstreams


def storm(status: int, headers: dict[str, str]) -> Any:
    """An aiohttp handler: `status` for STORM_S seconds from its first request, then 200 BODY."""
    began: list[float] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        now = time.monotonic()
        began[:] = began or [now]
        if now - began[0] < STORM_S:
            return web.Response(status=status, headers=headers, text=f"storm {status}")
        return web.Response(body=BODY, content_type="application/octet-stream")

    return handle


@dataclass
class Ledger:
    """What the upstreams received, per request id: (method, idempotency key) of every attempt."""

    attempts: dict[int, list[tuple[str, str | None]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, method: str, headers: dict[str, str]) -> None:
        if "x-chaos-id" in headers:
            self.attempts[int(headers["x-chaos-id"])].append((method, headers.get("idempotency-key")))

    def add_raw_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.add(lines[0].split(" ", 1)[0], headers)


# --------------------------------------------------------------------------- the app's side


@dataclass(frozen=True)
class Planned:
    id: int
    fault: str
    method: str
    app_key: str | None


@dataclass
class Answer:
    outcome: str
    head_after: float | None
    """Seconds from sending until the response head arrived (None: no head)."""
    done_after: float


def plan(rng: random.Random) -> list[Planned]:
    planned = []
    for index in range(REQUESTS):
        fault = rng.choice(FAULTS) if rng.random() < FAULTED_SHARE else "ok"
        method = rng.choices(["GET", "POST", "PATCH"], weights=[60, 25, 15])[0]
        app_key = f"app-key-{index}" if method == "POST" and rng.random() < 0.5 else None
        planned.append(Planned(index, fault, method, app_key))
    return planned


async def send(client: aiohttp.ClientSession, port: int, request: Planned) -> Answer:
    headers = {"Host": host_of(request.fault), "X-Chaos-Id": str(request.id)}
    if request.app_key is not None:
        headers["Idempotency-Key"] = request.app_key
    data = b"payload-%d" % request.id if request.method != "GET" else None
    loop = asyncio.get_running_loop()
    started = loop.time()
    head_after: float | None = None
    try:
        async with client.request(
            request.method, f"http://127.0.0.1:{port}/{request.fault}", headers=headers, data=data
        ) as response:
            head_after = loop.time() - started
            error = response.headers.get("x-outrigger-error")
            try:
                body = await response.read()
            except aiohttp.ClientPayloadError:
                return Answer(CUT, head_after, loop.time() - started)
            if error is not None:
                outcome = f"{response.status} {error}"
            elif response.status == 200:
                outcome = OK if body == BODY else f"200 with a wrong body of {len(body)} bytes"
            else:
                outcome = f"{response.status} upstream"
    except (aiohttp.ClientError, TimeoutError) as exc:
        state = "after the head" if head_after is not None else "before any head"
        outcome = f"client error {state}: {type(exc).__name__}"
    return Answer(outcome, head_after, loop.time() - started)


async def drive(port: int, planned: list[Planned]) -> tuple[dict[int, list[Answer]], float]:
    """Every planned request from CLIENTS concurrent workers; returns the answers per id and how
    long the run took."""
    answers: dict[int, list[Answer]] = defaultdict(list)
    queue: asyncio.Queue[Planned] = asyncio.Queue()
    for request in planned:
        queue.put_nowait(request)
    connector = aiohttp.TCPConnector(limit=CLIENTS, force_close=False)
    timeout = aiohttp.ClientTimeout(total=CLIENT_DEADLINE_S)

    async def worker(client: aiohttp.ClientSession) -> None:
        while not queue.empty():
            request = queue.get_nowait()
            answers[request.id].append(await send(client, port, request))

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as client:
        await asyncio.gather(*(worker(client) for _ in range(CLIENTS)))
    return answers, time.monotonic() - started


# --------------------------------------------------------------------------- the proxy process


def metric_values(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                values[tuple(sorted(sample.labels.items()))] = sample.value
    return values


def per_host(values: dict[tuple[tuple[str, str], ...], float]) -> Counter[str]:
    totals: Counter[str] = Counter()
    for labels, value in values.items():
        totals[dict(labels)["host"]] += int(value)
    return totals


async def metrics_text(admin_port: int) -> str:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client,
        client.get(f"http://127.0.0.1:{admin_port}/metrics") as response,
    ):
        return await response.text()


@dataclass(frozen=True)
class Usage:
    fds: int
    rss_mib: float


def usage(process: OutriggerProcess) -> Usage:
    proc = psutil.Process(process.pid)
    return Usage(proc.num_fds(), proc.memory_info().rss / 2**20)


@pytest.fixture
async def upstreams(aiohttp_server: AiohttpServer, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    tls = TlsMaterial.create(tmp_path)
    tls_app = web.Application()
    tls_server = await aiohttp_server(tls_app, ssl=tls.server_context())
    storms = {
        "storm_503": await ScriptedUpstream(storm(503, {})).start(aiohttp_server),
        "storm_429": await ScriptedUpstream(storm(429, {"Retry-After": "1"})).start(aiohttp_server),
    }
    async with RawScriptedUpstream(RAW_SCRIPTS, max_requests_per_connection=REQUESTS) as raw:
        yield {"raw": raw, "tls_port": tls_server.port, **storms}


async def test_twenty_thousand_requests_with_thirty_percent_faulted(
    upstreams: dict[str, Any], launch: Launch, tmp_path: Path
) -> None:
    raw: RawScriptedUpstream = upstreams["raw"]
    policies = [_policy(path.lstrip("/"), raw.url) for path in RAW_SCRIPTS]
    policies += [
        _policy("refused", f"http://127.0.0.1:{free_port()}"),
        _policy("dns", "http://chaos-upstream.invalid:8080"),
        _policy("tls", f"https://localhost:{upstreams['tls_port']}"),
        _policy("storm_503", upstreams["storm_503"].url),
        _policy("storm_429", upstreams["storm_429"].url),
    ]
    config = write_config(tmp_path, policies)
    port, admin_port = config_ports(config)
    process = launch(config)
    await process.wait_ready(within=20)
    before = usage(process)
    planned = plan(random.Random(SEED))

    warmup = [Planned(-1 - i, "ok", "GET", None) for i in range(WARMUP)]
    warm_answers, _ = await drive(port, warmup)
    assert all(a[0].outcome == OK for a in warm_answers.values())
    warm = usage(process)

    answers, duration = await drive(port, planned)
    text = await metrics_text(admin_port)
    ledger = Ledger()
    for head in raw.heads:
        ledger.add_raw_head(head)
    for name in ("storm_503", "storm_429"):
        for seen in upstreams[name].seen:
            ledger.add(seen.method, {k.lower(): v for k, v in seen.headers.items()})

    # Every request: exactly one final answer, of a kind its class allows, before its deadline.
    assert sorted(answers) == list(range(REQUESTS))
    assert all(len(a) == 1 for a in answers.values())
    by_fault: dict[str, Counter[str]] = defaultdict(Counter)
    for request in planned:
        by_fault[request.fault][answers[request.id][0].outcome] += 1
    wrong = {
        fault: {o: n for o, n in outcomes.items() if o not in ALLOWED[fault]}
        for fault, outcomes in by_fault.items()
    }
    assert not any(wrong.values()), (wrong, dict(by_fault))
    heads = [a[0].head_after for a in answers.values() if a[0].head_after is not None]
    late_heads = [after for after in heads if after > HEAD_DEADLINE_S]
    assert not late_heads, f"{len(late_heads)} heads later than {HEAD_DEADLINE_S}s: {sorted(late_heads)[-5:]}"
    assert max(x[0].done_after for x in answers.values()) < CLIENT_DEADLINE_S

    # A truncated upstream body never reaches the app as complete: every cut class was cut, always.
    for fault in ("reset_mid_body", "short_body", "hang_after_head"):
        assert by_fault[fault] == Counter({CUT: sum(by_fault[fault].values())}), by_fault[fault]

    # The ledger: a POST without a key is never sent twice (PATCH carries none: never retried);
    # every attempt of a POST carries one key, the app's own when it sent one.
    by_id = {request.id: request for request in planned}
    for request_id, attempts in ledger.attempts.items():
        if request_id < 0:
            continue  # the warm-up
        request = by_id[request_id]
        methods = {method for method, _ in attempts}
        assert methods == {request.method}, (request, attempts)
        keys = {key for _, key in attempts}
        if request.method == "POST":
            assert len(keys) == 1, (request, attempts)
            assert None not in keys, (request, attempts)
            if request.app_key is not None:
                assert keys == {request.app_key}
        else:
            assert keys == {None}, (request, attempts)
        if request.method == "PATCH" or (request.method == "POST" and None in keys):
            assert len(attempts) == 1, (request, attempts)
    retried_ids = [i for i, attempts in ledger.attempts.items() if len(attempts) > 1 and i >= 0]
    assert any(by_id[i].method == "POST" for i in retried_ids), "no POST was retried (with its key)"

    # Retries stay within the budget, per policy: at most ratio x requests, plus min_per_second x
    # window for each budget window the run touched (the floor is granted per sliding window).
    retries = per_host(metric_values(text, "outrigger_retries_total"))
    requests = per_host(metric_values(text, "outrigger_requests_total"))
    windows = math.ceil(duration / BUDGET_WINDOW_S) + 1  # aligned windows the run can touch
    for host, count in retries.items():
        allowed = BUDGET_RATIO * requests[host] + BUDGET_MIN_PER_S * BUDGET_WINDOW_S * windows
        assert count <= allowed, (host, count, requests[host], allowed)
    for fault in RETRIED:
        assert retries[host_of(fault)] > 0, (fault, dict(retries))
    assert retries[host_of("ok")] == 0
    assert sum(requests.values()) == REQUESTS + WARMUP
    for fault in BREAKER_OPENS:
        assert by_fault[fault][CIRCUIT_OPEN] > 0, (fault, by_fault[fault])

    # The storms end and the upstream recovers: the last requests of each storm class succeed.
    for fault in ("storm_503", "storm_429"):
        last = sorted((r for r in planned if r.fault == fault), key=lambda r: r.id)[-20:]
        assert [answers[r.id][0].outcome for r in last] == [OK] * 20, fault

    # Resources come back: upstream and app connections closed, the proxy's fds return to where
    # they were before any traffic and its RSS stays within a bound of the warmed-up level.
    for name in ("storm_503", "storm_429"):
        await upstreams[name].server.close()
    await raw.__aexit__(None, None, None)
    assert await wait_until(
        lambda: usage(process).fds <= before.fds + FD_TOLERANCE, within=10, interval=0.2
    ), (
        before,
        usage(process),
    )
    after = usage(process)
    assert after.rss_mib <= warm.rss_mib + RSS_GROWTH_LIMIT_MIB, (before, warm, after)
    print(  # the figures docs/reliability.md quotes
        f"\nchaos: {REQUESTS} requests in {duration:.1f}s ({REQUESTS / duration:.0f}/s), {CLIENTS} clients;"
        f" retries {dict(retries)}; usage before {before}, warm {warm}, after {after}"
    )
    for fault, outcomes in sorted(by_fault.items()):
        print(f"  {fault:18} {dict(outcomes)}")
