"""`outrigger explain`: which policy applies to a request and its merged settings, secrets redacted."""

from __future__ import annotations

from typing import Any

import yaml
from yarl import URL

from proxy import secrets
from proxy.config.loader import Config
from proxy.config.model import PolicySettings, Webhooks
from proxy.routing import Router, dedicated_upstream, upstream_for
from proxy.telemetry.names import redact_query


def redacted_settings(settings: PolicySettings) -> dict[str, Any]:
    """Settings as config YAML would write them, with header and credential secrets redacted."""
    data = settings.model_dump(mode="json", exclude_none=True)
    data["headers"]["set"] = {
        name: secrets.redact(name, value) for name, value in settings.headers.set.items()
    }
    if settings.failover is not None:
        for written, upstream in zip(data["failover"]["upstreams"], settings.failover.upstreams, strict=True):
            written["headers"]["set"] = {
                name: secrets.redact(name, value) for name, value in upstream.headers.set.items()
            }
    if settings.credentials is not None:
        section = data["credentials"]
        if settings.credentials.oauth2 is not None:
            oauth2 = settings.credentials.oauth2
            section["oauth2"]["client_secret"] = secrets.redact("client_secret", oauth2.client_secret)
        if settings.credentials.keys is not None:
            section["keys"]["values"] = [secrets.redact("key", v) for v in settings.credentials.keys.values]
    return data


def redacted_webhooks(webhooks: Webhooks | None) -> dict[str, Any] | None:
    """The ``webhooks`` section as written, each secret shown only as its ``${file:}``/``${env:}``
    reference (a secret written inline is replaced)."""
    if webhooks is None:
        return None
    data = webhooks.model_dump(mode="json", exclude_none=True)
    for written, route in zip(data["routes"], webhooks.routes, strict=True):
        verify = route.verify
        if verify.secret is not None:
            written["verify"]["secret"] = secrets.redact("secret", verify.secret)
        if verify.secrets is not None:
            written["verify"]["secrets"] = [secrets.redact("secret", t) for t in verify.secrets]
    return data


def explain(config: Config, method: str, url: str) -> str:
    target = URL(url)
    if not target.host:
        raise ValueError(f"{url!r} is not an absolute URL (e.g. http://api.stripe.com/v1/charges)")
    router = Router(config)
    host = target.host.lower()
    policy = (
        router.policy_for_port(target.port)
        if host in ("127.0.0.1", "localhost", "::1") and target.port
        else None
    )
    if policy is not None:
        matched_by, upstream = "dedicated listen port", dedicated_upstream(policy)
    else:
        found = router.match_host(host, target.explicit_port)
        if found is None:
            return yaml.safe_dump(
                {
                    "host": host,
                    "policy": None,
                    "result": "refused: 403 host_not_allowed (unknown_hosts: deny)",
                },
                sort_keys=False,
            )
        policy, matched_by = found.policy, _how(found.pattern)
        upstream = upstream_for(policy, host, target.explicit_port)
    match = router.resolve_route(policy, method.upper(), target.raw_path)
    report = {
        "request": f"{method.upper()} {target.with_user(None).with_query(None)}{_query_names(url)}",
        "policy": policy.name,
        "source": policy.source,
        "preset": policy.preset,
        "matched_by": matched_by,
        "route": None
        if match.route is None
        else {
            "index": match.route,
            **policy.routes[match.route].match.model_dump(exclude_none=True),
        },
        "upstream": str(upstream),
        "config_version": config.version,
        "settings": redacted_settings(match.settings),
    }
    return yaml.safe_dump(report, sort_keys=False)


def _how(pattern: str | None) -> str:
    """The router's choice in words: the pattern it matched, or the unknown-hosts fallback."""
    if pattern is None:
        return "unknown_hosts: allow"
    return f"wildcard {pattern}" if pattern.startswith("*.") else f"exact host {pattern}"


def _query_names(url: str) -> str:
    """The query with its values redacted, as in logs and spans."""
    _, sep, query = url.partition("?")
    return redact_query("?" + query) if sep else ""
