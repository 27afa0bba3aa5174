"""``${env:NAME}`` and ``${file:PATH}`` references in header values.

Config models keep the template text, never the secret, so printing a model
(explain, /config, logs) cannot leak a credential. Values are rendered when a
config's pipelines are built; secret files are watched, so a rotated file
triggers a reload that renders the new value.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_REFERENCE = re.compile(r"\$\{(env|file):([^}]+)\}")


class SecretError(ValueError):
    """A reference that cannot be resolved (unset variable, unreadable file)."""


def has_reference(template: str) -> bool:
    return _REFERENCE.search(template) is not None


def masked_references(template: str) -> tuple[str, dict[str, str]]:
    """`template` with each reference replaced by a distinct plain word, and the references by
    word: what is around them can be parsed (a URL), then the words put back."""
    found: dict[str, str] = {}

    def word(match: re.Match[str]) -> str:
        key = f"secretref{len(found)}"
        found[key] = match.group(0)
        return key

    return _REFERENCE.sub(word, template), found


def referenced_files(template: str, base_dir: Path) -> list[Path]:
    return [_file_path(ref, base_dir) for kind, ref in _REFERENCE.findall(template) if kind == "file"]


def _file_path(reference: str, base_dir: Path) -> Path:
    path = Path(reference)
    return path if path.is_absolute() else base_dir / path


def render(template: str, base_dir: Path) -> str:
    """Substitute every reference; file contents lose one trailing newline, as kubectl writes them."""

    def substitute(match: re.Match[str]) -> str:
        kind, reference = match.group(1), match.group(2)
        if kind == "env":
            value = os.environ.get(reference)
            if value is None:
                raise SecretError(f"environment variable {reference} is not set")
            return value
        path = _file_path(reference, base_dir)
        try:
            return path.read_text(encoding="utf-8").removesuffix("\n")
        except OSError as exc:
            raise SecretError(f"cannot read secret file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:  # a binary file: callers handle SecretError, not this
            raise SecretError(f"cannot read secret file {path}: not UTF-8 text") from exc

    rendered = _REFERENCE.sub(substitute, template)
    if any(ch in rendered for ch in "\r\n\0"):
        raise SecretError("a header value may not contain CR, LF or NUL")
    return rendered


REDACTED = "<redacted>"
_SENSITIVE_NAME = re.compile(r"authorization|cookie|token|secret|key|password|signature", re.IGNORECASE)


_AUTH_SCHEME = re.compile(r"[A-Za-z-]+\s+")
"""A leading ``Bearer `` / ``Basic ``: shown, as it names the kind of credential, not the credential."""


def looks_sensitive(name: str) -> bool:
    """Whether a header name looks like it carries a credential (Authorization, X-Api-Key, ...)."""
    return _SENSITIVE_NAME.search(name) is not None


def redact(name: str, template: str) -> str:
    """What may be shown of a header value: references stay (they hold no secret); in
    credential-looking headers, literal text other than an auth scheme ("Bearer ") does not."""
    if not looks_sensitive(name):
        return template
    shown = []
    for index, part in enumerate(_REFERENCE.split(template)):
        position = index % 3
        if position == 1:
            shown.append(f"${{{part}:")
        elif position == 2:
            shown.append(f"{part}}}")
        else:
            scheme = _AUTH_SCHEME.match(part) if index == 0 else None
            kept = scheme.group() if scheme else ""
            shown.append(kept + (REDACTED if part[len(kept) :] else ""))
    return "".join(shown)
