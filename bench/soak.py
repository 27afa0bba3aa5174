#!/usr/bin/env python3
"""Soak: 1,000,000 requests through Outrigger's full policy, RSS and open fds sampled every 100,000.

Issues 9 and 14 ask that neither grows. Everything runs on 127.0.0.1 (the nginx origin and
Outrigger from bench.py's own setup, every layer of ``bench.FULL_LAYERS`` on, access log on), the
load is `hey -n SEGMENT` run SEGMENTS times in a row; each segment and the whole run are bounded
in time, and every process is stopped at the end. A segment with any non-2xx answer or client
error fails the soak; Outrigger's own count of what did not go well (from its /metrics) is
printed under the table.

Usage: ``python bench/soak.py [--segments 10] [--per-segment 100000] [--max-minutes 30]``;
writes ``bench/results/soak.md`` and prints the same table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # bench/ is a folder of scripts, not a package


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass(frozen=True)
class Row:
    served: int
    rss_mib: float
    fds: int
    rate: float
    p99_ms: float


def table(rows: list[Row], counters: dict[str, int], elapsed_s: float) -> str:
    lines = [
        "| requests | RSS MiB | open fds | req/s in segment | p99 ms in segment |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r.served:,} | {r.rss_mib:.1f} | {r.fds} | {r.rate:,.0f} | {r.p99_ms:.1f} |" for r in rows]
    unusual = ", ".join(f"{key}: {count}" for key, count in sorted(counters.items())) or "none"
    lines += [
        "",
        f"{rows[-1].served:,} requests in {elapsed_s:.0f} s; Outrigger's non-200 counters: {unusual}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--per-segment", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--max-minutes", type=float, default=30.0, help="stop after this many minutes")
    args = parser.parse_args(argv)
    hey = bench.find_tool("hey")
    nginx = bench.find_tool("nginx")
    pin = bench.choose_pinning(True)
    env = bench.clean_env()
    procs = bench.Processes()
    rows: list[Row] = []
    counters: dict[str, int] = {}
    began = time.monotonic()
    give_up = began + args.max_minutes * 60
    try:
        with tempfile.TemporaryDirectory(prefix="outrigger-soak-") as tmp_name:
            tmp = Path(tmp_name)
            tmp.chmod(0o755)
            www = tmp / "www"
            www.mkdir(mode=0o755)
            (www / "small.txt").write_bytes(bench.SMALL_BODY)
            (www / "small.txt").chmod(0o644)
            origin_port = bench.free_port()
            body = bench.ORIGIN_BODY.format(port=origin_port, tmp=tmp)
            bench.start_nginx(procs, nginx, tmp, "direct", body, pin, env)
            variant = bench.OutriggerVariant("outrigger-full", "full policy", full=True)
            port, admin_port, proc = bench.start_outrigger(procs, tmp, variant, origin_port, 0, pin, env)
            url = f"http://127.0.0.1:{port}/small.txt"
            bench.wait_ready(
                "outrigger", url, bench.BENCH_HOST, None, tmp / "outrigger-full.out", procs.all_alive
            )
            pid = proc.pid
            rows.append(Row(0, bench.group_memory_mib(pid), open_fds(pid), 0.0, 0.0))
            served = 0
            for _ in range(args.segments):
                left = give_up - time.monotonic()
                if left <= 0:
                    print(f"time limit of {args.max_minutes:g} min reached", file=sys.stderr)
                    break
                started = time.monotonic()
                load = [*pin.client, hey, "-n", str(args.per_segment), "-c", str(args.connections)]
                load += ["-host", bench.BENCH_HOST, url]
                result = subprocess.run(load, capture_output=True, text=True, timeout=left, env=env)
                sample = bench.parse_hey(result.stdout)
                if sample.errors or sample.requests != args.per_segment:
                    print(
                        f"segment: {sample.requests} answers, {sample.errors} errors:\n"
                        + result.stdout[-2000:],
                        file=sys.stderr,
                    )
                    return 1
                served += args.per_segment
                rate = args.per_segment / (time.monotonic() - started)
                rows.append(Row(served, bench.group_memory_mib(pid), open_fds(pid), rate, sample.p99_ms))
                row = rows[-1]
                print(
                    f"{served:>9} requests  RSS {row.rss_mib:6.1f} MiB  fds {row.fds:4d}"
                    f"  {rate:7.0f} req/s  p99 {row.p99_ms:6.1f} ms",
                    flush=True,
                )
            counters = bench.outrigger_counters(admin_port)
    finally:
        procs.stop_all()
    report = table(rows, counters, time.monotonic() - began)
    bench.RESULTS_DIR.mkdir(exist_ok=True)
    (bench.RESULTS_DIR / "soak.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
