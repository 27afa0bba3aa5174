"""Durations and sizes: the only place unit strings are parsed.

Config values like ``250ms`` and ``1MiB`` go through here so every layer
receives plain seconds (float) and bytes (int).
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)\s*$")


def parse_duration(value: object) -> float:
    """Seconds from ``"250ms"``, ``"2s"``, ``"1m"``, ``"1h"`` (a bare number means seconds)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 2s, 1m or 1h")
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str) and (match := _DURATION_RE.match(value)):
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        else:
            raise ValueError(f"invalid duration {value!r}: use a number with ms, s, m or h (e.g. 250ms)")
    except OverflowError:
        # an integer too large for a float; the value itself is not echoed (it may be thousands of digits)
        raise ValueError("a duration this large cannot be represented") from None
    # YAML's .nan and .inf are floats; a too-long digit string overflows to inf
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}: it must be a finite number")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``"512KiB"``, ``"1MiB"``, ``"1GiB"`` (a bare integer means bytes)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512KiB or 1MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise ValueError(f"invalid size {value!r}: use an integer with B, KiB, MiB or GiB (e.g. 1MiB)")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def format_duration(seconds: float) -> str:
    """The shortest exact unit form, so `explain` prints what a person would write."""
    millis = round(seconds * 1000)
    for unit, factor in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if millis and millis % factor == 0:
            return f"{millis // factor}{unit}"
    return f"{millis}ms"


def format_size(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        factor = _SIZE_UNITS[unit]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _DURATION_RE.pattern},
                {"type": "number", "minimum": 0},
            ]
        }
    ),
]
"""A duration in seconds, written in config as ``250ms``/``2s``/``1m``/``1h``."""

ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _SIZE_RE.pattern},
                {"type": "integer", "minimum": 0},
            ]
        }
    ),
]
"""A size in bytes, written in config as ``512KiB``/``1MiB``."""
