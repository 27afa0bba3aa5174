"""`outrigger run --loop`: uvloop by default where installed, asyncio on request."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import event_loop
from tests.conftest import Launch, loopback_policy, write_config
from tests.e2e.procs import wait_until


def test_auto_prefers_uvloop_when_installed() -> None:
    pytest.importorskip("uvloop")
    assert event_loop.resolve("auto") == "uvloop"
    assert event_loop.resolve("asyncio") == "asyncio"


def test_the_chosen_loop_runs_the_coroutine() -> None:
    seen: list[str] = []

    async def main() -> None:
        seen.append(event_loop.current())

    event_loop.run(main(), "asyncio")
    event_loop.run(main(), "auto")
    assert seen == ["asyncio", event_loop.resolve("auto")]


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
async def test_run_reports_the_loop_it_uses(launch: Launch, tmp_path: Path, choice: str) -> None:
    config = write_config(tmp_path, [loopback_policy("http://127.0.0.1:9")])
    process = launch(config, "--loop", choice)
    await process.wait_ready()

    async def reported() -> bool:
        return f"{choice} loop)" in process.output

    assert await wait_until(reported, within=5), process.output


async def test_the_tests_run_on_the_default_loop() -> None:
    assert event_loop.current() == event_loop.resolve("auto")
