"""The request target (RFC 9112 3.2), parsed once per request: the server routes on it and
telemetry reports it, so neither parses the request line again."""

from __future__ import annotations

from dataclasses import dataclass

from yarl import URL

from proxy.config.model import is_valid_host


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
    """Raw (still percent-encoded) path and query."""
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
    if raw_target[:8].lower().startswith(("http://", "https://")):
        try:
            url = URL(raw_target, encoded=True)
            scheme, authority, path_qs = url.scheme, url.raw_authority, url.raw_path_qs or "/"
        except ValueError:
            scheme, path_qs = "http", raw_target
        host, port, problem = _split_authority(authority)
        return RequestTarget(scheme, host, port, path_qs, True, problem)
    host, port, problem = _split_authority(authority) if authority else ("", None, None)
    if not raw_target.startswith("/"):
        problem = f"unsupported request target {raw_target[:100]!r}"
    return RequestTarget("http", host, port, raw_target, False, problem)


def _split_authority(authority: str) -> tuple[str, int | None, str | None]:
    """`host[:port]` (IPv6 in brackets) -> (host, port, problem); a malformed one still gives the
    parts that could be read, so logs and spans can name it."""
    problem = f"invalid host {authority!r}"
    try:
        url = URL(f"http://{authority}")
        host = (url.raw_host or "").lower().rstrip(".")
        port = url.explicit_port
    except ValueError:
        return authority.rpartition("@")[2], None, problem
    if not host or url.raw_path not in ("", "/") or url.user is not None or not is_valid_host(host):
        return host, port, problem
    return host, port, None
