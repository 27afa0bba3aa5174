"""Every built-in default, named once. Docs (docs/policies.md) quote these."""

from __future__ import annotations

from typing import Final, Literal

MAIN_LISTEN_HOST = "127.0.0.1"
MAIN_LISTEN_PORT = 15001
ADMIN_LISTEN_HOST = "127.0.0.1"
ADMIN_LISTEN_PORT = 15000
POLICY_DIRS = ("policies/",)
UNKNOWN_HOSTS: Final = "deny"
DRAIN_TIMEOUT_S = 20.0
"""Graceful-shutdown budget: below Kubernetes' default 30 s termination grace period."""
DRAIN_IDLE_S = 5.0
"""A drain ends early once nothing has been in flight this long: the app has made its last calls."""

MAX_HEADER_BYTES = 64 * 1024
"""Request line plus all header lines; larger requests get 431 (Envoy's default is 60 KiB)."""
MAX_HEADERS = 100
"""Header count limit (Envoy's default is 100)."""
HEADER_TIMEOUT_S = 10.0
"""A connection's first request head must be complete this long after it opened, else 408 and close
(slowloris; nginx's client_header_timeout is 60 s, Envoy's request_headers_timeout is off by default)."""

TLS_VERIFY = True
ALLOW_PRIVATE_ADDRESSES = False
CONNECT_MODE: Final = "refuse"
"""CONNECT is answered 405 (policies cannot apply to bytes they cannot read) unless a policy says tunnel."""

CONNECT_TIMEOUT_S = 2.0
PER_TRY_TIMEOUT_S = 10.0
TOTAL_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 60.0
"""Longest silence once bytes flow (upload chunks, response body chunks): SSE streams live on."""

DNS_CACHE_TTL_S = 10.0
"""How long a checked DNS answer is reused before resolving again."""
POOL_MAX_PER_UPSTREAM = 1000
"""Open connections per pool key (checked address, port, TLS context, SNI); requests beyond it wait
for a free one within `connect`. The concurrency layer is where a policy bounds its work."""
KEEPALIVE_TIMEOUT_S = 30.0
"""An idle upstream connection is closed after this long."""

RETRY_MAX_ATTEMPTS = 3
"""Attempts including the first."""
RETRY_MAX_ATTEMPTS_LIMIT = 10
RETRY_ON = ("connect-failure", "reset", "timeout", "502", "503", "504", "429")
RETRY_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")
"""Idempotent by RFC 9110; POST/PATCH are retried only with an idempotency key."""
KEYED_METHODS = frozenset({"POST", "PATCH"})
BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 10.0
RETRY_AFTER_HONOUR = True
RETRY_AFTER_MAX_S = 60.0
BUDGET_RATIO = 0.2
"""Linkerd's default: retries may add at most 20% load."""
BUDGET_MIN_PER_SECOND = 10.0
BUDGET_WINDOW_S = 10.0
MAX_REPLAY_BYTES = 1024 * 1024

IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_METHODS = ("POST", "PATCH")
REPLAY_TTL_S = 24 * 3600.0
REPLAY_MAX_ENTRIES = 10_000
REPLAY_MAX_BODY_BYTES = 1024 * 1024
REPLAY_MAX_TOTAL_BYTES = 64 * 1024 * 1024
REPLAY_STATUSES = ("2xx",)
"""Responses the replay cache stores; a 4xx may be transient (401 token expired, 408, 409, 429)."""

BREAKER_FAILURE_THRESHOLD = 5
"""Consecutive failed attempts that open the breaker."""
BREAKER_RESET_TIMEOUT_S = 30.0
BREAKER_HALF_OPEN_MAX = 1
BREAKER_FAILURE_ON = ("connect-failure", "timeout", "5xx")
SCOPE: Final[Literal["local", "fleet"]] = "local"
"""Rate limit and breaker state stays in this sidecar unless a policy says ``scope: fleet``."""

MAX_IN_FLIGHT = 100
MAX_QUEUED = 100
QUEUE_TIMEOUT_S = 1.0

RATE_LIMIT_RATE = 100.0
RATE_LIMIT_PER_S = 1.0
RATE_LIMIT_BURST = 100
RATE_LIMIT_MAX_WAIT_S = 0.5
RATE_LIMIT_ADAPTIVE = True
RATE_LIMIT_MAX_PAUSE_S = 300.0
RATE_LIMIT_MAX_QUEUED = 1000

FLEET_KEY_PREFIX = "outrigger"
FLEET_TIMEOUT_S = 0.05
"""A Redis slower than this is treated as down: the sidecar goes on with its local state."""
FLEET_PROBE_INTERVAL_S = 1.0
"""Not configurable: while Redis is down, how often it is asked whether it is back."""

REDACT_PATHS: tuple[str, ...] = ()
"""No path is assumed to carry a secret; query values are always redacted."""

SERVICE_NAME = "outrigger"
TRACE_SAMPLE_RATIO = 1.0
ACCESS_LOG = True
RELOAD_POLL_INTERVAL_S = 2.0

FALLBACK_ON = ("circuit_open", "timeout", "upstream_unreachable", "rate_limited", "overloaded", "5xx")
FALLBACK_STATUS = 503
FALLBACK_HEADERS: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
FALLBACK_BODY = '{"degraded": true}'
FALLBACK_MAX_BODY_BYTES = 64 * 1024
"""A declared answer lives in memory for every route that uses it: it stays small."""

FAULT_ABORT_STATUS = 503
FAULT_DELAY_S = 1.0
FAULT_HEADER_ONLY = True
"""A drill touches only requests carrying ``x-outrigger-fault: on`` unless it says otherwise, so a
faults section copied into production cannot fail real traffic by itself."""
FAILOVER_ON = ("circuit_open", "connect-failure", "timeout", "5xx")
"""An upstream whose breaker refuses is skipped; an attempt failing so sends the next one onwards."""
CACHE_TTL_S = 60.0
"""Freshness of a stored response when the upstream says nothing (0: store only what Cache-Control allows)."""
CACHE_HONOUR_CACHE_CONTROL = True
CACHE_STALE_IF_ERROR_S = 600.0
"""How long past its freshness an entry may still answer for a failing upstream."""
CACHE_MAX_ENTRIES = 10_000
CACHE_MAX_BYTES = 64 * 1024 * 1024
"""All entries of one policy together; the least recently used go first."""
CACHE_MAX_ENTRY_BYTES = 1024 * 1024
"""Larger responses stream through and are not stored."""
CACHE_KEY_HEADERS = ("Authorization",)
"""Requests that differ in these never share an entry (their values are hashed, never kept)."""
CACHE_PASS_TTL_S = 60.0
"""Not configurable: after a key's response proved unstorable (no-store, too large, ...), concurrent
misses for it stop waiting for one another this long ("hit-for-pass"), so they pay no extra latency."""

OAUTH2_AUTH: Final = "basic"
"""Client authentication at the token endpoint: HTTP Basic (RFC 6749 2.3.1), or ``body`` form fields."""
OAUTH2_REFRESH_BEFORE_S = 60.0
"""A token is refreshed in the background this long before it expires."""
OAUTH2_DEFAULT_LIFETIME_S = 3600.0
"""Lifetime assumed for a token whose response names no ``expires_in`` (RFC 6749 leaves it to docs)."""
OAUTH2_CONNECT_TIMEOUT_S = 2.0
OAUTH2_REQUEST_TIMEOUT_S = 5.0
"""One call to the token endpoint, connect to the end of its body."""
OAUTH2_ATTEMPTS = 3
"""Calls per token fetch: connection failures, timeouts, 429 and 5xx are tried again."""
OAUTH2_BACKOFF_BASE_S = 0.1
OAUTH2_BACKOFF_MAX_S = 1.0
OAUTH2_REFRESH_RETRY_S = 5.0
"""After a failed background refresh, the next one waits this long (the old token still serves)."""
OAUTH2_MAX_RESPONSE_BYTES = 64 * 1024
"""A token response larger than this is malformed (no unbounded buffering)."""
KEYS_HEADER = "Authorization"
KEYS_FORMAT = "Bearer {key}"
KEYS_STRATEGY: Final = "round_robin"
KEYS_COOLDOWN_ON = ("429", "401")
KEY_COOLDOWN_S = 60.0
"""How long a key rests after a ``cooldown_on`` status that names no Retry-After or reset."""
WEBHOOKS_LISTEN_HOST = "127.0.0.1"
"""Loopback like every listener (SPEC 7): providers reach it only once it is configured to 0.0.0.0
(or a pod IP) behind an ingress."""
WEBHOOKS_LISTEN_PORT = 15002
WEBHOOK_TOLERANCE_S = 300.0
"""How far a signed timestamp may be from now (either way): the providers' own SDKs use 5 minutes."""
WEBHOOK_DEDUPE_S = 72 * 3600.0
"""Redeliveries of one event id within this window are acknowledged, not forwarded again."""
WEBHOOK_MAX_BODY_BYTES = 1024 * 1024
"""Larger webhook bodies are refused (413) before they are read or verified."""
WEBHOOK_BODY_TIMEOUT_S = 30.0
"""Not configurable: a webhook body must arrive whole within this (else 408), so a sender that stalls
cannot hold a handler open."""
WEBHOOK_DELIVERY_TTL_S = 72 * 3600.0
WEBHOOK_FORWARD_CONNECT_S = 2.0
"""Not configurable: forwarding a stored event to the app (on loopback) connects within this."""
WEBHOOK_FORWARD_TIMEOUT_S = 30.0
"""Not configurable: the app's answer head must arrive this long after the event was written, and
each silence in its answer's body may last this long; else the attempt is a ``timeout`` (retried)."""
DATA_DIR = "outrigger-data"
"""The embedded store's folder (main config ``data_dir``), beside the config file unless absolute."""
DELIVERY_MAX_ATTEMPTS = 20
DELIVERY_BACKOFF_BASE_S = 1.0
DELIVERY_BACKOFF_MAX_S = 600.0
DELIVERY_TTL_S = 24 * 3600.0
"""A delivery not done this long after it was accepted goes dead."""
DELIVERY_MAX_BODY_BYTES = 1024 * 1024
"""Larger fire-and-forget bodies are refused (413 body_too_large); nothing is stored."""
DELIVERY_RETRY_ON = RETRY_ON
"""A policy without ``retries`` still has its deliveries retried on the usual transient outcomes."""
