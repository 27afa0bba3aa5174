"""Shared fixtures: a real Outrigger (in-process, real sockets on 127.0.0.1) built from YAML."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pytest_aiohttp import AiohttpServer

from proxy import event_loop
from proxy.admin import build_admin_app
from proxy.config.loader import Config, load_config
from proxy.config.model import Telemetry as TelemetrySettings
from proxy.reload import Reloader
from proxy.server import ProxyServer
from proxy.server import lifecycle as server_lifecycle
from proxy.telemetry import Telemetry
from proxy.webhooks.sink import EventSink
from tests.e2e.otlp_receiver import OtlpReceiver
from tests.e2e.procs import OutriggerProcess, RawUpstream
from tests.e2e.upstreams import CountingUpstream

_handed_out: set[int] = set()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]] | None:
    """The loop `outrigger run` uses by default (uvloop where installed), so tests see what runs."""
    if event_loop.resolve("auto") == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return None


WEBHOOK_SECRET = "whsec_listener_test"
"""The signing secret the webhook tests' routes read from `secret_file`."""


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """A file holding WEBHOOK_SECRET, for a route's ``${file:...}`` secret."""
    path = tmp_path / "whsec"
    path.write_text(WEBHOOK_SECRET + "\n")
    return path


def free_port() -> int:
    """A port free on 127.0.0.1 now, never the same one twice in a test run."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def write_config(directory: Path, policies: list[dict[str, Any]], **main: Any) -> Path:
    """config.yaml + policies/test.yaml under `directory`; returns the config path."""
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "test.yaml").write_text(yaml.safe_dump(policies))
    settings: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "policy_dirs": ["policies/"],
        **main,
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def write_ca_file_config(directory: Path) -> tuple[Path, Path]:
    """A config (via `write_config`) whose one policy trusts a fresh CA from ``ca.pem`` under
    `directory`; returns the config path and the CA file."""
    ca_file = directory / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    policy = loopback_policy("https://127.0.0.1:9", tls={"ca_file": str(ca_file)})
    return write_config(directory, [policy]), ca_file


@dataclass
class RunningProxy:
    server: ProxyServer
    config: Config

    @property
    def port(self) -> int:
        return self.config.main.listen.port

    @property
    def admin_port(self) -> int:
        return self.config.main.admin.port

    @property
    def url(self) -> str:
        """Base URL of the main listener, e.g. for HTTP_PROXY."""
        return f"http://127.0.0.1:{self.port}"


StartProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
def started_servers() -> list[ProxyServer]:
    """Every `ProxyServer` that `start_proxy` started in this test, in order (e.g. to flush logs)."""
    return []


@pytest.fixture
async def start_proxy(tmp_path: Path, started_servers: list[ProxyServer]) -> AsyncIterator[StartProxy]:
    """Start Outrigger (proxy + admin listeners) from policy dicts and main-config overrides."""
    started: list[tuple[ProxyServer, web.AppRunner]] = []

    async def start(
        policies: list[dict[str, Any]], *, webhook_sink: EventSink | None = None, **main: Any
    ) -> RunningProxy:
        config = load_config(write_config(tmp_path, policies, **main))
        server = ProxyServer(config, webhook_sink)
        admin = web.AppRunner(build_admin_app(server, Reloader(server)), access_log=None)
        await admin.setup()
        await web.TCPSite(admin, "127.0.0.1", config.main.admin.port).start()
        await server.start()
        started.append((server, admin))
        started_servers.append(server)
        return RunningProxy(server, config)

    yield start
    for server, admin in started:
        await server.stop()
        await admin.cleanup()


def loopback_policy(upstream: str, host: str = "upstream.test", **extra: Any) -> dict[str, Any]:
    """A policy for a loopback test upstream (the SSRF guard must be opted out of)."""
    return {"hosts": [host], "upstream": upstream, "allow_private_addresses": True, **extra}


async def start_on_own_port(start_proxy: StartProxy, upstream: str, **policy: Any) -> str:
    """Start Outrigger with one loopback policy for `upstream` on a listen port of its own.

    Returns that port's base URL (``http://127.0.0.1:PORT``): requests sent there need no Host header.
    """
    port = free_port()
    await start_proxy([loopback_policy(upstream, listen=port, **policy)])
    return f"http://127.0.0.1:{port}"


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """One aiohttp client for the whole test: up to 100 connections at once, 20 s per request."""
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


@pytest.fixture
def span_exporter() -> Iterator[tuple[trace.Tracer, InMemorySpanExporter]]:
    """A tracer of its own SDK provider, and the in-memory exporter its spans end in (no sockets)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


@dataclass
class RecordingTelemetry:
    """A `Telemetry` whose spans end in `exporter` and whose access log is written to `stream`."""

    telemetry: Telemetry
    exporter: InMemorySpanExporter
    stream: io.BytesIO


@pytest.fixture
def recording_telemetry(span_exporter: tuple[trace.Tracer, InMemorySpanExporter]) -> RecordingTelemetry:
    tracer, exporter = span_exporter
    stream = io.BytesIO()
    telemetry = Telemetry(TelemetrySettings(), dict, stream)
    telemetry.tracing.tracer = tracer
    return RecordingTelemetry(telemetry, exporter, stream)


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    """A `RawUpstream` answering 200 ``ok``, counting connections and request heads; closed after the test."""
    server = await RawUpstream().start()
    yield server
    await server.close()


@pytest.fixture
async def counting_upstream(aiohttp_server: AiohttpServer) -> CountingUpstream:
    """A running `CountingUpstream` (/slow answers 503 at once until told otherwise)."""
    return await CountingUpstream().start(aiohttp_server)


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    """A local OTLP/HTTP collector. Request it BEFORE `start_proxy` so the proxy (which flushes
    on stop) is torn down first."""
    collector = await OtlpReceiver().start()
    yield collector
    await collector.close()


Launch = Callable[..., OutriggerProcess]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Start `outrigger run -c CONFIG [EXTRA...]` (after `wrapper`, a command that execs it); every
    process is killed at teardown if still alive."""
    started: list[OutriggerProcess] = []

    def start(config: Path, *extra: str, wrapper: Sequence[str] = ()) -> OutriggerProcess:
        process = OutriggerProcess.for_config(config, tmp_path, *extra, wrapper=wrapper).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def access_log(monkeypatch: pytest.MonkeyPatch, started_servers: list[ProxyServer]) -> AccessLog:
    """The access log lines the in-process servers write during the test, parsed: their writers
    get an in-memory stream instead of stdout (pytest owns ``sys.stdout`` while a test runs)."""
    log = AccessLog(started_servers)
    monkeypatch.setattr(
        server_lifecycle, "Telemetry", functools.partial(Telemetry, access_stream=log.captured)
    )
    return log


class AccessLog:
    """The access log as the in-process servers wrote it."""

    def __init__(self, servers: list[ProxyServer]) -> None:
        self.servers = servers
        self.captured = io.BytesIO()

    @property
    def raw(self) -> list[str]:
        """Every line so far (each server's writer flushed first: it writes from a thread)."""
        for server in self.servers:
            server.telemetry.access_log.flush()
        return self.captured.getvalue().decode().splitlines()

    @property
    def entries(self) -> list[dict[str, Any]]:
        parsed = []
        for line in self.raw:  # a line broken in two would not parse
            entry = json.loads(line)
            assert isinstance(entry, dict)
            parsed.append(entry)
        return parsed

    def for_request(self, request_id: str) -> dict[str, Any]:
        found = [e for e in self.entries if e["request_id"] == request_id]
        assert len(found) == 1, f"expected one line for {request_id}, got {found}"
        return found[0]
