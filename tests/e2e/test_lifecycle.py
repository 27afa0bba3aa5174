"""`outrigger run` as a real process: readiness, loopback-only listeners, SIGTERM drain,
exit codes and `FILE:LINE: key.path: message` errors (SPEC 1, 3, 7, 8)."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from proxy.config.loader import load_config
from tests.conftest import Launch, free_port, loopback_policy, write_config
from tests.e2e.procs import config_ports, outrigger_command, port_refuses


class SlowUpstream:
    """/slow?delay=S answers ``done`` after S seconds; `received` is set when a request arrives."""

    def __init__(self) -> None:
        self.received = asyncio.Event()
        self.server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def app(self) -> web.Application:
        async def slow(request: web.Request) -> web.Response:
            self.received.set()
            await asyncio.sleep(float(request.query.get("delay", "0")))
            return web.Response(text="done")

        app = web.Application()
        app.router.add_get("/{tail:.*}", slow)
        return app


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> SlowUpstream:
    slow = SlowUpstream()
    slow.server = await aiohttp_server(slow.app())
    return slow


async def _get(url: str, host: str = "upstream.test") -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
        client.get(url, headers={"Host": host}) as response,
    ):
        return response.status, await response.text()


async def _settle(task: asyncio.Task[tuple[int, str]], within: float = 2) -> tuple[int, str] | BaseException:
    """The request's outcome (result or exception); cancels it if still running after `within` s."""
    await asyncio.wait({task}, timeout=within)
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1)
        return TimeoutError("still running")
    return task.exception() or task.result()


# --------------------------------------------------------------------------- up and ready


async def test_healthz_and_readyz_once_up(upstream: SlowUpstream, launch: Launch, tmp_path: Path) -> None:
    config = write_config(tmp_path, [loopback_policy(upstream.url)])
    main_port, _ = config_ports(config)
    process = launch(config)
    ready = await process.wait_ready()
    assert ready == {"status": "ready", "config_version": load_config(config).version}
    assert await process.admin_get("/healthz") == (200, {"status": "ok"})
    assert await _get(f"http://127.0.0.1:{main_port}/x") == (200, "done")


async def test_listeners_are_bound_to_loopback_only(
    upstream: SlowUpstream, launch: Launch, tmp_path: Path
) -> None:
    dedicated = free_port()
    config = write_config(tmp_path, [loopback_policy(upstream.url, listen=dedicated)])
    main_port, admin_port = config_ports(config)
    process = launch(config)
    await process.wait_ready()
    listening = {
        (conn.laddr.ip, conn.laddr.port)
        for conn in psutil.Process(process.pid).net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    }
    assert listening == {("127.0.0.1", main_port), ("127.0.0.1", admin_port), ("127.0.0.1", dedicated)}


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_default_listeners_are_loopback_15001_and_15000(
    upstream: SlowUpstream, launch: Launch, tmp_path: Path
) -> None:
    """With no listen/admin sections: 127.0.0.1:15001 and 127.0.0.1:15000, never 0.0.0.0."""
    if not (_port_is_free(15000) and _port_is_free(15001)):
        pytest.skip("the default ports 15000/15001 are in use on this machine")
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "test.yaml").write_text(yaml.safe_dump([loopback_policy(upstream.url)]))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"policy_dirs": ["policies/"]}))
    process = launch(config)
    try:
        await process.wait_ready()
    except AssertionError:
        if "in use" in process.output.lower():
            pytest.skip("a default port was taken while the test started")
        raise
    listening = {
        (conn.laddr.ip, conn.laddr.port)
        for conn in psutil.Process(process.pid).net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    }
    assert listening == {("127.0.0.1", 15001), ("127.0.0.1", 15000)}
    assert await _get("http://127.0.0.1:15001/x") == (200, "done")


# --------------------------------------------------------------------------- shutdown


async def _get_headers(url: str, host: str = "upstream.test") -> tuple[int, str, str]:
    """Status, body and the Connection header of one GET (on a fresh connection)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
        client.get(url, headers={"Host": host}) as response,
    ):
        return response.status, await response.text(), response.headers.get("Connection", "")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_idle_process_stops_cleanly_on_signal(
    upstream: SlowUpstream, launch: Launch, tmp_path: Path, sig: signal.Signals
) -> None:
    config = write_config(tmp_path, [loopback_policy(upstream.url)], drain_idle="300ms")
    main_port, admin_port = config_ports(config)
    process = launch(config)
    await process.wait_ready()
    process.send(sig)
    assert await process.wait_exit(3) == 0, process.output
    assert await port_refuses(main_port)
    assert await port_refuses(admin_port)


async def test_a_request_sent_during_the_drain_is_served_with_connection_close(
    upstream: SlowUpstream, launch: Launch, tmp_path: Path
) -> None:
    """The app's own shutdown-time calls, made after SIGTERM while a slow request drains, go through."""
    dedicated = free_port()
    config = write_config(
        tmp_path,
        [loopback_policy(upstream.url, listen=dedicated)],
        drain_timeout="5s",
        drain_idle="500ms",
    )
    main_port, _ = config_ports(config)
    process = launch(config)
    await process.wait_ready()

    in_flight = asyncio.create_task(_get(f"http://127.0.0.1:{main_port}/slow?delay=1.5"))
    async with asyncio.timeout(5):
        await upstream.received.wait()
    sent = time.monotonic()
    process.send(signal.SIGTERM)
    await asyncio.sleep(0.3)

    assert await _get_headers(f"http://127.0.0.1:{main_port}/late") == (200, "done", "close")
    assert await _get_headers(f"http://127.0.0.1:{dedicated}/late") == (200, "done", "close")
    status, _, connection = await _get_headers(f"http://127.0.0.1:{main_port}/x", host="nobody.test")
    assert (status, connection) == (403, "close"), "Outrigger's own answers close the connection too"
    status, body = await process.admin_get("/readyz")
    assert (status, body["draining"]) == (503, True), "not ready while draining"
    assert (await process.admin_get("/healthz"))[0] == 200, "alive while draining"
    assert not in_flight.done(), "the slow request is still being served"

    assert await _settle(in_flight, within=5) == (200, "done")
    code = await process.wait_exit(5)
    elapsed = time.monotonic() - sent
    assert code == 0, process.output
    assert 1.5 + 0.4 < elapsed < 5, f"exited {elapsed:.2f}s after SIGTERM (request ~1.5s, drain_idle 0.5s)"
    assert "drain over: nothing in flight for drain_idle" in process.output


async def test_with_no_traffic_the_process_exits_drain_idle_after_sigterm(
    upstream: SlowUpstream, launch: Launch, tmp_path: Path
) -> None:
    config = write_config(tmp_path, [loopback_policy(upstream.url)], drain_timeout="20s", drain_idle="500ms")
    main_port, _ = config_ports(config)
    process = launch(config)
    await process.wait_ready()
    sent = time.monotonic()
    process.send(signal.SIGTERM)
    await asyncio.sleep(0.2)
    assert not await port_refuses(main_port), "the listener stays open during drain_idle"
    code = await process.wait_exit(5)
    elapsed = time.monotonic() - sent
    assert code == 0, process.output
    assert 0.4 <= elapsed < 3, f"exited {elapsed:.2f}s after SIGTERM with drain_idle 500ms"
    assert "draining: " in process.output
    assert "drain over: nothing in flight for drain_idle" in process.output


async def test_a_second_signal_exits_at_once(upstream: SlowUpstream, launch: Launch, tmp_path: Path) -> None:
    config = write_config(tmp_path, [loopback_policy(upstream.url)], drain_timeout="20s", drain_idle="5s")
    main_port, _ = config_ports(config)
    process = launch(config)
    await process.wait_ready()
    in_flight = asyncio.create_task(_get(f"http://127.0.0.1:{main_port}/slow?delay=10"))
    async with asyncio.timeout(5):
        await upstream.received.wait()
    process.send(signal.SIGTERM)
    await asyncio.sleep(0.3)
    assert await process.wait_exit(0) is None, "still draining"
    sent = time.monotonic()
    process.send(signal.SIGINT)
    code = await process.wait_exit(3)
    elapsed = time.monotonic() - sent
    assert code == 0, process.output
    assert elapsed < 1.5, f"exited {elapsed:.2f}s after the second signal"
    assert "second signal" in process.output
    outcome = await _settle(in_flight)
    assert not isinstance(outcome, TimeoutError), "the app's connection was left hanging"


async def test_drain_timeout_bounds_shutdown(upstream: SlowUpstream, launch: Launch, tmp_path: Path) -> None:
    config = write_config(tmp_path, [loopback_policy(upstream.url)], drain_timeout="500ms")
    main_port, _ = config_ports(config)
    process = launch(config)
    await process.wait_ready()

    in_flight = asyncio.create_task(_get(f"http://127.0.0.1:{main_port}/slow?delay=5"))
    async with asyncio.timeout(5):
        await upstream.received.wait()
    sent = time.monotonic()
    process.send(signal.SIGTERM)
    code = await process.wait_exit(3)
    elapsed = time.monotonic() - sent
    assert code == 0, process.output
    assert elapsed < 1.5, f"exited {elapsed:.2f}s after SIGTERM with drain_timeout 500ms"
    assert "drain over: drain_timeout reached" in process.output
    # The abandoned request ends promptly (it cannot have been answered by the 5 s upstream).
    outcome = await _settle(in_flight)
    assert not isinstance(outcome, TimeoutError), "the app's connection was left hanging"
    assert not (isinstance(outcome, tuple) and outcome[0] == 200)


async def test_exit_is_bounded_by_one_drain_timeout(
    upstream: SlowUpstream, launch: Launch, tmp_path: Path
) -> None:
    config = write_config(tmp_path, [loopback_policy(upstream.url)], drain_timeout="1500ms")
    main_port, _ = config_ports(config)
    process = launch(config)
    await process.wait_ready()
    in_flight = asyncio.create_task(_get(f"http://127.0.0.1:{main_port}/slow?delay=8"))
    async with asyncio.timeout(5):
        await upstream.received.wait()
    sent = time.monotonic()
    process.send(signal.SIGTERM)
    code = await process.wait_exit(5)
    elapsed = time.monotonic() - sent
    await _settle(in_flight)
    assert code == 0, process.output
    assert elapsed < 1.5 + 0.7, f"exited {elapsed:.2f}s after SIGTERM with drain_timeout 1.5s"


@dataclass
class Outcome:
    started: float
    """When the request was sent, in seconds after the load began."""
    status: int | None
    connection: str
    error: BaseException | None


_CLIENT_PAUSE_S = 0.005
"""Between one client's requests: 400 of them then outlast the 1.6 s of load on a fast machine."""


async def _client_loop(port: int, began: float, until: float, outcomes: list[Outcome]) -> None:
    """One keep-alive client sending GETs nearly back to back until `until` (bounded in requests too)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        for _ in range(400):
            started = time.monotonic() - began
            if started >= until:
                return
            try:
                async with client.get(f"http://127.0.0.1:{port}/x", headers={"Host": "upstream.test"}) as r:
                    await r.read()
                    outcomes.append(Outcome(started, r.status, r.headers.get("Connection", ""), None))
            except (aiohttp.ClientError, OSError, TimeoutError) as error:
                outcomes.append(Outcome(started, None, "", error))
            await asyncio.sleep(_CLIENT_PAUSE_S)


async def test_shutdown_under_load_loses_no_request_and_needs_no_sigkill(
    upstream: SlowUpstream, launch: Launch, tmp_path: Path
) -> None:
    """20 keep-alive clients; SIGTERM after 1 s; they go on for 0.6 s more, then stop. Every request
    is answered 200 (none reset, refused or 5xx), and the process exits 0 drain_idle later by itself."""
    config = write_config(tmp_path, [loopback_policy(upstream.url)], drain_timeout="10s", drain_idle="500ms")
    main_port, _ = config_ports(config)
    process = launch(config)
    await process.wait_ready()
    outcomes: list[Outcome] = []
    began = time.monotonic()
    clients = [asyncio.create_task(_client_loop(main_port, began, 1.6, outcomes)) for _ in range(20)]
    await asyncio.sleep(1.0)
    process.send(signal.SIGTERM)
    signalled = time.monotonic() - began
    await asyncio.wait(clients, timeout=8)
    stopped_sending = time.monotonic()
    code = await process.wait_exit(0.5 + 3)
    exit_after = time.monotonic() - stopped_sending

    assert code == 0, process.output
    assert exit_after < 0.5 + 3, "exit follows drain_idle after the last request"
    failed = [o for o in outcomes if o.status != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} failed, e.g. {failed[:3]}"
    during = [o for o in outcomes if o.started > signalled + 0.1]
    assert len(during) >= 20, f"only {len(during)} requests sent during the drain"
    assert all(o.connection == "close" for o in during), "responses during the drain carry Connection: close"
    assert "drain over: nothing in flight for drain_idle" in process.output


# --------------------------------------------------------------------------- invalid config


def _line_of(path: Path, needle: str) -> int:
    lines = path.read_text().splitlines()
    return next(number for number, text in enumerate(lines, 1) if needle in text)


@pytest.fixture
def broken_config(tmp_path: Path) -> tuple[Path, list[str]]:
    """A config with three problems in two files; returns it and the expected problem prefixes."""
    policy: dict[str, Any] = {
        **loopback_policy("http://127.0.0.1:9"),
        "timeouts": {"per_try": "banana"},
        "retriez": {"max_attempts": 2},
    }
    config = write_config(tmp_path, [policy], drain_timeout="soon").resolve()
    policy_file = (tmp_path / "policies" / "test.yaml").resolve()
    expected = [
        f"{config}:{_line_of(config, 'drain_timeout:')}: drain_timeout: ",
        f"{policy_file}:{_line_of(policy_file, 'per_try:')}: [0].timeouts.per_try: ",
        f"{policy_file}:{_line_of(policy_file, 'retriez:')}: [0].retriez: unknown key",
    ]
    return config, expected


PROBLEM_LINE = re.compile(
    r"^(?P<file>/\S+):(?P<line>\d+): (?P<path>[\w\[\].-]+|\(top level\)): (?P<message>.+)$"
)


def _assert_problems(output: str, expected: list[str]) -> None:
    for prefix in expected:
        matches = [line for line in output.splitlines() if line.startswith(prefix)]
        assert matches, f"missing {prefix!r} in:\n{output}"
        for line in matches:
            assert PROBLEM_LINE.match(line), line


def test_run_with_an_invalid_config_exits_1_and_reports_every_problem(
    broken_config: tuple[Path, list[str]],
) -> None:
    config, expected = broken_config
    result = subprocess.run(
        [*outrigger_command(), "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    _assert_problems(result.stderr, expected)
    assert "Traceback" not in result.stderr


def test_python_m_proxy_check(tmp_path: Path, broken_config: tuple[Path, list[str]]) -> None:
    config, expected = broken_config
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 1
    _assert_problems(result.stdout + result.stderr, expected)

    good_dir = tmp_path / "good"
    good_dir.mkdir()
    good = write_config(good_dir, [loopback_policy("http://127.0.0.1:9")])
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "-c", str(good)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert load_config(good).version in result.stdout


def test_run_with_a_missing_config_file_exits_1(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = subprocess.run(
        [*outrigger_command(), "run", "-c", str(missing)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 1
    assert re.search(rf"^{re.escape(str(missing.resolve()))}:1: ", result.stderr, re.MULTILINE), result.stderr
