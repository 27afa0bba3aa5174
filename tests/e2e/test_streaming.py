"""Bodies stream through Outrigger without buffering (SPEC 4, SPEC 7 "no unbounded buffering").

Outrigger and the upstream each run as real subprocesses so the proxy's RSS
can be measured on its own: a 200 MiB upload and a 200 MiB download must not
raise it by more than 32 MiB, and every byte must arrive (count and SHA-256).

Each transfer stalls once for STALL seconds on the slow side (the upstream stops
reading the upload; the app stops reading the download) while the other side
could push hundreds of MiB in that time: without back-pressure the proxy would
have to buffer it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil
import pytest
import requests
import yaml

from tests.conftest import free_port, loopback_policy, write_config
from tests.e2e.procs import outrigger_command, stop_process, wait_for_http_ok
from tests.e2e.stream_upstream import pattern

MiB = 1024 * 1024
TRANSFER_SIZE = 200 * MiB
RSS_BUDGET = 32 * MiB
STARTUP_TIMEOUT = 20.0
TRANSFER_TIMEOUT = 30.0
STALL = 1.5
STALL_AFTER = 16 * MiB
REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in {"http_proxy", "https_proxy", "no_proxy"}}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@dataclass(frozen=True)
class Processes:
    outrigger: psutil.Process
    proxy_url: str
    dedicated_url: str


FULL_STACK = {
    "retries": {"max_attempts": 3, "methods": ["GET", "POST"]},
    "idempotency": {"replay": {"ttl": "1m"}},
    "circuit_breaker": {},
    "concurrency": {},
    "rate_limit": {"rate": 1000, "burst": 1000},
}
"""Every layer on: the retry replay buffer and the idempotency replay cache must give up on big bodies
(max_replay_bytes / max_body_bytes) and stream them instead."""


@pytest.fixture(params=[pytest.param({}, id="bare-policy"), pytest.param(FULL_STACK, id="every-layer-on")])
def processes(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    layers: dict[str, object] = request.param
    started: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def spawn(command: list[str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = tmp_path / f"{name}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=_clean_env()
        )
        started.append((process, log))
        return process, log_path

    try:
        upstream_port = free_port()
        upstream, upstream_log = spawn(
            [sys.executable, "-m", "tests.e2e.stream_upstream", "--port", str(upstream_port)], "upstream"
        )
        wait_for_http_ok(f"http://127.0.0.1:{upstream_port}/health", upstream, upstream_log, STARTUP_TIMEOUT)

        dedicated = free_port()
        policy = loopback_policy(
            f"http://127.0.0.1:{upstream_port}",
            host="stream.test",
            listen=dedicated,
            timeouts={"connect": "2s", "per_try": "30s", "total": "60s"},
            **layers,
        )
        config = write_config(tmp_path, [policy])
        main = yaml.safe_load(config.read_text())
        outrigger, outrigger_log = spawn([*outrigger_command(), "run", "-c", str(config)], "outrigger")
        readyz = f"http://127.0.0.1:{main['admin']['port']}/readyz"
        wait_for_http_ok(readyz, outrigger, outrigger_log, STARTUP_TIMEOUT)
        yield Processes(
            outrigger=psutil.Process(outrigger.pid),
            proxy_url=f"http://127.0.0.1:{main['listen']['port']}",
            dedicated_url=f"http://127.0.0.1:{dedicated}",
        )
    finally:
        for process, log in reversed(started):
            stop_process(process)
            log.close()


class RssSampler:
    """Samples a process's RSS every few milliseconds in a thread; keeps the peak."""

    def __init__(self, process: psutil.Process, interval: float = 0.005) -> None:
        self.process = process
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, self.process.memory_info().rss)


def _expected_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for block in pattern(size):
        digest.update(block)
    return digest.hexdigest()


def _upload(
    session: requests.Session, url: str, size: int, proxies: dict[str, str]
) -> tuple[dict[str, object], str]:
    sent = hashlib.sha256()

    def body() -> Iterator[bytes]:
        for block in pattern(size):
            sent.update(block)
            yield block

    response = session.post(url, data=body(), proxies=proxies, timeout=TRANSFER_TIMEOUT)
    assert response.status_code == 200, response.text
    result: dict[str, object] = response.json()
    return result, sent.hexdigest()


def _download(
    session: requests.Session, url: str, proxies: dict[str, str], stall_after: int = -1
) -> tuple[int, str]:
    received = hashlib.sha256()
    count = 0
    with session.get(url, stream=True, proxies=proxies, timeout=TRANSFER_TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["x-outrigger-attempts"] == "1"
        for chunk in response.iter_content(chunk_size=64 * 1024):
            received.update(chunk)
            count += len(chunk)
            if 0 <= stall_after <= count:
                stall_after = -1
                time.sleep(STALL)  # a slow app: the proxy must stop reading from the upstream
    return count, received.hexdigest()


def test_200_mib_each_way_streams_in_bounded_memory(processes: Processes) -> None:
    proxies = {"http": processes.proxy_url}
    with requests.Session() as session:
        session.trust_env = False
        # warm up: first-use allocations (parsers, pools, buffers) belong in the baseline
        for _ in range(2):
            _upload(session, f"{processes.dedicated_url}/upload", 4 * MiB, {})
            _download(session, f"http://stream.test/download?size={4 * MiB}", proxies)
        time.sleep(0.2)
        baseline = processes.outrigger.memory_info().rss

        started = time.monotonic()
        with RssSampler(processes.outrigger) as upload_rss:
            uploaded, sent_hash = _upload(
                session,
                f"{processes.dedicated_url}/upload?stall_after={STALL_AFTER}&stall={STALL}",
                TRANSFER_SIZE,
                {},
            )
        upload_seconds = time.monotonic() - started

        started = time.monotonic()
        with RssSampler(processes.outrigger) as download_rss:
            count, received_hash = _download(
                session, f"http://stream.test/download?size={TRANSFER_SIZE}", proxies, STALL_AFTER
            )
        download_seconds = time.monotonic() - started

    report = (
        f"baseline RSS {baseline / MiB:.1f} MiB; upload peak +{(upload_rss.peak - baseline) / MiB:.1f} MiB"
        f" ({upload_rss.samples} samples, {upload_seconds:.1f}s); download peak"
        f" +{(download_rss.peak - baseline) / MiB:.1f} MiB"
        f" ({download_rss.samples} samples, {download_seconds:.1f}s)"
    )
    print(report)
    assert uploaded == {"bytes": TRANSFER_SIZE, "sha256": sent_hash}
    assert count == TRANSFER_SIZE
    assert received_hash == _expected_sha256(TRANSFER_SIZE)
    assert upload_seconds >= STALL, report  # the stalls happened
    assert download_seconds >= STALL, report
    assert upload_rss.samples > 10, report
    assert download_rss.samples > 10, report
    assert upload_rss.peak - baseline < RSS_BUDGET, report
    assert download_rss.peak - baseline < RSS_BUDGET, report
