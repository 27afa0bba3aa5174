"""A real `redis-server` (Debian's package) on a free loopback port, for fleet mode (SPEC 12).

`RedisServer.stop()` kills it and `start()` brings it back on the same port, so a test can take
Redis away mid-run and give it back; `freeze()` / `thaw()` (SIGSTOP / SIGCONT) make it a Redis
that accepts connections but answers nothing. Nothing is written to disk (no RDB, no AOF).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from proxy.config.model import Fleet
from proxy.fleet import FleetBackend
from tests.conftest import free_port


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.log = directory / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, within: float = 10.0) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        command = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        command += ["--dir", str(self.directory), "--logfile", str(self.log)]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + within
        for _ in range(int(within / 0.02) + 1):
            if self._answers():
                return
            if self._process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{tail}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def freeze(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a frozen one too
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        pytest.fail("redis-server is not installed (scripts/system-deps.sh installs it)")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def fleet_backends(redis_server: RedisServer) -> AsyncIterator[Callable[[], FleetBackend]]:
    """A new Redis client per call, as each sidecar has its own, all under one fresh key prefix."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    backends: list[FleetBackend] = []

    def make() -> FleetBackend:
        backend = FleetBackend(Fleet(redis=redis_server.url, key_prefix=prefix), probe_interval=0.05)
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        await backend.close()
