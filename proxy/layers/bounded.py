"""Bounds shared by the in-memory response stores (replay cache, response cache).

cachetools bounds a cache by the total "size" of its values. Weighing every
entry at least ``max_bytes / max_entries`` makes that one bound serve two:
there are never more than ``max_entries`` entries, and their bytes never add
up past ``max_bytes``.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import TypeVar

V = TypeVar("V")


def weigher(max_bytes: int, max_entries: int, size: Callable[[V], int]) -> Callable[[V], float]:
    """A cachetools `getsizeof` (use with ``maxsize=max_bytes``) that enforces both bounds."""
    unit = max_bytes / max_entries

    def weight(value: V) -> float:
        return max(unit, size(value))

    return weight


def headers_size(headers: tuple[tuple[str, str], ...]) -> int:
    return sum(len(name) + len(value) for name, value in headers)


def put(store: MutableMapping[str, V], key: str, value: V) -> bool:
    """Store `value`; False when it alone outweighs the whole store (cachetools raises ValueError)."""
    try:
        store[key] = value
    except ValueError:
        return False
    return True
