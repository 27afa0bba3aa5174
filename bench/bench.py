#!/usr/bin/env python3
"""Outrigger benchmark: direct nginx, nginx reverse proxy, a naive aiohttp proxy and Outrigger.

Everything listens on 127.0.0.1 only. Started here, each in its own process group and
killed on exit (normal end, error, Ctrl-C or SIGTERM):

- ``direct``: an nginx origin serving a ~100 B, a 16 KiB and a 1 MiB file;
- ``nginx``: nginx as a keep-alive reverse proxy in front of it;
- ``naive``: ``bench/naive_proxy.py``, the aiohttp reverse proxy a Python user would write;
- ``outrigger-bare`` (timeouts only, no access log), ``outrigger-full`` (every layer on,
  access log on), ``outrigger-traced`` (full + 100 % trace sampling exported over OTLP/HTTP
  to ``bench/otlp_sink.py``), and ``outrigger-full`` with 100 and 1,000 policies.

Three phases, all in one run and interleaved (run 1 of every cell, then run 2, ...):
throughput (wrk, closed loop) per target and payload; latency at a paced rate (hey) on the
small payload; throughput with 1 / 100 / 1,000 policies, the benchmarked host matched
exactly and through a wildcard. The report (``report.py``) gives medians, CPU microseconds
per request and RSS of the server under test, ratios to naive and nginx from the same run,
and the issue-9 targets as PASS / MISS with their margin.

With two or more cores every server is pinned to CPU 1 and the load generator (and the OTLP
sink) to CPU 0 (``taskset``).

Usage: ``bench/run.sh [options]`` (installs what is missing), or ``python bench/bench.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import report
import yaml
from report import Cell, Sample, Target

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
BASELINE_FILE = BENCH_DIR / "baseline.json"
DOCS_PAGE = REPO_DIR / "docs" / "performance.md"
DOCS_PLOT = REPO_DIR / "docs" / "performance.png"

BENCH_HOST = "bench.local"  # matched by an exact pattern
WILDCARD_HOST = "api.bench.local"  # matched by "*.bench.local"
SMALL_BODY = b"outrigger-bench " * 6 + b"0123\n"  # 101 bytes
# payload name -> (path, size)
PAYLOADS: dict[str, tuple[str, int]] = {
    "small": ("/small.txt", len(SMALL_BODY)),
    "16KiB": ("/16k.bin", 16 << 10),
    "1MiB": ("/1m.bin", 1 << 20),
}
POLICY_COUNTS = (1, 100, 1000)
PACED_TARGETS = ("nginx", "naive", "outrigger-bare", "outrigger-full")

READY_TIMEOUT_S = 60.0  # 1,000 policies take a few seconds to load
STOP_TIMEOUT_S = 5.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- processes


class Processes:
    """Every process this script starts; `stop_all` kills each one's process group by id."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, argv: Sequence[str], log_path: Path, env: dict[str, str], discard_stdout: bool = False
    ) -> subprocess.Popen[bytes]:
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if discard_stdout else log,
                stderr=log,
                env=env,
                start_new_session=True,  # own process group: Ctrl-C in the terminal does not reach it
            )
        self._procs.append(proc)
        return proc

    def all_alive(self) -> bool:
        return all(proc.poll() is None for proc in self._procs)

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in reversed(self._procs):
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
        "servers (origin nginx, nginx proxy, naive proxy, Outrigger) on CPU 1 via `taskset -c 1`; "
        "wrk, hey and the OTLP sink on CPU 0 via `taskset -c 0`",
    )


# --------------------------------------------------------------------------- /proc


def system_cpu_ticks() -> tuple[int, int]:
    """(user + nice + system + idle + iowait, idle + iowait) ticks over every CPU, from
    /proc/stat. Interrupt and softirq time (much of loopback TCP) and steal are left out,
    so "busy" = task time and is comparable with the per-process counters."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values[:5]), values[3] + values[4]


def _group_stats(pgid: int) -> list[tuple[str, list[str]]]:
    """(pid, stat fields from field 3 on) of the live processes in process group `pgid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # fields[0] is field 3 (state) of proc(5): pgrp = 5, utime = 14, stime = 15.
        if len(fields) > 12 and int(fields[2]) == pgid:
            found.append((stat.parent.name, fields))
    return found


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU of the live processes in process group `pgid`."""
    return sum(int(f[11]) + int(f[12]) for _pid, f in _group_stats(pgid)) / _CLK_TCK


def group_memory_mib(pgid: int, key: str = "VmRSS") -> float:
    """Sum of `key` (VmRSS, or VmHWM = peak RSS) over the processes in group `pgid`, MiB."""
    kib = 0
    for pid, _fields in _group_stats(pgid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    kib += int(line.split()[1])
    return kib / 1024


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

ORIGIN_BODY = """\
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

TIMEOUTS = {"connect": "1s", "per_try": "10s", "total": "30s"}
FULL_LAYERS: dict[str, Any] = {
    "headers": {"set": {"X-Bench": "outrigger"}},
    "retries": {
        "max_attempts": 3,
        "on": ["connect-failure", "reset", "timeout", 502, 503, 504, 429],
        "backoff": {"base": "50ms", "max": "1s"},
        "budget": {"ratio": 0.2, "min_per_second": 10, "window": "10s"},
    },
    "idempotency": {
        "header": "Idempotency-Key",
        "methods": ["POST", "PATCH"],
        "replay": {"ttl": "1h", "max_entries": 1000, "max_body_bytes": "64KiB"},
    },
    "circuit_breaker": {
        "failure_threshold": 5,
        "reset_timeout": "10s",
        "failure_on": ["connect-failure", "timeout", "5xx"],
    },
    "concurrency": {"max_in_flight": 10000, "max_queued": 10000, "queue_timeout": "5s"},
    "rate_limit": {"rate": 100_000_000, "per": "1s", "burst": 100_000_000, "max_wait": "500ms"},
}


@dataclass(frozen=True)
class OutriggerVariant:
    name: str
    description: str
    full: bool
    traced: bool = False
    cached: bool = False  # full + a response cache: every measured request is a fresh hit
    policies: int = 1  # the benchmarked policy plus policies - 1 for other hosts


def outrigger_variants() -> list[OutriggerVariant]:
    variants = [
        OutriggerVariant("outrigger-bare", "Outrigger, timeouts only, access log off", full=False),
        OutriggerVariant("outrigger-full", "Outrigger, every layer on, access log on", full=True),
        OutriggerVariant(
            "outrigger-traced",
            "outrigger-full + every request traced (OTLP/HTTP to the local sink)",
            full=True,
            traced=True,
        ),
        OutriggerVariant(
            "outrigger-cached",
            "outrigger-full + cache (ttl 1h): the cache-hit path",
            full=True,
            cached=True,
        ),
    ]
    variants += [
        OutriggerVariant(
            f"outrigger-{count}-policies",
            f"outrigger-full + {count - 1} policies for other hosts",
            full=True,
            policies=count,
        )
        for count in POLICY_COUNTS
        if count > 1
    ]
    return variants


def filler_policies(count: int, upstream: str) -> list[dict[str, Any]]:
    """`count` full-policy copies for other hosts, alternately an exact name and a wildcard."""
    policies = []
    for index in range(count):
        host = f"api{index}.provider{index}.example" if index % 2 else f"*.tenant{index}.example"
        policies.append({"hosts": [host], "upstream": upstream, "timeouts": TIMEOUTS, **FULL_LAYERS})
    return policies


def write_outrigger_config(
    root: Path, variant: OutriggerVariant, upstream_port: int, sink_port: int
) -> tuple[Path, int, int]:
    """The config folder for `variant`; returns the config path, the main and the admin port."""
    (root / "policies").mkdir(parents=True)
    main_port, admin_port = free_port(), free_port()
    telemetry: dict[str, Any] = {"access_log": variant.full}
    if variant.traced:
        telemetry["traces"] = {"endpoint": f"http://127.0.0.1:{sink_port}/v1/traces", "sample_ratio": 1.0}
    config = {
        "listen": {"host": "127.0.0.1", "port": main_port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "policy_dirs": ["policies/"],
        "unknown_hosts": "deny",
        "drain_timeout": "1s",
        "telemetry": telemetry,
    }
    upstream = f"http://127.0.0.1:{upstream_port}"
    policy: dict[str, Any] = {
        "hosts": [BENCH_HOST, f"*.{BENCH_HOST}"] if variant.full else [BENCH_HOST],
        "upstream": upstream,
        "allow_private_addresses": True,
        "timeouts": TIMEOUTS,
    }
    if variant.full:
        policy.update(FULL_LAYERS)
    if variant.cached:
        policy["cache"] = {"ttl": "1h", "max_entry_bytes": "2MiB", "max_bytes": "64MiB"}
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "policies" / "bench.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    if variant.policies > 1:
        others = filler_policies(variant.policies - 1, upstream)
        (root / "policies" / "others.yaml").write_text(yaml.safe_dump(others, sort_keys=False))
    return root / "config.yaml", main_port, admin_port


def nginx_conf(tmp: Path, name: str, body: str) -> Path:
    (tmp / f"{name}-tmp").mkdir()
    path = tmp / f"{name}.conf"
    path.write_text(NGINX_COMMON.format(tmp=tmp, name=name, body=body))
    return path


def start_nginx(
    procs: Processes, nginx: str, tmp: Path, name: str, body: str, pin: Pinning, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    conf = nginx_conf(tmp, name, body)
    base = [nginx, "-p", f"{tmp}/", "-e", f"{tmp}/{name}-error.log", "-c", str(conf)]
    check = subprocess.run([*base, "-t", "-q"], capture_output=True, timeout=30, env=env)
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t failed for {name}:\n{check.stderr.decode(errors='replace')}")
    return procs.start([*pin.server, *base], tmp / f"{name}.out", env)


def outrigger_binary() -> str:
    return shutil.which("outrigger") or str(Path(sys.executable).with_name("outrigger"))


def start_outrigger(
    procs: Processes,
    tmp: Path,
    variant: OutriggerVariant,
    upstream_port: int,
    sink_port: int,
    pin: Pinning,
    env: dict[str, str],
) -> tuple[int, int, subprocess.Popen[bytes]]:
    """Checks and starts `variant` (`outrigger run -c CONFIG`); returns its main and admin
    port and the process. Its stdout (the access log) goes to /dev/null, stderr to the log."""
    config, port, admin_port = write_outrigger_config(tmp / variant.name, variant, upstream_port, sink_port)
    outrigger = outrigger_binary()
    check = subprocess.run([outrigger, "check", "-c", str(config)], capture_output=True, timeout=120, env=env)
    if check.returncode != 0:
        raise RuntimeError(
            f"outrigger check failed for {variant.name}:\n{check.stderr.decode(errors='replace')}"
        )
    argv = [*pin.server, outrigger, "run", "-c", str(config)]
    return port, admin_port, procs.start(argv, tmp / f"{variant.name}.out", env, discard_stdout=True)


def http_get(url: str, host: str, timeout: float = 2.0) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with opener.open(request, timeout=timeout) as response:
            status: int = response.status
            return status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_ready(
    name: str, url: str, host: str, expected_len: int | None, log_path: Path, procs_alive: Callable[[], bool]
) -> None:
    """Poll until `url` answers 200 with the expected body length (None: any); bounded in time."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    for _ in range(int(READY_TIMEOUT_S / 0.05) + 1):
        if not procs_alive():
            break
        try:
            status, body = http_get(url, host)
            if status == 200 and expected_len in (None, len(body)):
                return
            last = f"status {status}, {len(body)} bytes: {body[:200]!r}"
        except OSError as error:
            last = repr(error)
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
    raise RuntimeError(f"{name} not ready at {url}: {last}\n--- {log_path.name} ---\n{tail}")


OUTRIGGER_COUNTER = re.compile(
    r"^outrigger_(requests_total|attempts_total|rejections_total)\{(.*?)\} ([\d.e+]+)$", re.MULTILINE
)


def outrigger_counters(admin_port: int) -> dict[str, int]:
    """Outrigger's own count of what did not go well (from its /metrics): responses by code
    other than 200, attempts by outcome other than 2xx, rejections by type."""
    _status, body = http_get(f"http://127.0.0.1:{admin_port}/metrics", "127.0.0.1")
    counters: dict[str, int] = {}
    for metric, labels, value in OUTRIGGER_COUNTER.findall(body.decode()):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = {
            "requests_total": f"status {label.get('code')}",
            "attempts_total": f"attempt {label.get('outcome')}",
            "rejections_total": f"rejected {label.get('type')}",
        }[metric]
        if key not in ("status 200", "attempt 2xx"):
            counters[key] = counters.get(key, 0) + round(float(value))
    return counters


def sink_stats(port: int) -> dict[str, int]:
    _status, body = http_get(f"http://127.0.0.1:{port}/stats", "127.0.0.1")
    stats: dict[str, int] = json.loads(body)
    return stats


# --------------------------------------------------------------------------- load generators

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> Sample:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    total = re.search(r"^\s+(\d+) requests in", output, re.MULTILINE)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    details = re.findall(r"^\s*((?:Non-2xx or 3xx responses|Socket errors):.*)$", output, re.MULTILINE)
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sock:
        errors += sum(int(n) for n in sock.groups())
    return Sample(
        float(rps.group(1)),
        _wrk_ms(p50.group(1)),
        _wrk_ms(p99.group(1)),
        int(total.group(1)),
        errors,
        error_detail="; ".join(details),
    )


def parse_hey(output: str) -> Sample:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%+ in ([\d.]+) secs", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%+ in ([\d.]+) secs", output, re.MULTILINE)
    if not (rps and p50 and p99):
        raise RuntimeError(f"unexpected hey output:\n{output}")
    codes = {
        int(c): int(n) for c, n in re.findall(r"^\s+\[(\d{3})\]\s+(\d+) responses", output, re.MULTILINE)
    }
    _, _, error_section = output.partition("Error distribution:")  # "  [count]\tGet ...: error"
    failed = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]", error_section, re.MULTILINE))
    errors = sum(n for code, n in codes.items() if not 200 <= code < 300) + failed
    details = [f"{n} x status {code}" for code, n in codes.items() if not 200 <= code < 300]
    details += [line.strip() for line in error_section.strip().splitlines()[:3]]
    return Sample(
        float(rps.group(1)),
        float(p50.group(1)) * 1000,
        float(p99.group(1)) * 1000,
        sum(codes.values()) + failed,
        errors,
        error_detail="; ".join(details),
    )


@dataclass(frozen=True)
class Load:
    """The load generators and their settings: wrk closed loop, hey at a paced rate."""

    wrk: str
    hey: str
    threads: int
    connections: int
    paced_workers: int
    paced_rate: int


def run_load(
    load: Load, tool: str, url: str, host: str, duration: float, pin: Pinning, env: dict[str, str]
) -> Sample:
    seconds = f"{max(1, round(duration))}s"
    if tool == "wrk":
        argv = [load.wrk, f"-t{load.threads}", f"-c{load.connections}", f"-d{seconds}", "--timeout", "5s"]
        argv += ["--latency", "-H", f"Host: {host}", url]
    else:
        per_worker = load.paced_rate / load.paced_workers
        argv = [load.hey, "-c", str(load.paced_workers), "-q", f"{per_worker:g}", "-z", seconds, "-t", "5"]
        argv += ["-host", host, url]
    result = subprocess.run([*pin.client, *argv], capture_output=True, timeout=duration + 30, env=env)
    output = result.stdout.decode(errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
    return parse_wrk(output) if tool == "wrk" else parse_hey(output)


# --------------------------------------------------------------------------- measurement


def build_cells(targets: dict[str, Target]) -> list[Cell]:
    cells = [
        Cell("throughput", name, payload, BENCH_HOST, "wrk")
        for payload in PAYLOADS
        for name in targets
        if not name.endswith("-policies")
    ]
    cells += [Cell("paced", name, "small", BENCH_HOST, "hey") for name in PACED_TARGETS]
    for count in POLICY_COUNTS:
        name = "outrigger-full" if count == 1 else f"outrigger-{count}-policies"
        for host in (BENCH_HOST, WILDCARD_HOST):
            if count == 1 and host == BENCH_HOST:
                continue  # that cell is outrigger-full / small in the throughput phase
            wildcard = host == WILDCARD_HOST
            cells.append(Cell("policies", name, "small", host, "wrk", policies=count, wildcard=wildcard))
    return cells


def measure_once(
    cell: Cell,
    targets: dict[str, Target],
    origin_pgid: int,
    load: Load,
    duration: float,
    pin: Pinning,
    env: dict[str, str],
) -> Sample:
    target = targets[cell.target]
    url = f"http://127.0.0.1:{target.port}{PAYLOADS[cell.payload][0]}"
    separate = target.pgid != origin_pgid
    cpu0 = group_cpu_seconds(target.pgid)
    origin0 = group_cpu_seconds(origin_pgid) if separate else 0.0
    sys0 = system_cpu_ticks()
    client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall0 = time.monotonic()
    sample = run_load(load, cell.tool, url, cell.host, duration, pin, env)
    sample.wall_s = time.monotonic() - wall0
    sample.target_cpu_s = group_cpu_seconds(target.pgid) - cpu0
    sample.upstream_cpu_s = group_cpu_seconds(origin_pgid) - origin0 if separate else 0.0
    client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sample.client_cpu_s = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
    sys1 = system_cpu_ticks()
    sample.system_cpu_s = ((sys1[0] - sys0[0]) - (sys1[1] - sys0[1])) / _CLK_TCK
    sample.rss_mib = group_memory_mib(target.pgid)
    return sample


def measure(
    cells: list[Cell],
    targets: dict[str, Target],
    origin_pgid: int,
    args: argparse.Namespace,
    load: Load,
    pin: Pinning,
    env: dict[str, str],
) -> None:
    if args.warmup > 0:
        for cell in cells:
            if cell.tool == "wrk":
                measure_once(cell, targets, origin_pgid, load, args.warmup, pin, env)
    for run in range(1, args.runs + 1):
        for cell in cells:
            duration = args.paced_duration if cell.tool == "hey" else args.duration
            sample = measure_once(cell, targets, origin_pgid, load, duration, pin, env)
            cell.samples.append(sample)
            print(
                f"  run {run}/{args.runs} {cell.phase:>10} {cell.payload:>5} {cell.label:<36} "
                f"{sample.rps:>9,.0f} req/s  p50 {sample.p50_ms:7.2f} ms  p99 {sample.p99_ms:7.2f} ms  "
                f"{sample.target_cpu_s / max(1, sample.requests) * 1e6:6.0f} us/req  "
                f"others {sample.other_cores:.2f}"
                + (f"  ERRORS {sample.errors}: {sample.error_detail}" if sample.errors else ""),
                flush=True,
            )


def start_servers(
    tmp: Path, procs: Processes, nginx: str, pin: Pinning, env: dict[str, str]
) -> tuple[dict[str, Target], int, int]:
    """Starts every server; returns the targets, the origin's process group and the sink port."""
    # nginx workers run as an unprivileged user when started by root: let them read.
    tmp.chmod(0o755)
    www = tmp / "www"
    www.mkdir(mode=0o755)
    for name, (path, size) in PAYLOADS.items():
        (www / path.lstrip("/")).write_bytes(SMALL_BODY if name == "small" else os.urandom(size))
    for served in www.iterdir():
        served.chmod(0o644)

    targets: dict[str, Target] = {}
    origin_port = free_port()
    origin = start_nginx(procs, nginx, tmp, "direct", ORIGIN_BODY.format(port=origin_port, tmp=tmp), pin, env)
    targets["direct"] = Target("direct", origin_port, "nginx origin, no proxy", origin.pid, "direct")
    port = free_port()
    body = PROXY_BODY.format(port=port, upstream_port=origin_port)
    proc = start_nginx(procs, nginx, tmp, "nginx", body, pin, env)
    targets["nginx"] = Target(
        "nginx", port, "nginx reverse proxy (keepalive 64 to the origin)", proc.pid, "nginx"
    )
    port = free_port()
    argv = [sys.executable, str(BENCH_DIR / "naive_proxy.py"), "--port", str(port)]
    proc = procs.start(
        [*pin.server, *argv, "--upstream", f"http://127.0.0.1:{origin_port}"], tmp / "naive.out", env
    )
    targets["naive"] = Target(
        "naive", port, "bench/naive_proxy.py (aiohttp, stock asyncio)", proc.pid, "naive"
    )
    sink_port = free_port()
    argv = [sys.executable, str(BENCH_DIR / "otlp_sink.py"), "--port", str(sink_port)]
    procs.start([*pin.client, *argv], tmp / "otlp-sink.out", env)

    for variant in outrigger_variants():
        port, admin_port, proc = start_outrigger(procs, tmp, variant, origin_port, sink_port, pin, env)
        targets[variant.name] = Target(
            variant.name, port, variant.description, proc.pid, variant.name, admin_port=admin_port
        )

    hosts = {
        name: [BENCH_HOST, WILDCARD_HOST]
        if name.startswith("outrigger-") and name != "outrigger-bare"
        else [BENCH_HOST]
        for name in targets
    }
    for name, target in targets.items():
        for host in hosts[name]:
            for path, size in PAYLOADS.values():
                url = f"http://127.0.0.1:{target.port}{path}"
                wait_ready(name, url, host, size, tmp / f"{target.log}.out", procs.all_alive)
    wait_ready(
        "otlp-sink",
        f"http://127.0.0.1:{sink_port}/stats",
        "127.0.0.1",
        None,
        tmp / "otlp-sink.out",
        procs.all_alive,
    )
    return targets, origin.pid, sink_port


# --------------------------------------------------------------------------- run


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


def _cpu_busy(seconds: float) -> float:
    """Fraction of all CPUs busy over `seconds` (/proc/stat), before anything is started."""
    total0, idle0 = system_cpu_ticks()
    time.sleep(seconds)
    total1, idle1 = system_cpu_ticks()
    return round(1 - (idle1 - idle0) / max(1, total1 - total0), 2)


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def collect_meta(args: argparse.Namespace, nginx: str, load: Load, pin: Pinning) -> dict[str, Any]:
    import aiohttp

    # Outrigger's identity: the last commit that changed its code or dependencies.
    code = ["--", "proxy", "pyproject.toml"]
    commit = _first_line(["git", "-C", str(REPO_DIR), "log", "-1", "--format=%h", *code])
    dirty = _first_line(["git", "-C", str(REPO_DIR), "status", "--porcelain", *code])
    uvloop = _first_line([sys.executable, "-c", "import uvloop; print(uvloop.__version__)"])
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(
            [os.environ.get("BENCH_COMMAND", "python bench/bench.py"), shlex.join(args.argv)]
        ),
        "label": args.label,
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop if re.fullmatch(r"[\d.]+", uvloop) else "not installed",
        "nginx": _first_line([nginx, "-v"]).replace("nginx version: ", ""),
        "wrk": re.sub(r"\s+Copyright.*", "", _first_line([load.wrk, "-v"])),
        "outrigger_commit": commit + (" (with uncommitted changes)" if dirty not in ("", "unknown") else ""),
        "threads": load.threads,
        "connections": load.connections,
        "duration_s": args.duration,
        "paced_duration_s": args.paced_duration,
        "paced_rate": load.paced_rate,
        "paced_workers": load.paced_workers,
        "warmup_s": args.warmup,
        "runs": args.runs,
        "pinning": pin.description,
        "loadavg_before": _loadavg(),
        "cpu_busy_before": _cpu_busy(1.0),
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 run of 2 s per cell, 1 s warm-up")
    parser.add_argument(
        "--runs", type=int, default=3, help="measurements per cell (default 3; median reported)"
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk measurement (default 5)")
    parser.add_argument(
        "--paced-duration", type=float, help="seconds per hey measurement (default: --duration)"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured wrk load per cell")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--paced-rate", type=int, default=500, help="hey total req/s (default 500)")
    parser.add_argument("--paced-workers", type=int, default=10, help="hey workers (-c), rate split evenly")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers/client with taskset")
    parser.add_argument("--nginx", help="nginx binary (default: PATH, /usr/sbin/nginx)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where latest.md/json go")
    parser.add_argument("--label", default="", help="a heading for this run in the report, e.g. 'baseline'")
    parser.add_argument(
        "--write-docs", action="store_true", help="regenerate the results in docs/performance.md and .png"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=BASELINE_FILE,
        help="the 'today' CPU/request the CPU target compares with",
    )
    parser.add_argument(
        "--save-baseline", action="store_true", help="write this run's CPU/request to --baseline"
    )
    args = parser.parse_args(argv)
    args.argv = list(argv)
    if args.quick:
        args.runs, args.duration, args.warmup = 1, 2.0, 1.0
    if args.paced_duration is None:
        args.paced_duration = args.duration
    if (
        not 1 <= args.runs <= 20
        or not 1 <= min(args.duration, args.paced_duration) <= max(args.duration, args.paced_duration) <= 120
    ):
        parser.error("bounds: 1 <= --runs <= 20, 1 <= --duration, --paced-duration <= 120")
    if not 0 <= args.warmup <= 30:
        parser.error("bounds: 0 <= --warmup <= 30")
    if not 1 <= args.connections <= 1024 or not 1 <= args.threads <= args.connections:
        parser.error("bounds: 1 <= --connections <= 1024, 1 <= --threads <= --connections")
    if not 1 <= args.paced_workers <= args.paced_rate <= 100_000:
        parser.error("bounds: 1 <= --paced-workers <= --paced-rate <= 100000")
    return args


def find_tool(name: str, explicit: str | None = None) -> str:
    for candidate in (explicit, shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit(f"{name} not found: run bench/run.sh (installs it)")


def run_benchmark(args: argparse.Namespace) -> int:
    nginx = find_tool("nginx", args.nginx)
    load = Load(
        find_tool("wrk"),
        find_tool("hey"),
        args.threads,
        args.connections,
        args.paced_workers,
        args.paced_rate,
    )
    pin = choose_pinning(not args.no_pin)
    env = clean_env()
    meta = collect_meta(args, nginx, load, pin)
    print(f"pinning: {pin.description}", flush=True)
    if meta["cpu_busy_before"] > 0.2:
        print(
            f"WARNING: {meta['cpu_busy_before']:.0%} of the CPUs were busy before the benchmark "
            "started: other work on this machine will skew the numbers",
            flush=True,
        )

    started = time.monotonic()
    procs = Processes()
    previous_term = signal.signal(signal.SIGTERM, _raise_exit)
    # Stop the servers before their temp dir is removed (nginx keeps files open in it).
    with tempfile.TemporaryDirectory(prefix="outrigger-bench-", ignore_cleanup_errors=True) as tmp_name:
        try:
            targets, origin_pgid, sink_port = start_servers(Path(tmp_name), procs, nginx, pin, env)
            for target in targets.values():
                target.idle_rss_mib = group_memory_mib(target.pgid)
            print(
                "all targets ready: " + ", ".join(f"{t.name}=:{t.port}" for t in targets.values()), flush=True
            )
            cells = build_cells(targets)
            measure(cells, targets, origin_pgid, args, load, pin, env)
            for target in targets.values():
                target.final_rss_mib = group_memory_mib(target.pgid)
                target.peak_rss_mib = group_memory_mib(target.pgid, "VmHWM")
            meta["otlp_sink"] = sink_stats(sink_port)
            for target in targets.values():
                if target.admin_port is not None:
                    target.outrigger_counters = outrigger_counters(target.admin_port)
            if not procs.all_alive():
                raise RuntimeError("a server exited during the benchmark")
        finally:
            procs.stop_all()
            signal.signal(signal.SIGTERM, previous_term)
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_after"] = _loadavg()

    if args.save_baseline:
        args.baseline.write_text(report.baseline_json(cells, meta))
        print(f"baseline written: {args.baseline}")
    baseline = json.loads(args.baseline.read_text()) if args.baseline.exists() else None
    result = report.Report(list(targets.values()), cells, meta, baseline)
    markdown = result.markdown()
    print()
    print(markdown, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(markdown)
    (args.out / "latest.json").write_text(result.json())
    print(f"\nwritten: {args.out / 'latest.md'}, {args.out / 'latest.json'}")
    if args.write_docs:
        report.write_docs(result, DOCS_PAGE, DOCS_PLOT)
        print(f"written: {DOCS_PAGE}, {DOCS_PLOT}")
    if any(cell.errors for cell in cells):
        print("WARNING: some runs had errors (non-2xx or socket errors); see the errors column")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_benchmark(args)
    except KeyboardInterrupt:
        print("\ninterrupted: every server started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
