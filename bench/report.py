"""Report for bench/bench.py: medians per cell, the issue-9 targets, markdown, JSON, docs, plot."""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DOCS_START = "<!-- bench:results:start -->"
DOCS_END = "<!-- bench:results:end -->"
FOREIGN_LOAD_WARN = 0.1  # cores used by processes outside the benchmark


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    target_cpu_s: float = 0.0  # CPU used by the server under test during the run
    upstream_cpu_s: float = 0.0  # CPU used by the origin nginx (0 for "direct": counted above)
    client_cpu_s: float = 0.0  # CPU used by the load generator
    system_cpu_s: float = 0.0  # CPU used by everything on the machine (/proc/stat)
    wall_s: float = 0.0
    rss_mib: float = 0.0  # RSS of the server under test after the run
    error_detail: str = ""  # the load generator's own words about the errors

    @property
    def other_cores(self) -> float:
        """CPU used by processes that are not part of this benchmark, in cores."""
        ours = self.target_cpu_s + self.upstream_cpu_s + self.client_cpu_s
        return max(0.0, self.system_cpu_s - ours) / max(1e-9, self.wall_s)


@dataclass
class Target:
    name: str
    port: int
    description: str
    pgid: int  # process group of the server under test (its own session)
    log: str  # its output file is <log>.out in the temp dir
    idle_rss_mib: float = 0.0  # after start, before any load
    final_rss_mib: float = 0.0  # after the last measurement
    peak_rss_mib: float = 0.0  # VmHWM after the last measurement
    admin_port: int | None = None  # Outrigger's admin listener
    # Outrigger's /metrics at the end: non-200 responses, non-2xx attempts, rejections
    outrigger_counters: dict[str, int] = field(default_factory=dict)


@dataclass
class Cell:
    """One thing measured `runs` times: a target under one load, payload and Host."""

    phase: str  # "throughput" (wrk) | "paced" (hey) | "policies" (wrk)
    target: str
    payload: str
    host: str
    tool: str  # "wrk" | "hey"
    policies: int = 1
    wildcard: bool = False  # the host is matched by a wildcard pattern
    samples: list[Sample] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.phase == "policies":
            return f"{self.policies} policies, {'wildcard' if self.wildcard else 'exact'} host"
        return self.target

    def _median(self, values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    @property
    def rps(self) -> float:
        return self._median([s.rps for s in self.samples])

    @property
    def p50(self) -> float:
        return self._median([s.p50_ms for s in self.samples])

    @property
    def p99(self) -> float:
        return self._median([s.p99_ms for s in self.samples])

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.samples)

    @property
    def cpu_us_per_request(self) -> float:
        """Median CPU time the server under test spent per request (microseconds)."""
        return self._median([s.target_cpu_s / max(1, s.requests) * 1e6 for s in self.samples])

    @property
    def servers_busy(self) -> float:
        """Median CPU of target + origin over the run, in cores (1.0 = one core saturated)."""
        return self._median([(s.target_cpu_s + s.upstream_cpu_s) / max(1e-9, s.wall_s) for s in self.samples])

    @property
    def other_cores(self) -> float:
        return self._median([s.other_cores for s in self.samples])

    @property
    def rss_mib(self) -> float:
        return self.samples[-1].rss_mib if self.samples else float("nan")


@dataclass(frozen=True)
class Check:
    goal: str
    measured: str
    passed: bool | None  # None: could not be measured in this run
    margin: str


def _at_least(goal: str, value: float, minimum: float, unit: str = "x") -> Check:
    measured = f"{value:.2f}{unit}"
    if math.isnan(value) or value <= 0:
        return Check(goal, measured, None, "not measured")
    if value >= minimum:
        return Check(goal, measured, True, f"{value / minimum - 1:.0%} above the goal")
    return Check(goal, measured, False, f"short by {1 - value / minimum:.0%} (needs {minimum / value:.2f}x)")


def _at_most(goal: str, value: float, maximum: float, unit: str) -> Check:
    measured = f"{value:,.1f} {unit}"
    if math.isnan(value):
        return Check(goal, measured, None, "not measured")
    if value <= maximum:
        return Check(goal, measured, True, f"{maximum - value:,.1f} {unit} to spare")
    over = f"{value - maximum:,.1f} {unit} over"
    return Check(
        goal, measured, False, over + (f" ({value / maximum:.1f}x the limit)" if maximum > 0 else "")
    )


def _fmt(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


class Report:
    def __init__(
        self, targets: list[Target], cells: list[Cell], meta: dict[str, Any], baseline: dict[str, Any] | None
    ) -> None:
        self.targets = targets
        self.cells = cells
        self.meta = meta
        self.baseline = baseline
        self.payloads = list(dict.fromkeys(c.payload for c in cells if c.phase == "throughput"))

    def cell(self, phase: str, target: str, payload: str = "small", wildcard: bool = False) -> Cell | None:
        for cell in self.cells:
            if (cell.phase, cell.target, cell.payload, cell.wildcard) == (phase, target, payload, wildcard):
                return cell
        return None

    def _rps(self, target: str, payload: str) -> float:
        cell = self.cell("throughput", target, payload)
        return cell.rps if cell else float("nan")

    def _ratio(self, target: str, reference: str, payload: str) -> float:
        return self._rps(target, payload) / self._rps(reference, payload)

    def policy_cells(self) -> list[Cell]:
        """1 / 100 / 1,000 policies, exact then wildcard; 1 policy exact is outrigger-full."""
        one = self.cell("throughput", "outrigger-full")
        return ([one] if one else []) + [c for c in self.cells if c.phase == "policies"]

    def _policy_ratio(self, cell: Cell) -> float:
        one = next(c for c in self.policy_cells() if c.policies == 1 and c.wildcard == cell.wildcard)
        return cell.rps / one.rps

    # ----------------------------------------------------------------------- targets

    def checks(self) -> list[Check]:
        checks = []
        for payload in self.payloads:
            ratio = self._ratio("outrigger-full", "naive", payload)
            checks.append(_at_least(f"full req/s >= 1.2x naive ({payload})", ratio, 1.2))
        for payload in self.payloads:
            ratio = self._ratio("outrigger-bare", "naive", payload)
            checks.append(_at_least(f"bare req/s >= 2x naive ({payload})", ratio, 2.0))
        before = (self.baseline or {}).get("cpu_us_per_request", {})
        for payload in self.payloads:
            goal = f"full CPU/request <= 1/3 of the baseline ({payload})"
            cell = self.cell("throughput", "outrigger-full", payload)
            if payload not in before or cell is None:
                checks.append(Check(goal, "-", None, "no baseline (bench/baseline.json)"))
                continue
            check = _at_most(goal, cell.cpu_us_per_request, before[payload] / 3, "us")
            measured = f"{check.measured} (baseline {before[payload]:,.0f} us)"
            checks.append(Check(goal, measured, check.passed, check.margin))
        nginx, full = self.cell("paced", "nginx"), self.cell("paced", "outrigger-full")
        if nginx and full:
            rate = self.meta["paced_rate"]
            gap = full.p99 - nginx.p99
            checks.append(_at_most(f"full p99 at {rate} req/s within 1 ms of nginx", gap, 1.0, "ms"))
        targets = {t.name: t for t in self.targets}
        if "outrigger-full" in targets:
            rss = targets["outrigger-full"].idle_rss_mib
            checks.append(_at_most("full idle RSS <= 60 MiB", rss, 60.0, "MiB"))
        most = max(c.policies for c in self.policy_cells())
        for cell in self.policy_cells():
            if cell.policies == most > 1:
                kind = "wildcard" if cell.wildcard else "exact"
                goal = f"{cell.policies:,} policies req/s within 5% of 1 policy ({kind} host)"
                checks.append(_at_least(goal, self._policy_ratio(cell), 0.95))
        return checks

    # ----------------------------------------------------------------------- markdown

    def markdown(self) -> str:
        m = self.meta
        title = f"Run {m['date']}" + (f" — {m['label']}" if m.get("label") else "")
        sink = m.get("otlp_sink", {})
        traced = sum(s.requests for c in self.cells if c.target == "outrigger-traced" for s in c.samples)
        lines = [
            f"**{title}** · `{m['command']}` · {m['elapsed_s'] / 60:.1f} min wall clock",
            "",
            f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['kernel']}",
            f"- Python {m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, {m['nginx']}, "
            f"{m['wrk']}, Outrigger at commit {m['outrigger_commit']}",
            f"- throughput: `wrk -t{m['threads']} -c{m['connections']} -d{m['duration_s']:g}s`, "
            f"{m['runs']} runs per cell (interleaved), {m['warmup_s']:g} s warm-up per cell; medians",
            f"- paced: `hey -c {m['paced_workers']} -q {m['paced_rate'] / m['paced_workers']:g} "
            f"-z {m['paced_duration_s']:g}s` ({m['paced_rate']} req/s in total), small payload",
            f"- pinning: {m['pinning']}",
            f"- other load: CPUs {m['cpu_busy_before']:.0%} busy in the second before the start; "
            f"load average (1 min) before / after: {m['loadavg_before']} / {m['loadavg_after']}",
            f"- OTLP sink: {sink.get('spans', '?'):,} spans in {sink.get('requests', '?'):,} exports "
            f"for {traced:,} measured traced requests (warm-ups and readiness probes not counted)"
            if sink
            else "- OTLP sink: no stats",
        ]
        noisy = [c for c in self.cells if c.other_cores > FOREIGN_LOAD_WARN]
        if noisy:
            lines.append(
                f"- **WARNING: {len(noisy)} of {len(self.cells)} cells ran with more than "
                f"{FOREIGN_LOAD_WARN} core of foreign load** (column `others`): their req/s are "
                "depressed and noisy; CPU us/req and the ratios within a run are the sturdier numbers"
            )
        lines += [
            "",
            "### Targets (issue 9)",
            "",
            "| target | measured | result | margin |",
            "| --- | ---: | --- | --- |",
        ]
        for check in self.checks():
            result = {True: "PASS", False: "**MISS**", None: "n/a"}[check.passed]
            lines.append(f"| {check.goal} | {check.measured} | {result} | {check.margin} |")
        lines += self._throughput_table() + self._paced_table() + self._policies_table()
        lines += self._memory_table() + self._counters_table()
        lines += [
            "",
            "Columns: req/s, p50, p99 = medians of the runs; vs naive / vs nginx = median req/s over "
            "theirs for the same payload in this run; CPU us/req = user + system CPU of the server "
            "under test (its whole process group; for direct the origin nginx) per request; RSS = "
            "of the server under test after the cell's last run; servers busy = CPU of that server "
            "plus the origin, in cores (~1.0: the pinned core was saturated); others = CPU of "
            "processes outside the benchmark during the runs, in cores (0 = quiet machine).",
        ]
        return "\n".join(lines) + "\n"

    def _throughput_table(self) -> list[str]:
        lines = [
            "",
            "### Throughput",
            "",
            "| payload | target | req/s | p50 ms | p99 ms | vs naive | vs nginx | CPU us/req | RSS MiB "
            "| servers busy | others | req/s per run | errors |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        for payload in self.payloads:
            for cell in self.cells:
                if cell.phase != "throughput" or cell.payload != payload:
                    continue
                runs = ", ".join(_fmt(s.rps) for s in cell.samples)
                lines.append(
                    f"| {payload} | {cell.target} | {_fmt(cell.rps)} | {cell.p50:.2f} | {cell.p99:.2f} "
                    f"| {self._ratio(cell.target, 'naive', payload):.2f}x "
                    f"| {self._ratio(cell.target, 'nginx', payload):.2f}x "
                    f"| {_fmt(cell.cpu_us_per_request)} | {cell.rss_mib:.1f} | {cell.servers_busy:.2f} "
                    f"| {cell.other_cores:.2f} | {runs} | {cell.errors} |"
                )
        return lines

    def _paced_table(self) -> list[str]:
        paced = [c for c in self.cells if c.phase == "paced"]
        nginx = self.cell("paced", "nginx")
        lines = [
            "",
            f"### Latency at a paced {self.meta['paced_rate']} req/s (small payload)",
            "",
            "| target | p50 ms | p99 ms | p99 - nginx's | achieved req/s | CPU us/req | others | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for cell in paced:
            gap = f"{cell.p99 - nginx.p99:+.2f} ms" if nginx else "-"
            lines.append(
                f"| {cell.target} | {cell.p50:.2f} | {cell.p99:.2f} | {gap} | {_fmt(cell.rps)} "
                f"| {_fmt(cell.cpu_us_per_request)} | {cell.other_cores:.2f} | {cell.errors} |"
            )
        return lines

    def _policies_table(self) -> list[str]:
        lines = [
            "",
            "### Policies (outrigger-full's config plus other hosts' policies, small payload)",
            "",
            "| policies | benchmarked host matched by | req/s | vs 1 policy | p99 ms | CPU us/req "
            "| idle RSS MiB | others |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        idle = {t.name: t.idle_rss_mib for t in self.targets}
        for cell in sorted(self.policy_cells(), key=lambda c: (c.wildcard, c.policies)):
            match = "wildcard `*.bench.local`" if cell.wildcard else "exact `bench.local`"
            lines.append(
                f"| {cell.policies:,} | {match} | {_fmt(cell.rps)} | {self._policy_ratio(cell):.2f}x "
                f"| {cell.p99:.2f} | {_fmt(cell.cpu_us_per_request)} | {idle.get(cell.target, 0):.1f} "
                f"| {cell.other_cores:.2f} |"
            )
        return lines

    def _memory_table(self) -> list[str]:
        lines = [
            "",
            "### Memory (RSS of the server's process group)",
            "",
            "| target | what | idle MiB | after the run MiB | peak MiB |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for t in self.targets:
            memory = f"{t.idle_rss_mib:.1f} | {t.final_rss_mib:.1f} | {t.peak_rss_mib:.1f}"
            lines.append(f"| {t.name} | {t.description} | {memory} |")
        return lines

    def _counters_table(self) -> list[str]:
        lines = [
            "",
            "### Outrigger's own counters (from /metrics after the run; what was not a 200)",
            "",
            "499 = the client hung up: wrk closes its connections at the end of every run.",
            "",
            "| target | counters |",
            "| --- | --- |",
        ]
        for t in self.targets:
            if t.admin_port is not None:
                counters = ", ".join(f"{key}: {n:,}" for key, n in sorted(t.outrigger_counters.items()))
                lines.append(f"| {t.name} | {counters or 'none'} |")
        return lines

    # ----------------------------------------------------------------------- json, plot

    def json(self) -> str:
        cells = []
        for cell in self.cells:
            cells.append(
                {
                    "phase": cell.phase,
                    "target": cell.target,
                    "payload": cell.payload,
                    "host": cell.host,
                    "tool": cell.tool,
                    "policies": cell.policies,
                    "median_rps": cell.rps,
                    "median_p50_ms": cell.p50,
                    "median_p99_ms": cell.p99,
                    "median_cpu_us_per_request": cell.cpu_us_per_request,
                    "median_servers_busy_cores": cell.servers_busy,
                    "median_other_load_cores": cell.other_cores,
                    "rss_mib": cell.rss_mib,
                    "errors": cell.errors,
                    "runs": [{**asdict(s), "other_cores": s.other_cores} for s in cell.samples],
                }
            )
        document = {
            "meta": self.meta,
            "targets": [asdict(t) for t in self.targets],
            "checks": [asdict(c) for c in self.checks()],
            "cells": cells,
        }
        return json.dumps(document, indent=2) + "\n"

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [c.target for c in self.cells if c.phase == "throughput" and c.payload == self.payloads[0]]
        cmap = plt.get_cmap("tab10")
        colours = [cmap(index) for index in range(len(names))]
        fig, axes = plt.subplots(
            2, len(self.payloads), figsize=(4.6 * len(self.payloads), 7.5), squeeze=False
        )
        for column, payload in enumerate(self.payloads):
            cells = [self.cell("throughput", name, payload) for name in names]
            for row, (metric, unit) in enumerate(
                [("rps", "req/s"), ("cpu_us_per_request", "CPU us / request")]
            ):
                ax = axes[row][column]
                values = [getattr(c, metric) if c else 0.0 for c in cells]
                bars = ax.bar(range(len(names)), values, color=colours)
                ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=7)
                ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
                ax.set_title(f"{payload}: {unit}", fontsize=10)
                ax.set_yscale("log")
                ax.tick_params(axis="y", labelsize=8)
        label = f" — {self.meta['label']}" if self.meta.get("label") else ""
        fig.suptitle(
            f"Outrigger benchmark {self.meta['date']}{label} (Outrigger {self.meta['outrigger_commit']}; "
            f"wrk -c{self.meta['connections']}, one pinned core; log scale)",
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def baseline_json(cells: list[Cell], meta: dict[str, Any]) -> str:
    """The CPU/request of outrigger-full per payload, for the 'a third of today's' target."""
    full = [c for c in cells if c.phase == "throughput" and c.target == "outrigger-full"]
    document = {
        "date": meta["date"],
        "outrigger_commit": meta["outrigger_commit"],
        "command": meta["command"],
        "cpu_us_per_request": {c.payload: round(c.cpu_us_per_request, 1) for c in full},
        "rps": {c.payload: round(c.rps) for c in full},
    }
    return json.dumps(document, indent=2) + "\n"


def write_docs(result: Report, page: Path, plot: Path) -> None:
    """Replaces the results section of `page` (between the markers) and writes `plot`."""
    text = page.read_text()
    pattern = re.compile(re.escape(DOCS_START) + ".*?" + re.escape(DOCS_END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{page}: markers {DOCS_START} / {DOCS_END} not found")
    result.plot(plot)
    section = f"{DOCS_START}\n\n{result.markdown()}\n![req/s and CPU per request]({plot.name})\n\n{DOCS_END}"
    page.write_text(pattern.sub(lambda _match: section, text))
