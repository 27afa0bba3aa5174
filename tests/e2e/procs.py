"""Helpers for the end-to-end tests.

- `OutriggerProcess`: `outrigger run -c CONFIG` as a real subprocess (signals, exit codes).
  `config_ports` reads the main and admin ports a config file sets.
- `wait_until` / `port_refuses`: bounded polling, and "nothing listens there any more".
- `wait_for_http_ok` / `stop_process`: start-up and shutdown of any server subprocess.
- `RawUpstream`: a tiny HTTP/1.1 upstream on asyncio streams that counts TCP connections
  (not just requests), so a test can prove the proxy never even connected.
- `assert_error`: the SPEC 5 error shape (status, JSON body, ``x-outrigger-error``).

Every wait here is bounded in time and in iterations.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest
import requests
import yaml

ERROR_HEADER = "x-outrigger-error"


def assert_error(
    status: int,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    expected_status: int,
    error_type: str,
    host: str | Collection[str] | None = None,
) -> dict[str, Any]:
    """Check one Outrigger-generated error (SPEC 5); returns the inner ``error`` object."""
    text = body.decode() if isinstance(body, bytes) else body
    assert status == expected_status, f"expected {expected_status}, got {status}: {text[:500]}"
    assert headers.get(ERROR_HEADER) == error_type, dict(headers)
    assert headers.get("Content-Type", "").startswith("application/json"), dict(headers)
    document = json.loads(text)
    assert set(document) == {"error"}, document
    error = document["error"]
    assert set(error) == {"type", "message", "host"}, error
    assert error["type"] == error_type
    assert isinstance(error["message"], str)
    assert error["message"].strip(), "the error message must explain what happened"
    assert isinstance(error["host"], str)
    if isinstance(host, str):
        assert error["host"] == host, error
    elif host is not None:
        assert error["host"] in host, error
    return error  # type: ignore[no-any-return]


async def assert_error_response(
    response: aiohttp.ClientResponse,
    *,
    status: int,
    error_type: str,
    host: str | Collection[str] | None = None,
) -> dict[str, Any]:
    return assert_error(
        response.status,
        response.headers,
        await response.read(),
        expected_status=status,
        error_type=error_type,
        host=host,
    )


# --------------------------------------------------------------------------- raw upstream

Behaviour = Literal["ok", "close", "reset", "garbage", "hang"]


@dataclass
class RawUpstream:
    """HTTP/1.1 upstream on 127.0.0.1 (or ``::1``) that counts connections and request heads.

    behaviour: ``ok`` answers 200 ``ok``; ``close`` reads the request and closes without a
    byte; ``reset`` does the same with an RST; ``garbage`` answers with non-HTTP bytes;
    ``hang`` never answers (until `close()`).
    """

    behaviour: Behaviour = "ok"
    host: str = "127.0.0.1"
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    port: int = 0

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            for _ in range(100):  # keep-alive: bounded number of requests per connection
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                if self.behaviour == "hang":
                    await asyncio.sleep(30)
                if self.behaviour == "close":
                    break
                if self.behaviour == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
                if self.behaviour == "garbage":
                    writer.write(b"this is not an HTTP response\r\n\r\n")
                    await writer.drain()
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()


# --------------------------------------------------------------------------- subprocess


def outrigger_command() -> list[str]:
    """The `outrigger` console script of this environment (falls back to `python -m proxy`)."""
    script = Path(sys.executable).parent / "outrigger"
    if script.exists():
        return [str(script)]
    found = shutil.which("outrigger")
    return [found] if found else [sys.executable, "-m", "proxy"]


async def wait_until(
    condition: Callable[[], Awaitable[bool] | bool], *, within: float, interval: float = 0.02
) -> bool:
    """Poll `condition` (a plain or an async predicate) until it is true; bounded by `within`
    seconds and by an iteration count."""
    deadline = time.monotonic() + within
    for _ in range(int(within / interval) + 2):
        result = condition()
        if await result if inspect.isawaitable(result) else result:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return False


async def port_refuses(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:`port` any more."""
    try:
        async with asyncio.timeout(0.5):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, TimeoutError):
        return True
    writer.close()
    return False


def wait_for_http_ok(url: str, process: subprocess.Popen[bytes], log: Path, within: float = 20.0) -> None:
    """Block until GET `url` (no proxy) answers 200; fail at once if `process` exits.

    `log` is the file the process writes its output to; its tail goes into the failure message.
    """
    deadline = time.monotonic() + within
    with requests.Session() as session:
        session.trust_env = False
        for _ in range(int(within / 0.05) + 100):  # bounded; the deadline normally ends it first
            if process.poll() is not None:
                pytest.fail(f"{process.args!r} exited with {process.returncode}: {log.read_text()[-2000:]}")
            try:
                if session.get(url, timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    pytest.fail(f"{url} did not answer 200 within {within:g}s: {log.read_text()[-2000:]}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still running after 10 s; reaps the process either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def config_ports(config: Path) -> tuple[int, int]:
    """The main listener's and the admin API's port, as `config` (a main config file) sets them."""
    settings = yaml.safe_load(config.read_text())
    return settings["listen"]["port"], settings["admin"]["port"]


class OutriggerProcess:
    """`outrigger run -c CONFIG` in a subprocess; output goes to files (no pipe can fill up)."""

    def __init__(
        self, config: Path, admin_port: int, workdir: Path, *extra: str, wrapper: Sequence[str] = ()
    ) -> None:
        """`wrapper` runs first and execs the command given after it (e.g. ``unshare -m ...``)."""
        self.config = config
        self.admin_port = admin_port
        self._stdout = workdir / "outrigger.stdout"
        self._stderr = workdir / "outrigger.stderr"
        self.args = [*wrapper, *outrigger_command(), "run", "-c", str(config), *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def for_config(
        cls, config: Path, workdir: Path, *extra: str, wrapper: Sequence[str] = ()
    ) -> OutriggerProcess:
        """With the admin port `config` sets (15000, the default, when it sets none)."""
        settings = yaml.safe_load(config.read_text())
        return cls(config, settings.get("admin", {}).get("port", 15000), workdir, *extra, wrapper=wrapper)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> OutriggerProcess:
        with self._stdout.open("wb") as out, self._stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                self.args, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env={**os.environ}
            )
        return self

    @property
    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self._stdout.read_text(errors="replace") + self._stderr.read_text(errors="replace")

    async def admin_get(self, path: str) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as client,
            client.get(f"http://127.0.0.1:{self.admin_port}{path}") as response,
        ):
            return response.status, await response.json()

    async def readyz(self) -> dict[str, Any] | None:
        """The /readyz body when it answers 200, else None; fails if the process has exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"outrigger exited with {self.proc.returncode}:\n{self.output}")
        try:
            status, body = await self.admin_get("/readyz")
        except (aiohttp.ClientError, TimeoutError):
            return None
        return body if status == 200 else None

    async def wait_ready(self, within: float = 8.0) -> dict[str, Any]:
        """Poll /readyz until 200 and return its body; fail fast if the process exits."""
        body: dict[str, Any] | None = None

        async def ready() -> bool:
            nonlocal body
            body = await self.readyz()
            return body is not None

        assert await wait_until(ready, within=within, interval=0.05), f"not ready:\n{self.output}"
        assert body is not None
        return body

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, within: float) -> int | None:
        """The exit code, or None when the process is still running after `within` seconds."""
        assert self.proc is not None
        proc = self.proc

        async def exited() -> bool:
            return proc.poll() is not None

        await wait_until(exited, within=within, interval=0.01)
        return proc.poll()

    def kill(self) -> None:
        """Make sure the process is gone (test teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
