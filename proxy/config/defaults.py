"""Every built-in default, named once. Docs (docs/policy-reference.md) quote these."""

from __future__ import annotations

from typing import Final

MAIN_LISTEN_HOST = "127.0.0.1"
MAIN_LISTEN_PORT = 15001
ADMIN_LISTEN_HOST = "127.0.0.1"
ADMIN_LISTEN_PORT = 15000
POLICY_DIRS = ("policies/",)
UNKNOWN_HOSTS: Final = "deny"
DRAIN_TIMEOUT_S = 20.0
"""Graceful-shutdown budget: below Kubernetes' default 30 s termination grace period."""

MAX_HEADER_BYTES = 64 * 1024
"""Request line plus all header lines; larger requests get 431 (Envoy's default is 60 KiB)."""
MAX_HEADERS = 100
"""Header count limit (Envoy's default is 100)."""

UPSTREAM_SCHEME = "https"
TLS_VERIFY = True
ALLOW_PRIVATE_ADDRESSES = False

CONNECT_TIMEOUT_S = 2.0
PER_TRY_TIMEOUT_S = 10.0
TOTAL_TIMEOUT_S = 30.0

DNS_CACHE_TTL_S = 10.0
"""How long a checked DNS answer is reused before resolving again."""
POOL_LIMIT_PER_HOST = 0
"""Upstream connections per host; 0 = unlimited (the concurrency layer bounds work)."""
POOL_LIMIT_TOTAL = 1000
KEEPALIVE_TIMEOUT_S = 30.0
