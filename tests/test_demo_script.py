"""scripts/demo.sh, the README's first command: with DEMO_EXIT=1 it runs every step against
config.example.yaml and demo/upstream.py on loopback, prints each step's trace, and exits 0.

It needs ports 8080, 8081, 9001, 4318, 15000 and 15001 free on 127.0.0.1 (the demo says which
one is not) and installs the repository into .venv with pip, as a newcomer's run does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_every_step_and_shows_the_traces() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")],
        env={**env, "DEMO_EXIT": "1"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "10/10  Egress allowlist" in out
    assert out.count("status 200, x-outrigger-attempts: 3") == 3  # retries
    assert "x-outrigger-error: circuit_open" in out  # the breaker
    assert "refused at once: the circuit breaker is open" in out
    assert "x-outrigger-error: rate_limited, retry-after: 1" in out  # the rate limiter
    assert "rate limiter: waited" in out
    assert "x-outrigger-cache: stale, x-outrigger-stale: true" in out  # the stale cache answer
    assert "cache: stale (a stored copy stood in for: 503)" in out
    assert "x-outrigger-attempts: 1, x-outrigger-upstream: http://127.0.0.1:8081" in out  # failover
    assert "answered by upstream http://127.0.0.1:8081" in out
    assert "status 202, x-outrigger-delivery-id: " in out  # fire-and-forget
    assert "state done after 3 attempts, last status 201" in out
    assert out.count(" attempt 1, for the request of trace ") == 1  # a delivery's own traces
    assert '"type": "host_not_allowed"' in out
    assert "expected" not in out  # every step's traces arrived
    assert out.count("\n      trace ") >= 17
