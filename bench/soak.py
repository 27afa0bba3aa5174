#!/usr/bin/env python3
"""Soak: 1,000,000 requests through Outrigger's full policy, RSS and open fds sampled every 100,000.

Issue 9 asks that neither grows. Everything runs on 127.0.0.1 (the nginx origin and Outrigger from
bench.py's own setup), the load is `hey -n SEGMENT` run SEGMENTS times in a row (bounded in count
and, per segment, in time), and every process is stopped at the end.

Usage: ``python bench/soak.py [--segments 10] [--per-segment 100000]``; writes
``bench/results/soak.md`` and prints the same table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # bench/ is a folder of scripts, not a package


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--per-segment", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args(argv)
    hey = bench.find_tool("hey")
    nginx = bench.find_tool("nginx")
    pin = bench.choose_pinning(True)
    env = bench.clean_env()
    procs = bench.Processes()
    rows: list[tuple[int, float, int, float]] = []
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
            port, _, proc = bench.start_outrigger(procs, tmp, variant, origin_port, 0, pin, env)
            url = f"http://127.0.0.1:{port}/small.txt"
            bench.wait_ready(
                "outrigger", url, bench.BENCH_HOST, None, tmp / "outrigger-full.out", procs.all_alive
            )
            pid = proc.pid
            rows.append((0, bench.group_memory_mib(pid), open_fds(pid), 0.0))
            served = 0
            for _ in range(args.segments):
                started = time.monotonic()
                load = [*pin.client, hey, "-n", str(args.per_segment), "-c", str(args.connections)]
                load += ["-host", bench.BENCH_HOST, url]
                result = subprocess.run(load, capture_output=True, text=True, timeout=900, env=env)
                sample = bench.parse_hey(result.stdout)
                if sample.errors:
                    print(f"segment had {sample.errors} errors:\n{result.stdout[-2000:]}", file=sys.stderr)
                    return 1
                served += args.per_segment
                rate = args.per_segment / (time.monotonic() - started)
                rows.append((served, bench.group_memory_mib(pid), open_fds(pid), rate))
                _, rss, fds, _ = rows[-1]
                print(f"{served:>9} requests  RSS {rss:6.1f} MiB  fds {fds:4d}  {rate:7.0f} req/s")
    finally:
        procs.stop_all()
    table = ["| requests | RSS MiB | open fds | req/s in segment |", "| ---: | ---: | ---: | ---: |"]
    table += [f"| {n:,} | {rss:.1f} | {fds} | {rate:,.0f} |" for n, rss, fds, rate in rows]
    bench.RESULTS_DIR.mkdir(exist_ok=True)
    (bench.RESULTS_DIR / "soak.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
