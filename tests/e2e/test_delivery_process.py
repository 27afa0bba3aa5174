"""Durable delivery across process deaths and broken disks, with a real `outrigger run`.

The upstream is a ledger: it records every request it gets (the body names the request, the
idempotency key names the delivery) and answers each request's first attempt 503, later ones 200.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Launch, free_port, loopback_policy, write_config
from tests.e2e.procs import OutriggerProcess, assert_error, config_ports, wait_until


class Ledger:
    """Every request the upstream received, by the ``n`` in its JSON body; with `fail_first`, the
    first attempt of each is answered 503 (a delivery then takes two attempts)."""

    def __init__(self, fail_first: bool = True) -> None:
        self.keys: dict[int, list[str]] = defaultdict(list)
        self.runner: web.AppRunner | None = None
        self.fail_first = fail_first

    async def _handle(self, request: web.Request) -> web.Response:
        n = json.loads(await request.read())["n"]
        self.keys[n].append(request.headers.get("Idempotency-Key", ""))
        return web.Response(status=503 if self.fail_first and len(self.keys[n]) == 1 else 200)

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_post("/v1/events", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def delivered(self, n: int) -> bool:
        return len(self.keys.get(n, ())) >= (2 if self.fail_first else 1)


def delivery_config(tmp_path: Path, upstream_port: int, data_dir: Path | None = None) -> Path:
    policy = loopback_policy(
        f"http://127.0.0.1:{upstream_port}",
        delivery={"max_attempts": 1000, "backoff": {"base": "50ms", "max": "300ms"}, "ttl": "1h"},
    )
    main: dict[str, Any] = {"drain_idle": "100ms", "drain_timeout": "2s"}
    if data_dir is not None:
        main["data_dir"] = str(data_dir)
    return write_config(tmp_path, [policy], **main)


async def post(
    client: aiohttp.ClientSession, port: int, n: int, size: int = 0
) -> tuple[int, dict[str, str], bytes]:
    """One fire-and-forget POST; (status, headers, body), status 0 when the connection broke."""
    body = json.dumps({"n": n, "pad": "x" * size}).encode()
    headers = {"Host": "upstream.test", "Prefer": "respond-async", "Content-Type": "application/json"}
    try:
        async with client.post(f"http://127.0.0.1:{port}/v1/events", data=body, headers=headers) as reply:
            return reply.status, dict(reply.headers), await reply.read()
    except (aiohttp.ClientError, ConnectionError, TimeoutError):
        return 0, {}, b""


async def test_nothing_acknowledged_is_lost_across_kill_9(launch: Launch, tmp_path: Path) -> None:
    upstream_port = free_port()
    config = delivery_config(tmp_path, upstream_port)
    port, _ = config_ports(config)
    first = launch(config)
    await first.wait_ready()
    acknowledged: set[int] = set()
    killed = asyncio.Event()
    limit = asyncio.Semaphore(50)

    async def one(client: aiohttp.ClientSession, n: int) -> None:
        async with limit:
            status, headers, _ = await post(client, port, n)
        if status == 202:
            assert headers["x-outrigger-delivery-id"]
            acknowledged.add(n)
            if len(acknowledged) >= 250 and not killed.is_set():
                killed.set()
                first.send(signal.SIGKILL)
        else:
            assert status == 0, status  # only a connection the kill broke may fail

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=50)) as client:
        await asyncio.gather(*(one(client, n) for n in range(500)))
    assert killed.is_set(), "the process was never killed"
    assert await first.wait_exit(within=5) == -signal.SIGKILL
    assert 250 <= len(acknowledged) < 500

    second = launch(config)
    await second.wait_ready()
    ledger = Ledger()
    await ledger.start(upstream_port)
    try:
        everything = await wait_until(lambda: all(ledger.delivered(n) for n in acknowledged), within=60)
        missing = sorted(n for n in acknowledged if not ledger.delivered(n))
        assert everything, f"{len(missing)} acknowledged request(s) never delivered: {missing[:20]}"
        for n in acknowledged:
            keys = ledger.keys[n]
            assert keys[0], n
            assert set(keys) == {keys[0]}, (n, keys)  # every attempt of one delivery: one key
        assert len({ledger.keys[n][0] for n in acknowledged}) == len(acknowledged)
    finally:
        second.kill()
        await ledger.close()


_UNSHARE = ("unshare", "-m", "--propagation", "private")
READ_ONLY_BIND = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"'


def _can_mount_privately(tmp_path: Path) -> str | None:
    """None when `unshare -m` with a tmpfs mount works here, else why not."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = tmp_path / "mount-probe"
    probe.mkdir()
    result = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=64k",
            "tmpfs",
            str(probe),
        ],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        return f"a private tmpfs mount is not permitted here: {result.stderr.decode().strip()}"
    return None


def _in_private_mount(script: str, data_dir: Path) -> list[str]:
    """A wrapper running `script` (with $0 = `data_dir`) in a mount namespace of its own, then
    exec-ing Outrigger: the host's mounts are never touched."""
    return [*_UNSHARE, "sh", "-c", f'{script} && exec "$@"', str(data_dir)]


async def test_a_full_disk_answers_503_store_unavailable_and_keeps_what_was_acknowledged(
    launch: Launch, tmp_path: Path
) -> None:
    if (reason := _can_mount_privately(tmp_path)) is not None:
        pytest.skip(reason)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    upstream_port = free_port()
    config = delivery_config(tmp_path, upstream_port, data_dir)
    port, admin_port = config_ports(config)
    process = launch(config, wrapper=_in_private_mount('mount -t tmpfs -o size=1m tmpfs "$0"', data_dir))
    await process.wait_ready()
    ledger = Ledger(fail_first=False)
    await ledger.start(upstream_port)
    acknowledged: list[int] = []
    refused = 0
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
            for n in range(200):  # 200 x 32 KiB is far more than the 1 MiB disk holds
                status, headers, body = await post(client, port, n, size=32 * 1024)
                if status == 202:
                    acknowledged.append(n)
                    continue
                assert_error(status, headers, body, expected_status=503, error_type="store_unavailable")
                refused += 1
                if refused >= 3:
                    break
            assert refused == 3, "the disk never filled up"
            assert acknowledged, "nothing fitted on the disk at all"
            async with client.get(f"http://127.0.0.1:{admin_port}/deliveries?limit=1000") as reply:
                assert reply.status == 200  # reads still work on a full disk
                listed = {d["id"] for d in (await reply.json())["deliveries"]}
        assert len(listed) == len(acknowledged)  # every acknowledged request is still stored
        # claims live in memory: the worker delivers even when it cannot record the outcome (it
        # then tries again after the claim's lease: at least once in all)
        delivered = await wait_until(lambda: all(ledger.delivered(n) for n in acknowledged), within=30)
        assert delivered, [n for n in acknowledged if not ledger.delivered(n)]
        assert not set(ledger.keys) - set(acknowledged)  # nothing refused was delivered
    finally:
        process.kill()
        await ledger.close()


async def test_a_read_only_data_dir_answers_503_and_loses_nothing_stored_before(
    launch: Launch, tmp_path: Path
) -> None:
    if (reason := _can_mount_privately(tmp_path)) is not None:
        pytest.skip(reason)
    data_dir = tmp_path / "data"
    upstream_port = free_port()
    config = delivery_config(tmp_path, upstream_port, data_dir)
    port, _ = config_ports(config)
    timeout = aiohttp.ClientTimeout(total=10)
    writable = launch(config)
    await writable.wait_ready()
    async with aiohttp.ClientSession(timeout=timeout) as client:
        stored = [n for n in range(5) if (await post(client, port, n))[0] == 202]
    assert stored == list(range(5))
    writable.send(signal.SIGTERM)
    assert await writable.wait_exit(within=10) == 0

    read_only = launch(
        config, wrapper=_in_private_mount('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"', data_dir)
    )
    await read_only.wait_ready()
    async with aiohttp.ClientSession(timeout=timeout) as client:
        for n in range(5, 8):
            status, headers, body = await post(client, port, n)
            assert_error(status, headers, body, expected_status=503, error_type="store_unavailable")
    read_only.kill()

    again = launch(config)
    await again.wait_ready()
    await _delivered_all(again, upstream_port, stored)


async def _delivered_all(
    process: OutriggerProcess, upstream_port: int, acknowledged: list[int], ledger: Ledger | None = None
) -> None:
    ledger = ledger or Ledger()
    await ledger.start(upstream_port)
    try:
        assert await wait_until(lambda: all(ledger.delivered(n) for n in acknowledged), within=30), [
            n for n in acknowledged if not ledger.delivered(n)
        ]
    finally:
        process.kill()
        await ledger.close()
