"""DNS resolution with the SSRF verdict cached beside the answer.

Each answer is checked once (`addresses.refusal_reason`) when it is
resolved, and the connection is made to a checked address, so DNS cannot
change between the check and the connect (SPEC 7).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cachetools import TTLCache

from proxy import errors
from proxy.addresses import refusal_reason
from proxy.config import defaults
from proxy.transport import failures

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
        self._answers: TTLCache[tuple[str, int], Answer] = TTLCache(maxsize=4096, ttl=ttl)

    def cached(self, host: str, port: int, allow_private: bool) -> tuple[str, ...] | None:
        """The checked addresses when the answer is cached (no await on the hot path)."""
        answer = self._answers.get((host, port))
        return None if answer is None else _usable(answer, host, allow_private)

    async def resolve(self, host: str, port: int, allow_private: bool) -> tuple[str, ...]:
        """Addresses the connection may use, best first; raises AddressNotAllowed or ConnectFailure."""
        answer = self._answers.get((host, port))
        if answer is None:
            try:
                found = await self.lookup(host, port)
            except OSError as exc:
                raise failures.cannot_resolve(host, exc) from exc
            if not found:
                raise failures.cannot_resolve(host, None)
            allowed = tuple(a for a in found if refusal_reason(a) is None)
            answer = Answer(found, allowed, refusal_reason(found[0]) or "")
            self._answers[(host, port)] = answer
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
