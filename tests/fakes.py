"""Test doubles: a fake clock and a scripted fake `next` for layer unit tests; a scripted real upstream.

`FakeClock` implements `proxy.clock.Clock`: `sleep` records the delay and moves
time forward at once (it only yields to the loop), so backoff, Retry-After,
budgets and TTLs are exact and instant.

`FakeUpstream` is the `next` a layer calls: it reads the request body exactly as
the upstream client would (`request.body.for_attempt()`), records what each
attempt carried, and answers from a script of outcomes (a status, a status with
headers and body, a ready `ProxyResponse`, or an exception to raise).

`ScriptedUpstream` is a real aiohttp server on 127.0.0.1 for end-to-end tests:
it answers from a script (statuses, headers, bodies, or a reset without any
answer) and records each request it received, with its arrival time. `Gate`,
`TokenEndpoint` (an OAuth2 token endpoint) and `body_in_two_parts` are handlers
for its script; `call` and `app_request` are the app's side.
(For exact response bytes per path, on a bare TCP server, see
`tests.e2e.upstreams.RawScriptedUpstream`.)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config.model import Policy, PolicySettings, UpstreamTarget
from proxy.exchange import ProxyRequest, ProxyResponse, RequestBody
from proxy.target import parse_target
from proxy.telemetry import Telemetry
from tests.conftest import RunningProxy

_T = TypeVar("_T")

WALL_START = 1_700_000_000.0
"""FakeClock's epoch time at creation (a whole second, so HTTP-dates are exact)."""


class FakeTimer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A `Clock` whose time only moves when told to (or when something sleeps on it); timers
    (`call_later`) fire, in order and each at its own time, as the time moves past them."""

    def __init__(self, now: float = 1_000.0, wall: float = WALL_START) -> None:
        self._start = now
        self._now = now
        self._wall_start = wall
        self.sleeps: list[float] = []
        self._timers: list[FakeTimer] = []

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._wall_start + (self._now - self._start)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.set(self._now + seconds)
        await asyncio.sleep(0)  # yield like a real sleep would, but take no real time

    def advance(self, seconds: float) -> None:
        self.set(self._now + seconds)

    def set(self, now: float) -> None:
        while due := [t for t in self._timers if not t.cancelled and t.when <= now]:
            timer = min(due, key=lambda t: t.when)
            self._timers.remove(timer)
            self._now = max(self._now, timer.when)
            timer.callback()
        self._timers = [t for t in self._timers if not t.cancelled]
        self._now = now

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self._now + max(0.0, delay), callback)
        self._timers.append(timer)
        return timer

    def next_timer(self) -> float | None:
        """When the earliest pending timer fires (None: none pending)."""
        return min((t.when for t in self._timers if not t.cancelled), default=None)

    async def run(self, awaitable: Awaitable[_T]) -> _T:
        """Await `awaitable`, moving the time to the next timer whenever nothing else can happen."""
        task = asyncio.ensure_future(awaitable)
        for _ in range(100_000):  # bounded: a test never needs this many wake-ups
            for _ in range(10):
                await asyncio.sleep(0)
            if task.done():
                return task.result()
            when = self.next_timer()
            if when is None:
                task.cancel()
                raise AssertionError("stuck: the awaitable waits for no timer of this clock")
            self.set(max(when, self._now))
        task.cancel()
        raise AssertionError("still not done after 100000 timers")


class RecordingUniform:
    """A deterministic stand-in for `random.uniform`: returns `lo + fraction * (hi - lo)`, records calls."""

    def __init__(self, fraction: float = 1.0) -> None:
        self.fraction = fraction
        self.calls: list[tuple[float, float]] = []

    def __call__(self, lo: float, hi: float) -> float:
        self.calls.append((lo, hi))
        return lo + self.fraction * (hi - lo)


class TrackedBody:
    """A response body that remembers whether it was released and can be read in several chunks."""

    def __init__(self, data: bytes = b"", chunk_size: int | None = None) -> None:
        self.data = data
        self.chunk_size = chunk_size
        self.released = False
        self.read = False

    async def chunks(self) -> AsyncIterator[bytes]:
        self.read = True
        size = self.chunk_size or max(1, len(self.data))
        for start in range(0, len(self.data), size):
            yield self.data[start : start + size]

    def whole(self) -> bytes | None:
        return None  # read through chunks(), so tests can see that it was read

    def release(self) -> None:
        self.released = True


async def read_body(response: ProxyResponse) -> bytes:
    return b"".join([chunk async for chunk in response.body.chunks()])


def make_response(
    status: int,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    chunk_size: int | None = None,
) -> ProxyResponse:
    return ProxyResponse(status, CIMultiDict(headers or {}), TrackedBody(body, chunk_size))


Outcome = int | tuple[int, Mapping[str, str]] | tuple[int, Mapping[str, str], bytes] | ProxyResponse
Script = Outcome | BaseException | type[BaseException] | Callable[[], Outcome]


@dataclass
class SeenAttempt:
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes | None


@dataclass
class FakeUpstream:
    """The fake `next`: answers attempt i with `script[i]` (the last entry repeats)."""

    script: Sequence[Script]
    gate: asyncio.Event | None = None
    """When set, every attempt waits for it after recording the request (to hold requests in flight)."""
    attempts: list[SeenAttempt] = field(default_factory=list)
    responses: list[ProxyResponse] = field(default_factory=list)
    raised: list[BaseException] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.attempts)

    async def __call__(self, request: ProxyRequest) -> ProxyResponse:
        body = request.body.for_attempt()
        data = body if body is None or isinstance(body, bytes) else b"".join([c async for c in body])
        self.attempts.append(SeenAttempt(request.method, request.path_qs, request.headers.copy(), data))
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), timeout=5)
        step = self.script[min(len(self.attempts), len(self.script)) - 1]
        if isinstance(step, type):
            step = step(f"fake failure on attempt {len(self.attempts)}")
        if isinstance(step, BaseException):
            self.raised.append(step)
            raise step
        outcome: Outcome = step() if callable(step) else step
        response = _to_response(outcome)
        self.responses.append(response)
        return response


def _to_response(outcome: Outcome) -> ProxyResponse:
    if isinstance(outcome, ProxyResponse):
        return outcome
    if isinstance(outcome, int):
        return make_response(outcome)
    if len(outcome) == 2:
        return make_response(outcome[0], outcome[1])
    return make_response(outcome[0], outcome[1], outcome[2])


def fake_upstream(*script: Script, gate: asyncio.Event | None = None) -> FakeUpstream:
    """Build a fake `next` handler, e.g. ``fake_upstream(503, errors.ConnectFailure, 200)``."""
    return FakeUpstream(list(script), gate=gate)


def settings_from(**sections: Any) -> PolicySettings:
    """PolicySettings from plain dicts, validated exactly like a policy file ("100ms", "1MiB"...)."""
    return PolicySettings.model_validate(sections)


async def _iterate(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def make_request(
    method: str = "GET",
    path_qs: str = "/v1/things",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    *,
    chunk_size: int | None = None,
    known_length: bool = True,
    settings: PolicySettings | None = None,
    deadline: float | None = None,
) -> ProxyRequest:
    """A ProxyRequest as the server builds it; the body arrives as a stream of `chunk_size` chunks."""
    settings = settings or PolicySettings()
    target = UpstreamTarget(scheme="http", host="api.test", port=80)
    policy = Policy(
        hosts=("api.test",), upstream=target, listen=None, settings=settings, routes=(), source="test:1"
    )
    source: AsyncIterator[bytes] | None = None
    length: int | None = None
    if body is not None:
        size = chunk_size or max(1, len(body))
        source = _iterate([body[i : i + size] for i in range(0, len(body), size)])
        length = len(body) if known_length else None
    return ProxyRequest(
        method=method,
        host="api.test",
        target=target,
        path_qs=path_qs,
        headers=CIMultiDict(headers or {}),
        body=RequestBody(source, length),
        policy=policy,
        settings=settings,
        deadline=deadline,
    )


# --- e2e: a real aiohttp upstream that misbehaves on purpose ------------------------------------

AiohttpServerFactory = Callable[..., Awaitable[TestServer]]

Step = int | tuple[int, Mapping[str, str], bytes] | Literal["reset"] | Callable[[web.Request], Awaitable[Any]]
"""How the upstream answers one request: a status, (status, headers, body), "reset" (close the
connection without answering), or a handler of its own."""


@dataclass
class SeenRequest:
    """One request as the upstream received it (complete body), with its arrival time."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes
    at: float


class ScriptedUpstream:
    """An aiohttp upstream: answers request i with `steps[i]` (the last repeats), records every request."""

    def __init__(self, *steps: Step, delay: float = 0.0) -> None:
        assert steps, "at least one step"
        self.steps = steps
        self.delay = delay
        self.seen: list[SeenRequest] = []
        self.server: TestServer | None = None

    @property
    def count(self) -> int:
        return len(self.seen)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def keys(self, header: str = "Idempotency-Key") -> list[str | None]:
        return [seen.headers.get(header) for seen in self.seen]

    async def start(self, aiohttp_server: AiohttpServerFactory) -> ScriptedUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = await aiohttp_server(app)
        return self

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            body += chunk
        self.seen.append(
            SeenRequest(
                request.method, request.path_qs, CIMultiDict(request.headers), bytes(body), time.monotonic()
            )
        )
        step = self.steps[min(len(self.seen), len(self.steps)) - 1]
        if self.delay:
            await asyncio.sleep(self.delay)
        if step == "reset":
            assert request.transport is not None
            request.transport.abort()  # no status line, no headers: the connection just ends
            raise asyncio.CancelledError
        if isinstance(step, int):
            return web.Response(status=step, text=f"status {step}")
        if isinstance(step, tuple):
            status, headers, data = step
            return web.Response(status=status, headers=dict(headers), body=data)
        result: web.StreamResponse = await step(request)
        return result


class Gate:
    """An upstream handler that holds every request until opened (bounded by `hold_limit` seconds)."""

    def __init__(self, text: str = "released", hold_limit: float = 10.0) -> None:
        self.open = asyncio.Event()
        self.arrived = 0
        self.text = text
        self.hold_limit = hold_limit

    async def __call__(self, request: web.Request) -> web.Response:
        self.arrived += 1
        await asyncio.wait_for(self.open.wait(), self.hold_limit)
        return web.Response(text=self.text)

    async def wait_arrivals(self, count: int, within: float = 5.0) -> None:
        for _ in range(int(within / 0.02)):
            if self.arrived >= count:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"only {self.arrived} of {count} requests reached the upstream")


class TokenEndpoint:
    """An OAuth2 token endpoint handler for `ScriptedUpstream`: issues ``token-1``, ``token-2``, ...
    (each call after `delay` seconds), or answers `failure` (status, body) while that is set."""

    def __init__(self, expires_in: int | None = 3600, delay: float = 0.0, prefix: str = "token") -> None:
        self.expires_in = expires_in
        self.delay = delay
        self.prefix = prefix
        self.issued: list[str] = []
        self.failure: tuple[int, str] | None = None

    async def __call__(self, request: web.Request) -> web.Response:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failure is not None:
            status, text = self.failure
            return web.Response(status=status, text=text, content_type="application/json")
        token = f"{self.prefix}-{len(self.issued) + 1}"
        self.issued.append(token)
        document: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if self.expires_in is not None:
            document["expires_in"] = self.expires_in
        return web.json_response(document)


def body_in_two_parts(
    first: bytes, rest: bytes, pause: float = 0.3
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An upstream handler that streams `first` at once and `rest` only after `pause` seconds."""

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(first)
        await asyncio.sleep(pause)
        await response.write(rest)
        await response.write_eof()
        return response

    return handle


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


CALL_TIMEOUT = aiohttp.ClientTimeout(total=20)


async def call(method: str, url: str, **kwargs: Any) -> Reply:
    """One request with a fresh aiohttp client (no pooling across calls), body read whole, 20 s max."""
    async with (
        aiohttp.ClientSession(timeout=CALL_TIMEOUT) as client,
        client.request(method, url, **kwargs) as resp,
    ):
        return Reply(resp.status, CIMultiDict(resp.headers), await resp.read())


async def app_request(
    proxy: RunningProxy,
    method: str = "GET",
    path: str = "/v1/things",
    host: str = "upstream.test",
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> Reply:
    """What an app sends through `proxy`'s main listener, with `Host: host`."""
    return await call(method, f"{proxy.url}{path}", headers={"Host": host, **(headers or {})}, data=data)


async def app_get(proxy: RunningProxy, path: str, **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
    """`app_request` GET `path` with `Host: upstream.test` (plus `headers`), as (status, headers, body)."""
    reply = await app_request(proxy, "GET", path, headers=headers)
    return reply.status, reply.headers, reply.body


async def admin_state(proxy: RunningProxy) -> dict[str, Any]:
    """The admin API's ``/state`` document."""
    reply = await call("GET", f"http://127.0.0.1:{proxy.admin_port}/state")
    body: dict[str, Any] = reply.json()
    return body


def finish_request(telemetry: Telemetry, request: ProxyRequest | None) -> None:
    """One GET /v1 through `telemetry`, answered 200 by policy ``api.test``: what the server does."""
    observation = telemetry.start("GET", CIMultiDictProxy(CIMultiDict()), parse_target("/v1", "api.test"))
    telemetry.finish(
        observation,
        status=200,
        error_type=None,
        policy="api.test",
        request=request,
        state=None,
        config_version="v1",
    )
