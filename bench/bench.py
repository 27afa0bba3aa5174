#!/usr/bin/env python3
"""Outrigger throughput/latency benchmark: direct vs nginx reverse proxy vs Outrigger.

Everything listens on 127.0.0.1 only. Started here, each in its own process group and
killed on exit (normal end, error, Ctrl-C or SIGTERM):

- an upstream: nginx serving a ~100 B file and a 1 MiB file (fast, so the proxy in front
  of it is the bottleneck);
- nginx as a plain keep-alive reverse proxy in front of it (the comparison point);
- Outrigger (``outrigger run -c``) with a bare policy (timeouts only) and with every
  layer on (retries, idempotency, circuit breaker, concurrency, a rate limit that never
  limits); optionally the same "full" config under uvloop (``--uvloop-path``).

Each (target, payload) pair is measured ``--runs`` times with wrk (or the bounded Python
load generator in this file when wrk is missing), interleaved so drift hits every target
alike; the report gives the median req/s, p50 and p99 of the runs and req/s ratios vs
direct and vs nginx, as markdown (stdout and ``bench/results/latest.md``) and JSON
(``bench/results/latest.json``).

On a machine with two or more cores every server is pinned to core 1 and the load
generator to core 0 (``taskset``), so the client never steals the servers' core.

Usage: ``bench/run.sh [options]`` (installs nginx and wrk), or ``python bench/bench.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
BENCH_HOST = "bench.local"

SMALL_BODY = b"outrigger-bench " * 6 + b"0123\n"  # 101 bytes
LARGE_SIZE = 1 << 20
PAYLOADS: dict[str, tuple[str, int]] = {
    "small": ("/small.txt", len(SMALL_BODY)),
    "1MiB": ("/large.bin", LARGE_SIZE),
}

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
# The Python load generator stops at whichever comes first: the duration or this count.
PY_MAX_REQUESTS = 5_000_000


# --------------------------------------------------------------------------- processes


class Processes:
    """Every process this script starts; `stop_all` kills each one's process group by id."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: Ctrl-C in the terminal does not reach it
            )
        self._procs.append((name, proc))
        return proc

    def all_alive(self) -> bool:
        return all(proc.poll() is None for _name, proc in self._procs)

    def stop_all(self) -> None:
        for _name, proc in reversed(self._procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for _name, proc in reversed(self._procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            # The leader may be gone while a child (an nginx worker) lingers: kill the group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
        self._procs.clear()


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env() -> dict[str, str]:
    """The environment for children: no proxy variables, no OTel exporter settings."""
    drop = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    return {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in drop and not key.startswith("OTEL_")
    }


@dataclass(frozen=True)
class Pinning:
    server: list[str]
    client: list[str]
    description: str


def choose_pinning(enabled: bool) -> Pinning:
    taskset = shutil.which("taskset")
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = []
    if not enabled:
        return Pinning([], [], "none (--no-pin)")
    if taskset is None:
        return Pinning([], [], "none (taskset not found)")
    if len(cpus) < 2 or 0 not in cpus or 1 not in cpus:
        return Pinning([], [], f"none (usable CPUs {cpus})")
    return Pinning(
        [taskset, "-c", "1"],
        [taskset, "-c", "0"],
        "servers (upstream nginx, nginx proxy, Outrigger) on CPU 1 via `taskset -c 1`; "
        "load generator on CPU 0 via `taskset -c 0`",
    )


# --------------------------------------------------------------------------- servers

NGINX_COMMON = """\
daemon off;
worker_processes 1;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/{name}-tmp/client;
    proxy_temp_path {tmp}/{name}-tmp/proxy;
    fastcgi_temp_path {tmp}/{name}-tmp/fastcgi;
    uwsgi_temp_path {tmp}/{name}-tmp/uwsgi;
    scgi_temp_path {tmp}/{name}-tmp/scgi;
    keepalive_timeout 65s;
    keepalive_requests 10000000;
    types {{ text/plain txt; application/octet-stream bin; }}
    default_type application/octet-stream;
{body}
}}
"""

UPSTREAM_BODY = """\
    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port};
        root {tmp}/www;
    }}
"""

PROXY_BODY = """\
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;
        }}
    }}
"""

OUTRIGGER_CONFIG = """\
listen: {{host: 127.0.0.1, port: {main_port}}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
policy_dirs: [policies/]
unknown_hosts: deny
drain_timeout: 1s
telemetry: {{access_log: false}}
"""

POLICY_BARE = """\
hosts: [{host}]
upstream: http://127.0.0.1:{upstream_port}
listen: {listen_port}
allow_private_addresses: true
timeouts: {{connect: 1s, per_try: 10s, total: 30s}}
"""

POLICY_FULL_EXTRA = """\
headers:
  set: {{X-Bench: outrigger}}
retries:
  max_attempts: 3
  on: [connect-failure, reset, timeout, 502, 503, 504, 429]
  backoff: {{base: 50ms, max: 1s}}
idempotency:
  header: Idempotency-Key
  methods: [POST, PATCH]
  replay: {{ttl: 1h, max_entries: 1000, max_body_bytes: 64KiB}}
circuit_breaker:
  failure_threshold: 5
  reset_timeout: 10s
  failure_on: [connect-failure, timeout, 5xx]
concurrency: {{max_in_flight: 10000, max_queued: 10000, queue_timeout: 5s}}
rate_limit: {{rate: 100000000, per: 1s, burst: 100000000, max_wait: 500ms, adaptive: true}}
"""


@dataclass
class Target:
    name: str
    port: int
    description: str
    pgid: int  # process group of the server under test (its own session)
    log: str  # its output file is <log>.out in the temp dir


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def system_cpu_ticks() -> tuple[int, int]:
    """(user + nice + system + idle + iowait, idle + iowait) ticks over every CPU, from
    /proc/stat. Interrupt and softirq time (much of loopback TCP) and steal are left out,
    so "busy" = task time and is comparable with the per-process counters."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values[:5]), idle


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU of the live processes in process group `pgid` (/proc, Linux)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # fields[0] is field 3 (state) of proc(5): pgrp = 5, utime = 14, stime = 15.
        if len(fields) > 12 and int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _CLK_TCK


def nginx_conf(tmp: Path, name: str, body: str) -> Path:
    (tmp / f"{name}-tmp").mkdir()
    path = tmp / f"{name}.conf"
    path.write_text(NGINX_COMMON.format(tmp=tmp, name=name, body=body))
    return path


def start_nginx(
    procs: Processes, nginx: str, tmp: Path, name: str, body: str, pin: Pinning, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    conf = nginx_conf(tmp, name, body)
    check = subprocess.run(
        [nginx, "-t", "-q", "-p", f"{tmp}/", "-e", f"{tmp}/{name}-error.log", "-c", str(conf)],
        capture_output=True,
        timeout=30,
        env=env,
    )
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t failed for {name}:\n{check.stderr.decode(errors='replace')}")
    argv = [*pin.server, nginx, "-p", f"{tmp}/", "-e", f"{tmp}/{name}-error.log", "-c", str(conf)]
    return procs.start(name, argv, tmp / f"{name}.out", env)


def start_outrigger(
    procs: Processes,
    tmp: Path,
    name: str,
    upstream_port: int,
    full: bool,
    pin: Pinning,
    env: dict[str, str],
    uvloop_path: str | None = None,
) -> tuple[int, subprocess.Popen[bytes]]:
    """Returns the policy's dedicated listen port and the process."""
    root = tmp / name
    (root / "policies").mkdir(parents=True)
    main_port, admin_port, listen_port = free_port(), free_port(), free_port()
    config = root / "config.yaml"
    config.write_text(OUTRIGGER_CONFIG.format(main_port=main_port, admin_port=admin_port))
    policy = POLICY_BARE.format(host=BENCH_HOST, upstream_port=upstream_port, listen_port=listen_port)
    if full:
        policy += POLICY_FULL_EXTRA.format()
    (root / "policies" / "bench.yaml").write_text(policy)
    outrigger = shutil.which("outrigger") or str(Path(sys.executable).with_name("outrigger"))
    check = subprocess.run([outrigger, "check", "-c", str(config)], capture_output=True, timeout=60, env=env)
    if check.returncode != 0:
        raise RuntimeError(f"outrigger check failed for {name}:\n{check.stderr.decode(errors='replace')}")
    if uvloop_path is None:
        argv = [outrigger, "run", "-c", str(config)]
    else:
        # Outrigger has no loop setting: a launcher named `outrigger` (so `pgrep -f "outrigger
        # run"` still finds it) installs uvloop's policy, then runs the same CLI entry point.
        env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [uvloop_path, env.get("PYTHONPATH")]))}
        launcher = root / "outrigger"
        launcher.write_text(
            "import asyncio, sys\nimport uvloop\n\n"
            "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())\n"
            "from proxy.cli import main\n\nsys.exit(main(sys.argv[1:]))\n"
        )
        argv = [sys.executable, str(launcher), "run", "-c", str(config)]
    proc = procs.start(name, [*pin.server, *argv], tmp / f"{name}.out", env)
    return listen_port, proc


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Host": BENCH_HOST})
    try:
        with opener.open(request, timeout=timeout) as response:
            status: int = response.status
            return status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_ready(
    name: str, url: str, expected_len: int, log_path: Path, procs_alive: Callable[[], bool]
) -> None:
    """Poll until `url` answers 200 with the expected body length; bounded in time and tries."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    for _ in range(int(READY_TIMEOUT_S / 0.05) + 1):
        if not procs_alive():
            break
        try:
            status, body = http_get(url)
            if status == 200 and len(body) == expected_len:
                return
            last = f"status {status}, {len(body)} bytes: {body[:200]!r}"
        except OSError as error:
            last = repr(error)
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
    raise RuntimeError(f"{name} not ready at {url}: {last}\n--- {log_path.name} ---\n{tail}")


# --------------------------------------------------------------------------- load


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    target_cpu_s: float = 0.0  # CPU used by the server under test during the run
    upstream_cpu_s: float = 0.0  # CPU used by the upstream nginx (0 for "direct": counted above)
    client_cpu_s: float = 0.0  # CPU used by the load generator
    system_cpu_s: float = 0.0  # CPU used by everything on the machine (/proc/stat)
    wall_s: float = 0.0

    @property
    def other_cores(self) -> float:
        """CPU used by processes that are not part of this benchmark, in cores."""
        ours = self.target_cpu_s + self.upstream_cpu_s + self.client_cpu_s
        return max(0.0, self.system_cpu_s - ours) / max(1e-9, self.wall_s)


_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(match.group(1)) * _WRK_UNITS[match.group(2)]


def parse_wrk(output: str) -> Sample:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    total = re.search(r"^\s+(\d+) requests in", output, re.MULTILINE)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sock:
        errors += sum(int(n) for n in sock.groups())
    return Sample(
        float(rps.group(1)), _wrk_ms(p50.group(1)), _wrk_ms(p99.group(1)), int(total.group(1)), errors
    )


def run_wrk(
    wrk: str, url: str, args: argparse.Namespace, duration: float, pin: Pinning, env: dict[str, str]
) -> Sample:
    argv = [
        *pin.client,
        wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "--latency",
        "-H",
        f"Host: {BENCH_HOST}",
        url,
    ]
    result = subprocess.run(argv, capture_output=True, timeout=duration + 30, env=env)
    output = result.stdout.decode(errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
    return parse_wrk(output)


def run_python_load(
    url: str, args: argparse.Namespace, duration: float, pin: Pinning, env: dict[str, str]
) -> Sample:
    argv = [
        *pin.client,
        sys.executable,
        str(Path(__file__).resolve()),
        "--loadgen-worker",
        url,
        "--connections",
        str(args.connections),
        "--duration",
        str(duration),
    ]
    result = subprocess.run(argv, capture_output=True, timeout=duration + 30, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"python load generator failed: {result.stderr.decode(errors='replace')}")
    data = json.loads(result.stdout)
    return Sample(**data)


async def _python_load(url: str, connections: int, duration: float, max_requests: int) -> Sample:
    """Closed loop: `connections` workers, each one request at a time, until the duration
    or `max_requests` (shared) is reached."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    remaining = max_requests
    start = time.perf_counter()
    deadline = start + duration
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:

        async def worker() -> None:
            nonlocal errors, remaining
            while remaining > 0 and time.perf_counter() < deadline:
                remaining -= 1
                began = time.perf_counter()
                try:
                    async with session.get(url, headers={"Host": BENCH_HOST}) as response:
                        async for _chunk in response.content.iter_chunked(1 << 16):
                            pass
                        ok = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - began)
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000.0

    return Sample(len(latencies) / elapsed, pct(0.50), pct(0.99), len(latencies) + errors, errors)


# --------------------------------------------------------------------------- report


@dataclass
class Row:
    target: str
    payload: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return statistics.median(s.rps for s in self.samples)

    @property
    def p50(self) -> float:
        return statistics.median(s.p50_ms for s in self.samples)

    @property
    def p99(self) -> float:
        return statistics.median(s.p99_ms for s in self.samples)

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.samples)

    @property
    def cpu_us_per_request(self) -> float:
        """Median CPU time the server under test spent per request (microseconds)."""
        return statistics.median(s.target_cpu_s / max(1, s.requests) * 1e6 for s in self.samples)

    @property
    def other_cores(self) -> float:
        return statistics.median(s.other_cores for s in self.samples)

    @property
    def servers_busy(self) -> float:
        """Median CPU of target + upstream over the run, in cores (1.0 = one core saturated)."""
        return statistics.median(
            (s.target_cpu_s + s.upstream_cpu_s) / max(1e-9, s.wall_s) for s in self.samples
        )


def _fmt_rps(value: float) -> str:
    return f"{value:,.0f}"


def render_markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    by_key = {(r.target, r.payload): r for r in rows}
    lines = [
        f"Run {meta['date']} · `{meta['command']}`",
        "",
        f"- machine: {meta['nproc']} CPUs ({meta['cpu_model']}), {meta['kernel']}",
        f"- Python {meta['python']}, aiohttp {meta['aiohttp']}, {meta['nginx']}, "
        f"Outrigger {meta['outrigger_commit']}",
        f"- load: {meta['load_generator']}, {meta['threads']} thread, {meta['connections']} connections, "
        f"{meta['duration_s']:g}s per run, {meta['runs']} runs per cell (interleaved), "
        f"{meta['warmup_s']:g}s warm-up per cell",
        f"- pinning: {meta['pinning']}",
        f"- other load: CPUs {meta['cpu_busy_before']:.0%} busy in the second before the start; "
        f"load average (1 min) before / after: {meta['loadavg_before']} / {meta.get('loadavg_after', '?')}",
        "- values: median of the runs; ratios are median req/s over the median req/s of "
        "direct / nginx for the same payload; CPU us/req = CPU time of the server under test "
        "(for direct: the upstream nginx) per request; servers busy = CPU of that server plus the "
        "upstream over the run, in cores; others = CPU used by processes outside this benchmark "
        "during the runs, in cores (0 = quiet machine)",
        "",
        "| payload | target | req/s | p50 ms | p99 ms | vs direct | vs nginx "
        "| CPU us/req | servers busy | others | req/s per run | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for payload in PAYLOADS:
        direct = by_key.get(("direct", payload))
        nginx = by_key.get(("nginx", payload))
        for row in rows:
            if row.payload != payload:
                continue
            vs_direct = f"{row.rps / direct.rps:.2f}x" if direct and direct.rps else "-"
            vs_nginx = f"{row.rps / nginx.rps:.2f}x" if nginx and nginx.rps else "-"
            runs = ", ".join(_fmt_rps(s.rps) for s in row.samples)
            lines.append(
                f"| {payload} | {row.target} | {_fmt_rps(row.rps)} | {row.p50:.2f} | {row.p99:.2f} "
                f"| {vs_direct} | {vs_nginx} | {row.cpu_us_per_request:,.0f} | {row.servers_busy:.2f} "
                f"| {row.other_cores:.2f} "
                f"| {runs} | {row.errors} |"
            )
    return "\n".join(lines) + "\n"


def render_json(rows: list[Row], meta: dict[str, Any], targets: list[Target]) -> str:
    by_key = {(r.target, r.payload): r for r in rows}
    results = []
    for row in rows:
        direct = by_key.get(("direct", row.payload))
        nginx = by_key.get(("nginx", row.payload))
        results.append(
            {
                "target": row.target,
                "payload": row.payload,
                "median_rps": row.rps,
                "median_p50_ms": row.p50,
                "median_p99_ms": row.p99,
                "ratio_vs_direct": row.rps / direct.rps if direct and direct.rps else None,
                "ratio_vs_nginx": row.rps / nginx.rps if nginx and nginx.rps else None,
                "median_cpu_us_per_request": row.cpu_us_per_request,
                "median_servers_busy_cores": row.servers_busy,
                "median_other_load_cores": row.other_cores,
                "errors": row.errors,
                "runs": [{**asdict(s), "other_cores": s.other_cores} for s in row.samples],
            }
        )
    document = {"meta": meta, "targets": [asdict(t) for t in targets], "results": results}
    return json.dumps(document, indent=2) + "\n"


def _first_line(argv: Sequence[str]) -> str:
    try:
        result = subprocess.run(list(argv), capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (result.stdout + result.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def collect_meta(args: argparse.Namespace, nginx: str, wrk: str | None, pin: Pinning) -> dict[str, Any]:
    import aiohttp

    commit = _first_line(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"])
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": os.environ.get("BENCH_COMMAND") or " ".join(["python bench/bench.py", *args.argv]),
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "nginx": _first_line([nginx, "-v"]).replace("nginx version: ", ""),
        "outrigger_commit": commit,
        "load_generator": (
            re.sub(r"\s+Copyright.*", "", _first_line([wrk, "-v"]))
            if wrk
            else "Python aiohttp client (wrk not found)"
        ),
        "threads": args.threads if wrk else 1,
        "connections": args.connections,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "runs": args.runs,
        "pinning": pin.description,
        "loadavg_before": _loadavg(),
        "cpu_busy_before": _cpu_busy(1.0),
    }


def _cpu_busy(seconds: float) -> float:
    """Fraction of all CPUs busy over `seconds` (/proc/stat), before anything is started."""
    try:
        total0, idle0 = system_cpu_ticks()
        time.sleep(seconds)
        total1, idle1 = system_cpu_ticks()
    except (OSError, ValueError, IndexError):
        return -1.0
    return round(1 - (idle1 - idle0) / max(1, total1 - total0), 2)


def _loadavg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="measurements per target and payload")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load per cell")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers/client with taskset")
    parser.add_argument("--nginx", default=None, help="nginx binary (default: PATH, /usr/sbin/nginx)")
    parser.add_argument(
        "--uvloop-path",
        default=None,
        help="a folder with uvloop (pip install --target DIR uvloop): adds 'outrigger-full-uvloop'",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where latest.md/json go")
    parser.add_argument("--loadgen-worker", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(argv)
    if not 1 <= args.runs <= 20 or not 0.5 <= args.duration <= 120 or not 0 <= args.warmup <= 30:
        parser.error("bounds: 1 <= --runs <= 20, 0.5 <= --duration <= 120, 0 <= --warmup <= 30")
    if not 1 <= args.connections <= 1024 or not 1 <= args.threads <= args.connections:
        parser.error("bounds: 1 <= --connections <= 1024, 1 <= --threads <= --connections")
    return args


def find_nginx(explicit: str | None) -> str:
    for candidate in (explicit, shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit("nginx not found: run bench/run.sh (installs it), or pass --nginx PATH")


def measure(
    targets: list[Target],
    upstream_pgid: int,
    args: argparse.Namespace,
    wrk: str | None,
    pin: Pinning,
    env: dict[str, str],
) -> list[Row]:
    rows = {(t.name, p): Row(t.name, p) for p in PAYLOADS for t in targets}

    def once(target: Target, payload: str, duration: float) -> Sample:
        url = f"http://127.0.0.1:{target.port}{PAYLOADS[payload][0]}"
        separate = target.pgid != upstream_pgid
        cpu0 = group_cpu_seconds(target.pgid)
        up0 = group_cpu_seconds(upstream_pgid) if separate else 0.0
        sys0 = system_cpu_ticks()
        client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall0 = time.monotonic()
        if wrk:
            sample = run_wrk(wrk, url, args, duration, pin, env)
        else:
            sample = run_python_load(url, args, duration, pin, env)
        sample.wall_s = time.monotonic() - wall0
        sample.target_cpu_s = group_cpu_seconds(target.pgid) - cpu0
        sample.upstream_cpu_s = group_cpu_seconds(upstream_pgid) - up0 if separate else 0.0
        client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        sample.client_cpu_s = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
        sys1 = system_cpu_ticks()
        sample.system_cpu_s = ((sys1[0] - sys0[0]) - (sys1[1] - sys0[1])) / _CLK_TCK
        return sample

    if args.warmup > 0:
        for payload in PAYLOADS:
            for target in targets:
                once(target, payload, args.warmup)
    for run in range(1, args.runs + 1):
        for payload in PAYLOADS:
            for target in targets:
                sample = once(target, payload, args.duration)
                rows[(target.name, payload)].samples.append(sample)
                print(
                    f"  run {run}/{args.runs} {payload:>5} {target.name:<22} "
                    f"{sample.rps:>10,.0f} req/s  p50 {sample.p50_ms:6.2f} ms  p99 {sample.p99_ms:6.2f} ms"
                    f"  others {sample.other_cores:.2f} cores"
                    + (f"  ERRORS {sample.errors}" if sample.errors else ""),
                    flush=True,
                )
    return list(rows.values())


def _serve_and_measure(
    tmp: Path,
    procs: Processes,
    args: argparse.Namespace,
    nginx: str,
    wrk: str | None,
    pin: Pinning,
    env: dict[str, str],
    meta: dict[str, Any],
) -> tuple[list[Target], list[Row]]:
    # nginx workers run as an unprivileged user when started by root: let them read.
    tmp.chmod(0o755)
    www = tmp / "www"
    www.mkdir(mode=0o755)
    (www / "small.txt").write_bytes(SMALL_BODY)
    (www / "large.bin").write_bytes(os.urandom(LARGE_SIZE))
    for served in www.iterdir():
        served.chmod(0o644)

    upstream_port = free_port()
    upstream = start_nginx(
        procs, nginx, tmp, "upstream", UPSTREAM_BODY.format(port=upstream_port, tmp=tmp), pin, env
    )
    nginx_port = free_port()
    nginx_proxy = start_nginx(
        procs,
        nginx,
        tmp,
        "nginx-proxy",
        PROXY_BODY.format(port=nginx_port, upstream_port=upstream_port),
        pin,
        env,
    )
    targets = [
        Target("direct", upstream_port, "nginx upstream, no proxy", upstream.pid, "upstream"),
        Target("nginx", nginx_port, "nginx reverse proxy (keepalive pool)", nginx_proxy.pid, "nginx-proxy"),
    ]
    variants: list[tuple[str, bool, str | None, str]] = [
        ("outrigger-bare", False, None, "Outrigger, timeouts only"),
        ("outrigger-full", True, None, "Outrigger, every layer on"),
    ]
    if args.uvloop_path:
        description = "Outrigger, every layer on, uvloop"
        variants.append(("outrigger-full-uvloop", True, args.uvloop_path, description))
    for name, full, uvloop_path, description in variants:
        port, proc = start_outrigger(procs, tmp, name, upstream_port, full, pin, env, uvloop_path)
        targets.append(Target(name, port, description, proc.pid, name))

    for target in targets:
        for path, size in PAYLOADS.values():
            url = f"http://127.0.0.1:{target.port}{path}"
            wait_ready(target.name, url, size, tmp / f"{target.log}.out", procs.all_alive)
    print("all targets ready: " + ", ".join(f"{t.name}=:{t.port}" for t in targets), flush=True)

    started = time.monotonic()
    rows = measure(targets, upstream.pid, args, wrk, pin, env)
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    if not procs.all_alive():
        raise RuntimeError("a server exited during the benchmark")
    return targets, rows


def run_benchmark(args: argparse.Namespace) -> int:
    nginx = find_nginx(args.nginx)
    wrk = shutil.which("wrk") if args.loadgen in ("auto", "wrk") else None
    if args.loadgen == "wrk" and wrk is None:
        raise SystemExit("--loadgen wrk: wrk not found")
    pin = choose_pinning(not args.no_pin)
    env = clean_env()
    meta = collect_meta(args, nginx, wrk, pin)
    print(f"load generator: {meta['load_generator']}; pinning: {pin.description}", flush=True)
    if meta["cpu_busy_before"] > 0.2:
        print(
            f"WARNING: {meta['cpu_busy_before']:.0%} of the CPUs were busy before the benchmark "
            "started: other work on this machine will skew the numbers",
            flush=True,
        )

    procs = Processes()
    previous_term = signal.signal(signal.SIGTERM, _raise_exit)
    # Stop the servers before their temp dir is removed (nginx keeps files open in it).
    with tempfile.TemporaryDirectory(prefix="outrigger-bench-", ignore_cleanup_errors=True) as tmp_name:
        try:
            targets, rows = _serve_and_measure(Path(tmp_name), procs, args, nginx, wrk, pin, env, meta)
        finally:
            procs.stop_all()
            signal.signal(signal.SIGTERM, previous_term)

    meta["loadavg_after"] = _loadavg()
    markdown = render_markdown(rows, meta)
    print()
    print(markdown, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(markdown)
    (args.out / "latest.json").write_text(render_json(rows, meta, targets))
    print(f"\nwritten: {args.out / 'latest.md'}, {args.out / 'latest.json'}")
    if any(row.errors for row in rows):
        print("WARNING: some runs had errors (non-2xx or socket errors); see the errors column")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.loadgen_worker:
        sample = asyncio.run(
            _python_load(args.loadgen_worker, args.connections, args.duration, PY_MAX_REQUESTS)
        )
        print(json.dumps(asdict(sample)))
        return 0
    try:
        return run_benchmark(args)
    except KeyboardInterrupt:
        print("\ninterrupted: every server started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
