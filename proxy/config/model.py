"""Typed, frozen config models. Validated once at load; layers never re-check.

`PolicySettings` is the mergeable body (built-in < ``defaults`` < preset <
host policy < route). A section that later issues add (retries, breaker, ...) goes here as
one optional field; a missing section means its layer is not in the pipeline.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from yarl import URL

from proxy.config import defaults as builtin
from proxy.config.units import ByteSize, Duration, format_duration, parse_duration
from proxy.redaction import NO_REDACTION, PathRedactor, check_glob, compile_globs
from proxy.secrets import masked_references


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Port = Annotated[int, Field(ge=1, le=65535)]

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOSTNAME_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_METHOD_RE = re.compile(r"^[A-Z]+$")


def is_valid_host(name: str) -> bool:
    """A DNS name (lowercase) or an IP literal: what a Host header or URL may name."""
    return bool(_HOSTNAME_RE.match(name)) or _is_ip_literal(name)


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


DEFAULT_PORTS = frozenset({None, 80, 443})
"""Ports a host pattern without ``:port`` claims (SPEC 2): none written, http's, https's."""


def split_host_pattern(pattern: str) -> tuple[str, int | None]:
    """``api.x`` -> (``api.x``, None); ``api.x:8443`` / ``[::1]:8443`` -> (name, 8443)."""
    if pattern.startswith("["):
        name, _, rest = pattern[1:].partition("]")
        return name, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    name, sep, port = pattern.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name, int(port)
    return pattern, None


def _check_host_pattern(pattern: object) -> str:
    if not isinstance(pattern, str):
        raise ValueError("a host must be a string")
    written = pattern.strip().lower()
    name, port = split_host_pattern(written)
    name = name.rstrip(".")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"bad port in {pattern!r}: use 1-65535")
    suffix = "" if port is None else f":{port}"
    if name.startswith("*."):
        if not _HOSTNAME_RE.match(name[2:]) or "." not in name[2:]:
            raise ValueError(
                f"bad wildcard {pattern!r}: use '*.' followed by a domain with at least two labels,"
                " e.g. '*.example.com'"
            )
        return name + suffix
    if "*" in name:
        raise ValueError(
            f"bad wildcard {pattern!r}: '*' is only allowed as the whole first label ('*.example.com')"
        )
    if not (_HOSTNAME_RE.match(name) or _is_ip_literal(name)):
        raise ValueError(f"invalid host name {pattern!r}")
    return (f"[{name}]" if ":" in name and suffix else name) + suffix


HostPattern = Annotated[str, BeforeValidator(_check_host_pattern)]


def _check_header_name(name: str) -> str:
    if not _HEADER_NAME_RE.match(name):
        raise ValueError(f"invalid header name {name!r}")
    return name


HeaderName = Annotated[str, AfterValidator(_check_header_name)]


def _normalise_method(method: object) -> str:
    if not isinstance(method, str) or not _METHOD_RE.match(method.upper()):
        raise ValueError(f"invalid HTTP method {method!r}")
    return method.upper()


Method = Annotated[str, BeforeValidator(_normalise_method)]


def _one_or_many(value: object) -> object:
    """``method: POST`` is shorthand for ``method: [POST]``."""
    return [value] if isinstance(value, str) else value


Methods = Annotated[
    tuple[Method, ...],
    BeforeValidator(_one_or_many),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
]
"""One method or a list of them, as a route's ``match.method`` is written."""


class UpstreamTarget(Frozen):
    """Where a policy sends requests: scheme, host and port only."""

    scheme: Literal["http", "https"]
    host: str
    port: Port

    @property
    def default_port(self) -> bool:
        return self.port == (443 if self.scheme == "https" else 80)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.default_port else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}"

    @classmethod
    def of_url(cls, url: URL) -> UpstreamTarget:
        """Scheme, host and port of an absolute http(s) URL already checked at load (a webhook
        route's ``forward``) or made from an UpstreamTarget (a stored delivery's ``target``)."""
        assert url.host is not None, url
        assert url.port is not None, url
        return cls(scheme=url.scheme, host=url.host, port=url.port)


def _parse_upstream(value: object) -> object:
    if not isinstance(value, str):
        return value
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"upstream {value!r} must look like https://host[:port]")
    if url.path not in ("", "/") or url.query_string or url.fragment or url.user:
        raise ValueError(f"upstream {value!r} may not carry a path, query, fragment or credentials")
    if url.port is None:
        raise ValueError(f"upstream {value!r} has no usable port")
    return {"scheme": url.scheme, "host": url.host.lower(), "port": url.port}


Upstream = Annotated[
    UpstreamTarget,
    BeforeValidator(_parse_upstream),
    PlainSerializer(str, return_type=str, when_used="json"),
    # the schema describes the written form, a URL, not the parsed {scheme, host, port}
    WithJsonSchema({"type": "string", "pattern": r"^https?://[^/?#@\s]+/?$"}),
]


class ListenAddress(Frozen):
    host: str
    port: Port

    @field_validator("host")
    @classmethod
    def _ip_only(cls, host: str) -> str:
        if host != "localhost" and not _is_ip_literal(host):
            raise ValueError("listen host must be an IP address (e.g. 127.0.0.1) or localhost")
        return host


class TlsSettings(Frozen):
    verify: bool = builtin.TLS_VERIFY
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    sni: str | None = None

    @field_validator("ca_file", "client_cert", "client_key")
    @classmethod
    def _readable(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is None:
            return None
        resolved = path if path.is_absolute() else _base_dir(info) / path
        if not resolved.is_file():
            raise ValueError(f"file not found: {resolved}")
        return resolved

    @field_validator("sni")
    @classmethod
    def _sni_hostname(cls, sni: str | None) -> str | None:
        if sni is not None and not _HOSTNAME_RE.match(sni.lower()):
            raise ValueError(f"invalid SNI host name {sni!r}")
        return sni

    @model_validator(mode="after")
    def _key_has_its_certificate(self) -> TlsSettings:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key is set but client_cert is not")
        return self


class Timeouts(Frozen):
    connect: Duration = Field(default=builtin.CONNECT_TIMEOUT_S, gt=0)
    per_try: Duration = Field(default=builtin.PER_TRY_TIMEOUT_S, gt=0)
    total: Duration = Field(default=builtin.TOTAL_TIMEOUT_S, gt=0)
    idle: Duration = Field(default=builtin.IDLE_TIMEOUT_S, gt=0)
    stream: Duration | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _default_connect_within_per_try(cls, data: object) -> object:
        """An unwritten `connect` never exceeds a short `per_try` (per_try: 300ms must just work)."""
        if isinstance(data, dict) and "connect" not in data and "per_try" in data:
            try:
                per_try = parse_duration(data["per_try"])
            except ValueError:
                return data  # reported by the field itself
            if 0 < per_try < builtin.CONNECT_TIMEOUT_S:
                return {**data, "connect": per_try}
        return data

    @model_validator(mode="after")
    def _ordered(self) -> Timeouts:
        if self.per_try > self.total:
            raise ValueError(
                f"per_try ({format_duration(self.per_try)}) is longer than total"
                f" ({format_duration(self.total)})"
            )
        if self.connect > self.per_try:
            raise ValueError(
                f"connect ({format_duration(self.connect)}) is longer than per_try"
                f" ({format_duration(self.per_try)})"
            )
        return self


HeaderValue = str
"""A header value template: literal text with ``${env:NAME}``/``${file:PATH}`` references (read
and checked by the loader, not here: config stays data)."""


_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "host"})


def _not_framing(name: str) -> str:
    """Outrigger writes the message framing and Host itself: a rule touching them could desync the
    upstream connection (a body read as a second request)."""
    if name.lower() in _FRAMING_HEADERS:
        raise ValueError(
            f"{name} is written by Outrigger from the request itself; it cannot be set or removed"
        )
    return name


RuleHeaderName = Annotated[HeaderName, AfterValidator(_not_framing)]


class HeaderRules(Frozen):
    """Headers set or removed on every upstream request; values may reference secrets."""

    set: dict[RuleHeaderName, HeaderValue] = Field(default_factory=dict)
    remove: tuple[RuleHeaderName, ...] = ()


ERROR_CONDITIONS = ("connect-failure", "reset", "timeout")
_STATUS_RANGE_RE = re.compile(r"^([1-5]\d\d)-([1-5]\d\d)$")
_STATUS_CLASS_RE = re.compile(r"^([1-5])xx$")


def _statuses_of(condition: str) -> range:
    """The status codes one condition names: ``503``, ``500-504`` or ``5xx``."""
    if condition.isdigit():
        return range(int(condition), int(condition) + 1)
    if match := _STATUS_RANGE_RE.match(condition):
        return range(int(match.group(1)), int(match.group(2)) + 1)
    if match := _STATUS_CLASS_RE.match(condition):
        return range(int(match.group(1)) * 100, int(match.group(1)) * 100 + 100)
    raise ValueError(
        f"unknown condition {condition!r}: use connect-failure, reset, timeout,"
        " a status (503), a range (500-504) or a class (5xx)"
    )


def _check_condition(value: object) -> str:
    condition = str(value).strip().lower() if isinstance(value, int | str) else None
    if condition is None or isinstance(value, bool):
        raise ValueError(f"invalid condition {value!r}")
    if condition in ERROR_CONDITIONS:
        return condition
    statuses = _statuses_of(condition)
    if not statuses or statuses.start < 100 or statuses.stop > 600:
        raise ValueError(f"invalid status range {value!r}")
    return condition


OutcomeCondition = Annotated[
    str,
    BeforeValidator(_check_condition),
    # YAML writes a bare status (502) as an integer
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 100, "maximum": 599}]}),
]
"""An attempt outcome: ``connect-failure``, ``reset``, ``timeout``, a status, a range or a class."""


def _check_status_condition(value: object) -> str:
    condition = _check_condition(value)
    if condition in ERROR_CONDITIONS:
        raise ValueError(
            f"{condition!r} is not a status: use a status (201), a range (200-204) or a class (2xx)"
        )
    return condition


StatusCondition = Annotated[
    str,
    BeforeValidator(_check_status_condition),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 100, "maximum": 599}]}),
]
"""A response status condition only: a status, a range or a class (no error kinds)."""


class OutcomeSet:
    """Conditions compiled for the hot path: a status set and the error kinds."""

    def __init__(self, conditions: tuple[str, ...]) -> None:
        self.errors = frozenset(c for c in conditions if c in ERROR_CONDITIONS)
        self.statuses = frozenset(
            code for c in conditions if c not in ERROR_CONDITIONS for code in _statuses_of(c)
        )


class Backoff(Frozen):
    base: Duration = Field(default=builtin.BACKOFF_BASE_S, gt=0)
    max: Duration = Field(default=builtin.BACKOFF_MAX_S, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Backoff:
        if self.base > self.max:
            raise ValueError(
                f"base ({format_duration(self.base)}) is larger than max ({format_duration(self.max)})"
            )
        return self


class RetryAfter(Frozen):
    honour: bool = builtin.RETRY_AFTER_HONOUR
    max: Duration = builtin.RETRY_AFTER_MAX_S


class RetryBudgetSettings(Frozen):
    ratio: float = Field(default=builtin.BUDGET_RATIO, ge=0, le=1000)
    min_per_second: float = Field(default=builtin.BUDGET_MIN_PER_SECOND, ge=0)
    window: Duration = Field(default=builtin.BUDGET_WINDOW_S, gt=0)


class Retries(Frozen):
    max_attempts: int = Field(default=builtin.RETRY_MAX_ATTEMPTS, ge=1, le=builtin.RETRY_MAX_ATTEMPTS_LIMIT)
    on: tuple[OutcomeCondition, ...] = builtin.RETRY_ON
    methods: tuple[Method, ...] = builtin.RETRY_METHODS
    backoff: Backoff = Backoff()
    retry_after: RetryAfter = RetryAfter()
    hint_header: HeaderName | None = None
    budget: RetryBudgetSettings | None = RetryBudgetSettings()
    """Per policy (routes cannot change it); ``null`` turns the budget off (lint warns)."""
    max_replay_bytes: ByteSize = builtin.MAX_REPLAY_BYTES


class Replay(Frozen):
    ttl: Duration = Field(default=builtin.REPLAY_TTL_S, gt=0)
    max_entries: int = Field(default=builtin.REPLAY_MAX_ENTRIES, ge=1)
    max_body_bytes: ByteSize = builtin.REPLAY_MAX_BODY_BYTES
    max_total_bytes: ByteSize = Field(default=builtin.REPLAY_MAX_TOTAL_BYTES, ge=1)
    """Memory bound of the whole cache (max_entries x max_body_bytes alone could reach 10 GiB)."""
    statuses: tuple[StatusCondition, ...] = builtin.REPLAY_STATUSES
    """Only these are stored: a 401/403/408 replayed for a day would outlive its cause."""

    @model_validator(mode="after")
    def _body_fits(self) -> Replay:
        if self.max_body_bytes > self.max_total_bytes:
            raise ValueError("max_body_bytes is larger than max_total_bytes")
        return self


class Idempotency(Frozen):
    header: HeaderName = builtin.IDEMPOTENCY_HEADER
    methods: tuple[Method, ...] = builtin.IDEMPOTENCY_METHODS
    replay: Replay | None = None


class DeliveryBackoff(Backoff):
    base: Duration = Field(default=builtin.DELIVERY_BACKOFF_BASE_S, gt=0)
    max: Duration = Field(default=builtin.DELIVERY_BACKOFF_MAX_S, gt=0)


class DeliveryRetries(Frozen):
    """How the delivery worker retries a stored request (fire-and-forget and webhooks alike)."""

    max_attempts: int = Field(default=builtin.DELIVERY_MAX_ATTEMPTS, ge=1)
    backoff: DeliveryBackoff = DeliveryBackoff()


class Delivery(DeliveryRetries):
    """Fire-and-forget (SPEC 11): ``Prefer: respond-async`` requests are stored, answered 202 and
    delivered through the policy by the worker."""

    ttl: Duration = Field(default=builtin.DELIVERY_TTL_S, gt=0)
    max_body_bytes: ByteSize = Field(default=builtin.DELIVERY_MAX_BODY_BYTES, ge=0)


Scope = Literal["local", "fleet"]
"""``fleet``: the state lives in Redis (main config ``fleet``), shared by every sidecar whose
policy has the same name (SPEC 12)."""


class CircuitBreakerSettings(Frozen):
    failure_threshold: int = Field(default=builtin.BREAKER_FAILURE_THRESHOLD, ge=1)
    reset_timeout: Duration = Field(default=builtin.BREAKER_RESET_TIMEOUT_S, gt=0)
    half_open_max: int = Field(default=builtin.BREAKER_HALF_OPEN_MAX, ge=1)
    failure_on: tuple[OutcomeCondition, ...] = builtin.BREAKER_FAILURE_ON
    scope: Scope = builtin.SCOPE


CIRCUIT_OPEN = "circuit_open"
"""A failover condition beyond the attempt outcomes: the upstream's breaker refuses the attempt."""


def _check_failover_condition(value: object) -> str:
    if isinstance(value, str) and value.strip().lower() == CIRCUIT_OPEN:
        return CIRCUIT_OPEN
    return _check_condition(value)


FailoverCondition = Annotated[
    str,
    BeforeValidator(_check_failover_condition),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 100, "maximum": 599}]}),
]
"""``circuit_open`` or an attempt outcome (``connect-failure``, ``timeout``, ``503``, ``5xx``...)."""


class FailoverUpstream(Frozen):
    """The same API elsewhere; its own header rules replace the policy's for attempts sent to it."""

    url: Upstream
    headers: HeaderRules = HeaderRules()
    tls: TlsSettings | None = None
    """None: the policy's ``tls`` section (set one here when that names an SNI or client certificate)."""


H = TypeVar("H", bound=Hashable)


def _repeated(items: Iterable[H]) -> H | None:
    """The first item met a second time, for lists whose entries must differ."""
    seen: set[H] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


class Failover(Frozen):
    upstreams: Annotated[tuple[FailoverUpstream, ...], Field(json_schema_extra={"minItems": 1})]
    on: tuple[FailoverCondition, ...] = builtin.FAILOVER_ON

    @field_validator("upstreams")
    @classmethod
    def _distinct(cls, upstreams: tuple[FailoverUpstream, ...]) -> tuple[FailoverUpstream, ...]:
        if not upstreams:
            raise ValueError("upstreams needs at least 1 item: the upstream to fail over to")
        repeated = _repeated(upstream.url for upstream in upstreams)
        if repeated is not None:
            raise ValueError(f"{repeated} is listed twice: each upstream has one breaker")
        return upstreams


class Concurrency(Frozen):
    max_in_flight: int = Field(default=builtin.MAX_IN_FLIGHT, ge=1)
    max_queued: int = Field(default=builtin.MAX_QUEUED, ge=0)
    queue_timeout: Duration = builtin.QUEUE_TIMEOUT_S


class RateLimit(Frozen):
    rate: float = Field(default=builtin.RATE_LIMIT_RATE, gt=0)
    per: Duration = Field(default=builtin.RATE_LIMIT_PER_S, gt=0)
    burst: int = Field(default=builtin.RATE_LIMIT_BURST, ge=1)
    max_wait: Duration = builtin.RATE_LIMIT_MAX_WAIT_S
    adaptive: bool = builtin.RATE_LIMIT_ADAPTIVE
    max_pause: Duration = Field(default=builtin.RATE_LIMIT_MAX_PAUSE_S, gt=0)
    """Longest pause a provider's Retry-After/reset may impose (a stray "86400" must not stop a day)."""
    max_queued: int = Field(default=builtin.RATE_LIMIT_MAX_QUEUED, ge=0)
    """Requests that may wait for a token at once; beyond it the lowest priority is refused first."""
    scope: Scope = builtin.SCOPE

    @property
    def per_second(self) -> float:
        return self.rate / self.per


SecretTemplate = str
"""A secret written as ``${file:PATH}`` / ``${env:NAME}`` (or, lint warns, inline): kept as the
template; rendered when pipelines are built, like a header value."""


def _check_http_url(value: str, key: str, *, query: bool) -> str:
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{key} {value!r} must be an absolute http(s) URL")
    if url.user or url.fragment or (not query and url.query_string):
        extra = "credentials or a fragment" if query else "a query, credentials or a fragment"
        raise ValueError(f"{key} {value!r} may not carry {extra}")
    return value


def _check_token_url(url: str) -> str:
    return _check_http_url(url, "token_url", query=True)


class OAuth2Settings(Frozen):
    """Client-credentials grant (RFC 6749 4.4): the token goes in ``Authorization: Bearer``."""

    token_url: Annotated[str, AfterValidator(_check_token_url)]
    client_id: SecretTemplate
    client_secret: SecretTemplate
    scope: str | None = None
    audience: str | None = None
    auth: Literal["basic", "body"] = builtin.OAUTH2_AUTH
    refresh_before: Duration = Field(default=builtin.OAUTH2_REFRESH_BEFORE_S, ge=0)


def _check_key_format(text: str) -> str:
    if "{key}" not in text:
        raise ValueError("format must contain {key}, where the key goes (e.g. 'Bearer {key}')")
    if any(ch in text for ch in "\r\n\0"):
        raise ValueError("format may not contain CR, LF or NUL")
    return text


def _distinct_keys(values: tuple[str, ...]) -> tuple[str, ...]:
    if not values:
        raise ValueError("values needs at least 1 item: the keys of the pool")
    if _repeated(values) is not None:  # not named: it is a secret
        raise ValueError("a key is listed twice: each key has its own cooldown")
    return values


class KeyPoolSettings(Frozen):
    """API keys (or accounts) used in turn; each rests on its own after a ``cooldown_on`` status."""

    header: RuleHeaderName = builtin.KEYS_HEADER
    format: Annotated[str, AfterValidator(_check_key_format)] = builtin.KEYS_FORMAT
    values: Annotated[
        tuple[SecretTemplate, ...], AfterValidator(_distinct_keys), Field(json_schema_extra={"minItems": 1})
    ]
    strategy: Literal["round_robin", "least_used"] = builtin.KEYS_STRATEGY
    cooldown_on: tuple[StatusCondition, ...] = builtin.KEYS_COOLDOWN_ON


class Credentials(Frozen):
    """What authenticates each attempt (SPEC 10): an OAuth2 token or one key of a pool."""

    oauth2: OAuth2Settings | None = None
    keys: KeyPoolSettings | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Credentials:
        if self.oauth2 is None and self.keys is None:
            raise ValueError("credentials needs oauth2 or keys")
        if self.oauth2 is not None and self.keys is not None:
            raise ValueError("set oauth2 or keys, not both: each attempt carries one credential")
        return self

    def secret_templates(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Each secret template with its key path in the section (render checks, watched files)."""
        if self.oauth2 is not None:
            return [
                (("oauth2", "client_id"), self.oauth2.client_id),
                (("oauth2", "client_secret"), self.oauth2.client_secret),
            ]
        assert self.keys is not None
        return [(("keys", "values", index), value) for index, value in enumerate(self.keys.values)]

    @property
    def header(self) -> str:
        """The request header the credential goes in."""
        return self.keys.header if self.keys is not None else "Authorization"


FALLBACK_ERROR_TYPES = ("circuit_open", "timeout", "upstream_unreachable", "rate_limited", "overloaded")
"""Outrigger error types a fallback may answer for (``upstream_unreachable`` covers connect
failures and resets, ``timeout`` both ``per_try`` and ``total``)."""


def _check_fallback_condition(value: object) -> str:
    if isinstance(value, str) and value.strip().lower() in FALLBACK_ERROR_TYPES:
        return value.strip().lower()
    try:
        return _check_status_condition(value)
    except ValueError:
        raise ValueError(
            f"unknown fallback condition {value!r}: use {', '.join(FALLBACK_ERROR_TYPES)},"
            " a status (503), a range (500-504) or a class (5xx)"
        ) from None


FallbackCondition = Annotated[
    str,
    BeforeValidator(_check_fallback_condition),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "integer", "minimum": 100, "maximum": 599},
            ]
        }
    ),
]
"""An Outrigger error type (``circuit_open``...) or an upstream status, range or class."""

_OWN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"})
_NO_BODY_STATUSES = frozenset({204, 304})


def _check_declared_header(name: str) -> str:
    lower = name.lower()
    if lower in _OWN_HEADERS or lower.startswith("x-outrigger-"):
        raise ValueError(f"{name!r} is set by Outrigger itself and cannot be declared")
    return name


DeclaredHeaderName = Annotated[HeaderName, AfterValidator(_check_declared_header)]
AnswerStatus = Annotated[int, Field(ge=200, le=599)]
"""A final status Outrigger answers itself (1xx are not final answers)."""


class Fallback(Frozen):
    """The declared answer when nothing better exists (SPEC 9)."""

    on: tuple[FallbackCondition, ...] = builtin.FALLBACK_ON
    status: AnswerStatus = builtin.FALLBACK_STATUS
    headers: dict[DeclaredHeaderName, str] = Field(default_factory=lambda: dict(builtin.FALLBACK_HEADERS))
    body: str = builtin.FALLBACK_BODY

    @field_validator("body")
    @classmethod
    def _bounded(cls, body: str) -> str:
        size = len(body.encode())
        if size > builtin.FALLBACK_MAX_BODY_BYTES:
            raise ValueError(f"body is {size} bytes; at most {builtin.FALLBACK_MAX_BODY_BYTES} are allowed")
        return body

    @model_validator(mode="after")
    def _body_allowed(self) -> Fallback:
        if self.status in _NO_BODY_STATUSES and self.body:
            raise ValueError(f"status {self.status} has no body: set body to ''")
        return self


class FaultAbort(Frozen):
    status: AnswerStatus = builtin.FAULT_ABORT_STATUS
    percent: float = Field(ge=0, le=100)
    """Required: share of (eligible) requests aborted."""


class FaultDelay(Frozen):
    duration: Duration = Field(default=builtin.FAULT_DELAY_S, gt=0)
    percent: float = Field(ge=0, le=100)
    """Required: share of (eligible) requests delayed."""


class Faults(Frozen):
    """Drills: injected aborts and delays before the upstream call (SPEC 9). One roll per request
    picks at most one fault, so the two percents add up to at most 100."""

    abort: FaultAbort | None = None
    delay: FaultDelay | None = None
    header_only: bool = builtin.FAULT_HEADER_ONLY
    """Only requests carrying ``x-outrigger-fault: on`` are drilled."""

    @model_validator(mode="after")
    def _one_roll(self) -> Faults:
        abort = self.abort.percent if self.abort else 0.0
        delay = self.delay.percent if self.delay else 0.0
        if abort + delay > 100:
            raise ValueError(f"abort.percent + delay.percent is {abort + delay:g}; at most 100")
        return self


class Cache(Frozen):
    """Response cache for GET and HEAD (RFC 9111 basics) with stale-if-error (SPEC 9)."""

    ttl: Duration = Field(default=builtin.CACHE_TTL_S, ge=0)
    """Freshness when the upstream says nothing; 0 stores only what Cache-Control allows."""
    honour_cache_control: bool = builtin.CACHE_HONOUR_CACHE_CONTROL
    stale_if_error: Duration = Field(default=builtin.CACHE_STALE_IF_ERROR_S, ge=0)
    max_entries: int = Field(default=builtin.CACHE_MAX_ENTRIES, ge=1)
    max_bytes: ByteSize = Field(default=builtin.CACHE_MAX_BYTES, ge=1)
    max_entry_bytes: ByteSize = Field(default=builtin.CACHE_MAX_ENTRY_BYTES, ge=0)
    key_headers: tuple[HeaderName, ...] = builtin.CACHE_KEY_HEADERS
    """Requests that differ in these never share an entry (values hashed, never kept in clear)."""

    @model_validator(mode="after")
    def _entry_fits(self) -> Cache:
        if self.max_entry_bytes > self.max_bytes:
            raise ValueError(
                f"max_entry_bytes ({self.max_entry_bytes}) is larger than max_bytes ({self.max_bytes})"
            )
        return self


PathGlob = Annotated[str, AfterValidator(check_glob)]
"""A ``redact_paths`` entry: ``/services/*/*/*``; each ``*`` matches within one path segment."""


class PolicySettings(Frozen):
    """The part of a policy that merges: built-in < defaults < preset < host policy < route."""

    tls: TlsSettings = TlsSettings()
    allow_private_addresses: bool = builtin.ALLOW_PRIVATE_ADDRESSES
    timeouts: Timeouts = Timeouts()
    headers: HeaderRules = HeaderRules()
    retries: Retries | None = None
    idempotency: Idempotency | None = None
    circuit_breaker: CircuitBreakerSettings | None = None
    concurrency: Concurrency | None = None
    rate_limit: RateLimit | None = None
    cache: Cache | None = None
    redact_paths: tuple[PathGlob, ...] = builtin.REDACT_PATHS
    """Path globs whose ``*`` parts are secrets (Slack webhooks, Telegram bot tokens)."""
    connect: Literal["refuse", "tunnel"] = builtin.CONNECT_MODE
    """``tunnel``: CONNECT host:port becomes an opaque TCP tunnel (SPEC 2); else 405."""
    fallback: Fallback | None = None
    """The declared answer for failures in ``fallback.on`` (SPEC 9); routes may override it."""
    faults: Faults | None = None
    """Fault drills (SPEC 9): injected aborts and delays, per policy."""
    failover: Failover | None = None
    """Other upstreams for the same API, each with its own breaker (SPEC 9)."""
    credentials: Credentials | None = None
    """OAuth2 client credentials or an API key pool (SPEC 10), per policy."""
    delivery: Delivery | None = None
    """Durable fire-and-forget delivery (SPEC 11); per policy (routes cannot change it)."""
    _redactor: PathRedactor = PrivateAttr(default=NO_REDACTION)

    def model_post_init(self, context: Any) -> None:
        """Compile ``redact_paths`` once, at load: requests only run the compiled patterns."""
        if self.redact_paths:
            self._redactor = compile_globs(self.redact_paths)

    @model_validator(mode="after")
    def _credentials_header_untouched(self) -> PolicySettings:
        """Header rules apply after the credentials layer: one naming its header would undo it."""
        if self.credentials is None:
            return self
        header = self.credentials.header.lower()
        if any(name.lower() == header for name in (*self.headers.set, *self.headers.remove)):
            raise ValueError(
                f"headers sets or removes {self.credentials.header}, which credentials writes;"
                " drop it from headers"
            )
        return self

    def redact_path(self, path_qs: str) -> str:
        """`path_qs` as logs, spans and error bodies may show it (query values aside)."""
        return self._redactor.redact(path_qs)

    @property
    def idempotency_header(self) -> str:
        """The header that marks a request as safe to retry, whether or not Outrigger injects it."""
        return self.idempotency.header if self.idempotency else builtin.IDEMPOTENCY_HEADER


ROUTE_OVERRIDABLE = ("timeouts", "headers", "retries", "fallback")
"""Sections a route may override; stateful ones (budget, replay cache, breaker, limits) stay per policy."""


class RouteMatch(Frozen):
    method: Methods | None = None
    path: str | None = None

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        if path is not None and not path.startswith(("/", "*")):
            raise ValueError("path glob must start with '/' (or '*')")
        return path


class RouteSpec(Frozen):
    """A route as written: a match plus raw overrides, validated after merging."""

    match: RouteMatch
    timeouts: dict[str, Any] | None = None
    headers: dict[str, Any] | None = None
    retries: dict[str, Any] | None = None
    fallback: dict[str, Any] | None = None

    @field_validator("retries")
    @classmethod
    def _budget_is_per_policy(cls, retries: dict[str, Any] | None) -> dict[str, Any] | None:
        if retries is not None and "budget" in retries:
            raise ValueError("budget is shared by the whole policy; set it on the policy, not a route")
        return retries

    def overrides(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ROUTE_OVERRIDABLE if getattr(self, key) is not None}


def _not_empty(hosts: tuple[str, ...]) -> tuple[str, ...]:
    """Runs only when every host is valid, so a list of bad hosts is not also called empty
    (``Field(min_length=1)`` counts the hosts left after the bad ones are dropped)."""
    if not hosts:
        raise ValueError("hosts needs at least 1 item: the host names this policy claims")
    return hosts


class PolicyTarget(Frozen):
    """The non-mergeable part of a policy as written: what it claims and where it sends."""

    hosts: Annotated[
        tuple[HostPattern, ...], AfterValidator(_not_empty), Field(json_schema_extra={"minItems": 1})
    ]
    upstream: Upstream | None = None
    listen: Port | None = None
    routes: tuple[RouteSpec, ...] = ()
    """The loader validates each route on its own (so one bad route hides no other); this field
    types a ``routes`` that is not a list and describes routes in the JSON schema."""

    @field_validator("listen")
    @classmethod
    def _listen_has_a_destination(cls, listen: int | None, info: ValidationInfo) -> int | None:
        """A request on a dedicated port names no host: it goes to ``upstream``, else to the first
        host (routing.dedicated_upstream), which a wildcard cannot be. Skipped when hosts or
        upstream are themselves invalid (already reported)."""
        hosts = info.data.get("hosts")
        no_upstream = "upstream" in info.data and info.data["upstream"] is None
        if listen is not None and no_upstream and hosts and hosts[0].startswith("*."):
            raise ValueError("a policy with listen needs upstream or an exact first host")
        return listen


class Route(Frozen):
    match: RouteMatch
    settings: PolicySettings


class Policy(Frozen):
    """One host policy with `defaults` merged in and every route resolved."""

    hosts: tuple[str, ...]
    upstream: UpstreamTarget | None
    listen: Port | None
    settings: PolicySettings
    routes: tuple[Route, ...]
    source: str
    """FILE:LINE where the policy is written, for explain and error messages."""
    preset: str | None = None
    """The provider preset it is built on (``preset: stripe``), for explain and /config."""

    @property
    def name(self) -> str:
        """Bounded label for metrics and logs: the first host pattern."""
        return self.hosts[0]

    @property
    def first_host(self) -> tuple[str, int | None]:
        """The first host pattern's name and claimed port (a dedicated port's default upstream)."""
        return split_host_pattern(self.hosts[0])

    def redact_path(self, path_qs: str) -> str:
        """The request path with the secrets ``redact_paths`` names replaced (for logs and spans)."""
        return self.settings.redact_path(path_qs)


POLICY_TARGET_KEYS = frozenset(PolicyTarget.model_fields)


class Limits(Frozen):
    max_header_bytes: ByteSize = Field(default=builtin.MAX_HEADER_BYTES, ge=1024)
    max_headers: int = Field(default=builtin.MAX_HEADERS, ge=1)
    header_timeout: Duration = Field(default=builtin.HEADER_TIMEOUT_S, gt=0)


class TracesSettings(Frozen):
    endpoint: str | None = None
    """OTLP/HTTP traces URL (http://collector:4318/v1/traces); unset: OTEL_EXPORTER_OTLP_* or off."""
    sample_ratio: float = Field(default=builtin.TRACE_SAMPLE_RATIO, ge=0, le=1)

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, endpoint: str | None) -> str | None:
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            raise ValueError("endpoint must be an http:// or https:// URL (OTLP/HTTP)")
        return endpoint


class Telemetry(Frozen):
    service_name: str = builtin.SERVICE_NAME
    traces: TracesSettings = TracesSettings()
    access_log: bool = builtin.ACCESS_LOG


WebhookScheme = Literal["stripe", "github", "slack", "standard", "shopify", "twilio", "hmac"]
TIMESTAMP_SCHEMES = frozenset({"stripe", "slack", "standard"})
"""Schemes that sign a timestamp, so `tolerance` applies (the others cannot tell a replay)."""
_HMAC_ONLY = ("header", "algorithm", "encoding", "prefix", "id_header")
_TWILIO_ONLY = ("public_url",)


class WebhookVerify(Frozen):
    """How a route's requests prove they come from the provider (SPEC 11)."""

    scheme: WebhookScheme
    secret: str | None = None
    """A ``${file:PATH}`` or ``${env:NAME}`` template (rendered when the listener's routes are built)."""
    secrets: tuple[str, ...] | None = None
    """Several secrets, any of which may sign (rotation); instead of `secret`."""
    tolerance: Duration = Field(default=builtin.WEBHOOK_TOLERANCE_S, gt=0)
    header: HeaderName | None = None
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""
    id_header: HeaderName | None = None
    """hmac: the header carrying the provider's event id (for dedupe); none by default."""
    public_url: str | None = None
    """twilio: the URL Twilio calls, as Twilio sees it (scheme, host, port, path): it signs that URL,
    which behind an ingress or load balancer is not the listener's own address."""

    @field_validator("secret", "secrets")
    @classmethod
    def _not_blank(cls, value: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        for secret in (value,) if isinstance(value, str) else value or ():
            if not secret.strip():
                raise ValueError("a secret may not be empty")
        if value is not None and not value:
            raise ValueError("secrets needs at least 1 item")
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, url: str | None) -> str | None:
        return None if url is None else _check_http_url(url, "public_url", query=False)

    @model_validator(mode="after")
    def _consistent(self) -> WebhookVerify:
        if (self.secret is None) == (self.secrets is None):
            raise ValueError("set exactly one of secret or secrets")
        misplaced = [
            key
            for key, scheme in [*((k, "hmac") for k in _HMAC_ONLY), *((k, "twilio") for k in _TWILIO_ONLY)]
            if key in self.model_fields_set and self.scheme != scheme
        ]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)} do not apply to scheme {self.scheme}")
        if "tolerance" in self.model_fields_set and self.scheme not in TIMESTAMP_SCHEMES:
            raise ValueError(f"tolerance does not apply: scheme {self.scheme} signs no timestamp")
        if self.scheme == "hmac" and self.header is None:
            raise ValueError("scheme hmac needs header: the header that carries the signature")
        if self.scheme == "twilio" and self.public_url is None:
            raise ValueError("scheme twilio needs public_url: the URL Twilio calls (it signs that URL)")
        return self

    @property
    def templates(self) -> tuple[str, ...]:
        """Every secret template, the one to try first first."""
        return (self.secret,) if self.secret is not None else self.secrets or ()


class WebhookDelivery(DeliveryRetries):
    """How a stored event is delivered to the app: until it answers 2xx, `max_attempts` or `ttl`."""

    ttl: Duration = Field(default=builtin.WEBHOOK_DELIVERY_TTL_S, gt=0)


class WebhookRouteSettings(Frozen):
    path: str
    """Matched exactly (no globs); also the ``route`` label of the webhook metrics."""
    verify: WebhookVerify
    forward: str
    """The app's URL the verified event is delivered to."""
    dedupe: Duration = Field(default=builtin.WEBHOOK_DEDUPE_S, gt=0)
    delivery: WebhookDelivery = WebhookDelivery()
    max_body_bytes: ByteSize = Field(default=builtin.WEBHOOK_MAX_BODY_BYTES, ge=1)

    @field_validator("path")
    @classmethod
    def _exact_path(cls, path: str) -> str:
        if not path.startswith("/") or any(ch in path for ch in "?#* \t"):
            raise ValueError("path must start with '/' and hold no query, fragment, '*' or spaces")
        return path

    @field_validator("forward")
    @classmethod
    def _forward_url(cls, url: str) -> str:
        return _check_http_url(url, "forward", query=True)


class Webhooks(Frozen):
    listen: ListenAddress = ListenAddress(
        host=builtin.WEBHOOKS_LISTEN_HOST, port=builtin.WEBHOOKS_LISTEN_PORT
    )
    routes: tuple[WebhookRouteSettings, ...] = ()

    @field_validator("routes")
    @classmethod
    def _distinct(cls, routes: tuple[WebhookRouteSettings, ...]) -> tuple[WebhookRouteSettings, ...]:
        repeated = _repeated(route.path for route in routes)
        if repeated is not None:
            raise ValueError(f"path {repeated} is listed twice")
        return routes


def _check_redis_url(value: str) -> str:
    url = URL(masked_references(value)[0])  # a reference may stand for any part (a password)
    if url.scheme not in ("redis", "rediss", "unix") or not (url.host or url.scheme == "unix"):
        raise ValueError(f"redis {value!r} must be a redis://, rediss:// or unix:// URL")
    return value


def _check_key_prefix(value: str) -> str:
    if not value or any(ch.isspace() or ch in "{}" for ch in value):
        raise ValueError(
            "key_prefix must be a non-empty word without spaces or braces (braces pick Redis slots)"
        )
    return value


class Fleet(Frozen):
    """Where fleet-scoped state lives (SPEC 12); restart-only."""

    redis: Annotated[str, AfterValidator(_check_redis_url)]
    """May carry ``${env:NAME}`` / ``${file:PATH}`` (a password); rendered when Outrigger starts."""
    key_prefix: Annotated[str, AfterValidator(_check_key_prefix)] = builtin.FLEET_KEY_PREFIX
    """Keeps apart fleets (or environments) that share one Redis."""
    timeout: Duration = Field(default=builtin.FLEET_TIMEOUT_S, gt=0)


class MainConfig(Frozen):
    """The main config file. That ``listen`` and ``admin`` use different ports is checked by the
    loader with the policies' ports, where the clashing line is known."""

    listen: ListenAddress = ListenAddress(host=builtin.MAIN_LISTEN_HOST, port=builtin.MAIN_LISTEN_PORT)
    admin: ListenAddress = ListenAddress(host=builtin.ADMIN_LISTEN_HOST, port=builtin.ADMIN_LISTEN_PORT)
    policy_dirs: tuple[str, ...] = builtin.POLICY_DIRS
    unknown_hosts: Literal["deny", "allow"] = builtin.UNKNOWN_HOSTS
    defaults: PolicySettings = PolicySettings()
    limits: Limits = Limits()
    drain_timeout: Duration = builtin.DRAIN_TIMEOUT_S
    drain_idle: Duration = builtin.DRAIN_IDLE_S
    """After SIGTERM, exit once nothing has been in flight this long (drain_timeout still caps it)."""
    telemetry: Telemetry = Telemetry()
    reload_poll_interval: Duration = Field(default=builtin.RELOAD_POLL_INTERVAL_S, gt=0)
    """How often config, policy and secret files are checked for changes (by content hash)."""
    webhooks: Webhooks | None = None
    """Inbound webhooks (SPEC 11); absent: no webhook listener."""
    data_dir: Path = Field(default=Path(builtin.DATA_DIR), validate_default=True)
    """The embedded delivery store's folder; created on first use (only when something needs it)."""
    fleet: Fleet | None = None
    """Redis for ``scope: fleet`` rate limits and breakers (SPEC 12); absent: each sidecar alone."""

    @field_validator("data_dir")
    @classmethod
    def _resolve_data_dir(cls, path: Path, info: ValidationInfo) -> Path:
        return path if path.is_absolute() else _base_dir(info) / path


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    base = context.get("base_dir")
    return base if isinstance(base, Path) else Path.cwd()
