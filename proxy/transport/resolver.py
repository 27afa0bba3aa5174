"""DNS resolution with the SSRF verdict cached beside the answer.

Each answer is checked once (`addresses.refusal_reason`) when it is
resolved, and the connection is made to a checked address, so DNS cannot
change between the check and the connect (SPEC 7).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy import errors
from proxy.addresses import refusal_reason
from proxy.config import defaults
from proxy.transport import failures

_MAX_ANSWERS = 4096

Lookup = Callable[[str, int], Awaitable[tuple[str, ...]]]
"""host, port -> the addresses DNS gives, in its order (raises OSError)."""


async def system_lookup(host: str, port: int) -> tuple[str, ...]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return tuple(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True, slots=True)
class Answer:
    addresses: tuple[str, ...]
    """Every address, for policies that allow private ones."""
    allowed: tuple[str, ...]
    """The public unicast ones, in DNS order."""
    refusal: str
    """Why the first address is refused (for the error when none is allowed)."""


class CheckedResolver:
    def __init__(self, lookup: Lookup | None = None, ttl: float = defaults.DNS_CACHE_TTL_S) -> None:
        self.lookup = lookup or system_lookup
        self._ttl = ttl
        self._answers: dict[tuple[str, int], tuple[float, Answer]] = {}
        """(host, port) -> (expiry, answer); a plain dict: this lookup runs on every attempt."""

    def cached(self, host: str, port: int, allow_private: bool) -> tuple[str, ...] | None:
        """The checked addresses when the answer is cached (no await on the hot path)."""
        answer = self._fresh((host, port))
        return None if answer is None else _usable(answer, host, allow_private)

    def _fresh(self, key: tuple[str, int]) -> Answer | None:
        entry = self._answers.get(key)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    async def resolve(self, host: str, port: int, allow_private: bool) -> tuple[str, ...]:
        """Addresses the connection may use, best first; raises AddressNotAllowed or ConnectFailure."""
        answer = self._fresh((host, port))
        if answer is None:
            try:
                found = await self.lookup(host, port)
            except OSError as exc:
                raise failures.cannot_resolve(host, exc) from exc
            if not found:
                raise failures.cannot_resolve(host, None)
            allowed = tuple(a for a in found if refusal_reason(a) is None)
            answer = Answer(found, allowed, refusal_reason(found[0]) or "")
            if len(self._answers) >= _MAX_ANSWERS:
                del self._answers[next(iter(self._answers))]  # the oldest
            self._answers[(host, port)] = (time.monotonic() + self._ttl, answer)
        return _usable(answer, host, allow_private)


def _usable(answer: Answer, host: str, allow_private: bool) -> tuple[str, ...]:
    if allow_private:
        return answer.addresses
    if not answer.allowed:
        raise errors.AddressNotAllowed(
            f"{host} resolves to {answer.addresses[0]} ({answer.refusal}); set allow_private_addresses: true"
            " in its policy to permit it"
        )
    return answer.allowed
