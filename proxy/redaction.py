"""Secrets carried in URL paths, hidden wherever a path is written down.

Some APIs put the credential in the path itself: a Slack webhook is
``/services/T000/B000/<secret>``, a Telegram bot calls ``/bot<token>/sendMessage``.
A policy's ``redact_paths`` lists path globs; where one matches, the text each
``*`` matched is written as ``REDACTED`` (``/services/REDACTED/REDACTED/REDACTED``,
``/botREDACTED/sendMessage``). A ``*`` never crosses a ``/``; the whole path must
match. Globs are compiled once, when the config is loaded (`compile_globs`), so
the per-request cost is one regex match per glob and nothing is compiled then.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REDACTED = "REDACTED"


def check_glob(glob: str) -> str:
    """A path glob as ``redact_paths`` takes it; raises ValueError (reported at load) otherwise."""
    if not glob.startswith("/"):
        raise ValueError(f"path glob {glob!r} must start with '/'")
    if "**" in glob:
        raise ValueError(f"path glob {glob!r}: '**' is not supported; '*' matches within one segment")
    if "*" not in glob:
        raise ValueError(f"path glob {glob!r} has no '*': nothing in it would be redacted")
    if "?" in glob or "#" in glob:
        raise ValueError(f"path glob {glob!r} may not contain a query or fragment")
    return glob


def _pattern(glob: str) -> re.Pattern[str]:
    parts = re.split(r"(\*)", glob)
    return re.compile("".join("([^/]*)" if part == "*" else re.escape(part) for part in parts))


@dataclass(frozen=True)
class PathRedactor:
    """Compiled ``redact_paths``; equal when the globs are (policy state carries over on reload)."""

    globs: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]

    def redact(self, path_qs: str) -> str:
        """`path_qs` with what the first matching glob's ``*`` matched replaced; the query is kept
        as it is (query values are redacted separately)."""
        if not self.patterns:
            return path_qs
        path, sep, query = path_qs.partition("?")
        path = _normalised(path)
        for pattern in self.patterns:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            pieces, end = [], 0
            for group in range(1, (match.lastindex or 0) + 1):
                start, stop = match.span(group)
                pieces += [path[end:start], REDACTED]
                end = stop
            return "".join([*pieces, path[end:], sep, query])
        return path_qs


_UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")
_SLASHES = re.compile(r"//+")


def _normalised(path: str) -> str:
    """The path as the upstream will most likely read it, so `//services/...`, a trailing ``/`` or
    ``%73ervices`` cannot slip a secret past a glob: escaped unreserved characters decoded
    (RFC 3986 6.2.2.2), repeated slashes collapsed, a trailing slash dropped."""
    path = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path)
    path = _SLASHES.sub("/", path)
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


def compile_globs(globs: tuple[str, ...]) -> PathRedactor:
    return PathRedactor(globs, tuple(_pattern(check_glob(glob)) for glob in globs))


NO_REDACTION = compile_globs(())
