"""The request target (RFC 9112 3.2), parsed once per request: the server routes on it and
telemetry reports it, so neither parses the request line again."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from proxy.config.model import is_valid_host

_AUTHORITY_RE = re.compile(
    r"^(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>[^\[\]:/?#@\s]+))(?::(?P<port>\d{0,5}))?$"
)
"""RFC 3986 ``host [":" port]`` with nothing else: no user-info, path, query, fragment or sign."""


_ABSOLUTE_SCHEMES = ("http://", "https://", "ws://", "wss://")
_WEBSOCKET_SCHEMES = {"ws": "http", "wss": "https"}
"""WebSocket clients behind HTTP_PROXY (aiohttp's among them) may send ``GET ws://host/path``."""


@dataclass(frozen=True, slots=True)
class RequestTarget:
    """What the app asked for, from the request line and its Host (or the local address)."""

    scheme: str
    """``http``, or ``https`` when an absolute-form target says so."""
    host: str
    """Lowercase host without port, as routed; when malformed, what was sent (minus any user-info)."""
    port: int | None
    """The explicit port, if any."""
    path_qs: str
    """Raw (still percent-encoded) path and query, exactly as sent (an empty query's ``?`` too)."""
    absolute: bool
    """Absolute-form (``GET http://host/path``, i.e. HTTP_PROXY)."""
    problem: str | None = None
    """Why this target cannot be served (answered 400); None when well-formed."""

    @property
    def authority(self) -> str:
        """``host[:port]``, an IPv6 literal in brackets, never user-info."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def parse_target(raw_target: str, authority: str) -> RequestTarget:
    """Split `raw_target` (origin- or absolute-form) and `authority` (the Host header, else the
    local address). Never raises: a malformed target comes back with its `problem` set."""
    lowered = raw_target[:8].lower()
    if lowered.startswith(_ABSOLUTE_SCHEMES):
        scheme, _, rest = raw_target.partition("://")
        scheme = _WEBSOCKET_SCHEMES.get(scheme.lower(), scheme)
        end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
        path_qs = rest[end:].partition("#")[0]
        if not path_qs.startswith("/"):
            path_qs = "/" + path_qs
        host, port, problem = split_authority(rest[:end])
        return RequestTarget(scheme.lower(), host, port, path_qs, True, problem)
    host, port, problem = split_authority(authority) if authority else ("", None, None)
    if not raw_target.startswith("/"):
        problem = f"unsupported request target {raw_target[:100]!r}"
    return RequestTarget("http", host, port, raw_target, False, problem)


@functools.lru_cache(maxsize=1024)  # Host values repeat: parse each once
def split_authority(authority: str) -> tuple[str, int | None, str | None]:
    """`host[:port]` (IPv6 in brackets) -> (host, port, problem).

    Strict on purpose: a lenient URL parser reads ``h?x`` as host ``h`` and accepts port 0, which
    would then fail deep in the upstream call as a 500 instead of the app's 400. A malformed
    authority still gives what could be read (never user-info), so logs and spans can name it."""
    match = _AUTHORITY_RE.match(authority)
    if match is None:
        return authority.rpartition("@")[2].lower(), None, f"invalid host {authority!r}"
    host = (match.group("ip6") or match.group("name") or "").lower().rstrip(".")
    port = int(match.group("port")) if match.group("port") else None
    ip6_ok = not match.group("ip6") or ":" in host
    if not host or not ip6_ok or not is_valid_host(host) or (port is not None and not 1 <= port <= 65535):
        return host, None, f"invalid host {authority!r}"
    return host, port, None
