"""Which event loop `outrigger run` uses: uvloop where it is installed (Linux), else asyncio's.

uvloop is kept because it measurably lowers CPU per request on our path
(docs/performance.md has the figures); `--loop asyncio` is the escape hatch.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, Literal

LoopChoice = Literal["auto", "asyncio", "uvloop"]
CHOICES: tuple[LoopChoice, ...] = ("auto", "asyncio", "uvloop")


def resolve(choice: LoopChoice) -> Literal["asyncio", "uvloop"]:
    """`auto` means uvloop when it can be imported; asking for uvloop without it is an error."""
    available = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not available:
        raise RuntimeError("--loop uvloop: uvloop is not installed (pip install uvloop)")
    if choice == "asyncio" or not available:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, None], choice: LoopChoice) -> None:
    if resolve(choice) == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def current() -> str:
    """The running loop's implementation, for the startup log line."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
