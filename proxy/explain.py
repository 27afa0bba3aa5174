"""`outrigger explain`: which policy applies to a request and its merged settings, secrets redacted."""

from __future__ import annotations

from typing import Any

import yaml
from yarl import URL

from proxy import secrets
from proxy.config.loader import Config
from proxy.config.model import PolicySettings
from proxy.routing import Router, upstream_for


def redacted_settings(settings: PolicySettings) -> dict[str, Any]:
    """Settings as config YAML would write them, with header secrets redacted."""
    data = settings.model_dump(mode="json", exclude_none=True)
    data["headers"]["set"] = {
        name: secrets.redact(name, value) for name, value in settings.headers.set.items()
    }
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
    matched_by = "dedicated listen port" if policy else None
    if policy is None:
        policy = router.policy_for_host(host)
    if policy is None:
        return yaml.safe_dump(
            {
                "host": host,
                "policy": None,
                "result": "refused: 403 host_not_allowed (unknown_hosts: deny)",
            },
            sort_keys=False,
        )
    if matched_by is None:
        matched_by = "unknown_hosts: allow" if policy is router.fallback else _how(policy.hosts, host)
    match = router.resolve_route(policy, method.upper(), target.raw_path)
    upstream = upstream_for(policy, host, target.explicit_port)
    report = {
        "request": f"{method.upper()} {url}",
        "policy": policy.name,
        "source": policy.source,
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


def _how(patterns: tuple[str, ...], host: str) -> str:
    return (
        f"exact host {host}"
        if host in patterns
        else next(f"wildcard {p}" for p in patterns if p.startswith("*.") and host.endswith(p[1:]))
    )
