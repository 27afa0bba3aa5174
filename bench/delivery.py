#!/usr/bin/env python3
"""Fire-and-forget acknowledge rate: how fast Outrigger stores a request and answers 202.

Starts a tiny upstream and ``outrigger run`` (a policy with ``delivery``, data_dir in a temporary
folder, access log off), sends ``--requests`` POSTs with ``Prefer: respond-async`` from
``--concurrency`` connections, and reports the 202 rate (req/s) and latency percentiles. Every
202 is a committed, fsynced SQLite write (group commit), so the disk's fsync latency is what
bounds it. The worker delivers to the upstream meanwhile (it shares the process and the core).

Usage: ``python bench/delivery.py [--requests 5000] [--concurrency 50] [--body-bytes 512]``.
Everything listens on 127.0.0.1 and is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _upstream(port: int) -> web.AppRunner:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def _config(directory: Path, upstream_port: int) -> tuple[Path, int, int]:
    port, admin = _free_port(), _free_port()
    (directory / "policies").mkdir()
    policy = {
        "hosts": ["upstream.bench"],
        "upstream": f"http://127.0.0.1:{upstream_port}",
        "allow_private_addresses": True,
        "delivery": {},
    }
    (directory / "policies" / "bench.yaml").write_text(yaml.safe_dump([policy]))
    main = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin},
        "telemetry": {"access_log": False},
        "data_dir": str(directory / "data"),
    }
    config = directory / "config.yaml"
    config.write_text(yaml.safe_dump(main))
    return config, port, admin


async def _wait_ready(admin: int, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as client:
        for _ in range(int(within / 0.05) + 1):
            try:
                async with client.get(f"http://127.0.0.1:{admin}/readyz") as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    raise SystemExit("outrigger did not become ready")


async def _load(port: int, requests: int, concurrency: int, body: bytes) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(requests):
        queue.put_nowait(n)
    headers = {"Host": "upstream.bench", "Prefer": "respond-async", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)

    async with aiohttp.ClientSession(connector=connector) as client:

        async def one_connection() -> None:
            nonlocal failures
            while not queue.empty():
                queue.get_nowait()
                started = time.perf_counter()
                async with client.post(f"http://127.0.0.1:{port}/v1/events", data=body, headers=headers) as r:
                    await r.read()
                    if r.status == 202:
                        latencies.append(time.perf_counter() - started)
                    else:
                        failures += 1

        started = time.perf_counter()
        await asyncio.gather(*(one_connection() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return elapsed, latencies, failures


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--body-bytes", type=int, default=512)
    args = parser.parse_args()
    body = json.dumps({"pad": "x" * max(0, args.body_bytes - 11)}).encode()
    upstream_port = _free_port()
    runner = await _upstream(upstream_port)
    with tempfile.TemporaryDirectory(prefix="outrigger-bench-") as folder:
        config, port, admin = _config(Path(folder), upstream_port)
        command = [sys.executable, "-m", "proxy", "run", "-c", str(config), "--log-level", "WARNING"]
        process = await asyncio.create_subprocess_exec(*command, stdin=subprocess.DEVNULL)
        try:
            await _wait_ready(admin)
            await _load(port, min(200, args.requests), args.concurrency, body)  # warm-up
            elapsed, latencies, failures = await _load(port, args.requests, args.concurrency, body)
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)
            await runner.cleanup()
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "body_bytes": len(body),
        "acknowledged_per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
        "not_202": failures,
    }
    print(json.dumps(result, indent=2))
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
