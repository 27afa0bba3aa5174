"""Warnings for configs that load fine but probably do not do what their author meant.

`outrigger check` prints them as ``FILE:LINE: key.path: warning: message``. The
line is where the policy starts (or the main config's ``defaults:`` key); key
paths are relative to the policy (``retries``, ``routes[0].retries``), or start
with ``defaults.``. Each rule is one small function over one policy body.

``defaults`` and a policy's own settings are merged before they get here, so
a problem written once in ``defaults`` would show up in every policy and every
route. A finding is therefore reported only where it first appears: a policy
does not repeat one of ``defaults``, a route does not repeat one of its policy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from proxy import secrets
from proxy.config.defaults import KEYED_METHODS
from proxy.config.loader import Config, format_path, webhook_secret_templates
from proxy.config.model import Backoff, Policy, PolicySettings, Retries, Route, split_host_pattern
from proxy.config.units import format_duration
from proxy.fleet.backend import inline_password


@dataclass(frozen=True)
class _Finding:
    path: str
    """Key path relative to the policy body, e.g. ``retries.methods``."""
    message: str
    subject: object = field(default=None, repr=False)
    """What the finding is about, to tell repeats apart; compared, never printed (it may be a secret)."""


def _retrying(settings: PolicySettings) -> Retries | None:
    """The retries section if it can retry at all (``max_attempts: 1`` never retries)."""
    retries = settings.retries
    return retries if retries is not None and retries.max_attempts > 1 else None


def _worst_backoff(backoff: Backoff, retries: int) -> float:
    """Longest total wait before `retries` retries: full jitter never exceeds min(max, base * 2**(n-1))."""
    return sum(min(backoff.max, backoff.base * 2.0 ** (n - 1)) for n in range(1, retries + 1))


def _deadline(settings: PolicySettings) -> Iterator[_Finding]:
    """`total` bounds every attempt and backoff wait: attempts that do not fit are cut short or never run."""
    retries = _retrying(settings)
    if retries is None:
        return
    per_try, total, attempts = settings.timeouts.per_try, settings.timeouts.total, retries.max_attempts
    backoff = _worst_backoff(retries.backoff, attempts - 1)
    needed = per_try * attempts + backoff
    if needed <= total + 1e-9:
        return
    fitting = max(
        k for k in range(1, attempts + 1) if per_try * k + _worst_backoff(retries.backoff, k - 1) <= total
    )
    late = (
        f"attempt {attempts} is cut short or never starts"
        if fitting + 1 == attempts
        else f"attempts {fitting + 1}-{attempts} are cut short or never start"
    )
    yield _Finding(
        "retries",
        f"{attempts} attempts x per_try {format_duration(per_try)} + backoff up to"
        f" {format_duration(backoff)} = {format_duration(needed)}, more than timeouts.total"
        f" ({format_duration(total)}): when attempts time out, {late};"
        " lower per_try or max_attempts, or raise total",
        (per_try, total, attempts, retries.backoff.base, retries.backoff.max),
    )


def _unsafe_methods(settings: PolicySettings) -> Iterator[_Finding]:
    """POST/PATCH are not idempotent: retried without an idempotency key, a payment can be charged twice."""
    retries = _retrying(settings)
    if retries is None:
        return
    idempotency = settings.idempotency
    keyed = idempotency.methods if idempotency is not None else ()
    unsafe = [m for m in retries.methods if m in KEYED_METHODS and m not in keyed]
    if not unsafe:
        return
    if idempotency is None:
        why, fix = "no idempotency section", "add an idempotency section (one key shared by all attempts)"
    else:
        why, fix = "not in idempotency.methods", "add them to idempotency.methods"
    yield _Finding(
        "retries.methods",
        f"{', '.join(unsafe)} would be retried without an idempotency key ({why}), so a retry can"
        f" repeat a side effect such as a duplicate charge; {fix}",
        (tuple(unsafe), idempotency is None),
    )


def _no_budget(settings: PolicySettings) -> Iterator[_Finding]:
    """Without a budget, an upstream outage multiplies its own load by max_attempts (a retry storm)."""
    retries = _retrying(settings)
    if retries is None or retries.budget is not None:
        return
    yield _Finding(
        "retries.budget",
        f"retries have no budget (budget: null): when the upstream fails, every request is tried"
        f" up to {retries.max_attempts} times, multiplying the load on it (retry storm); set a budget,"
        " e.g. {ratio: 0.2, min_per_second: 10, window: 10s}",
    )


def _inline_secrets(settings: PolicySettings) -> Iterator[_Finding]:
    """A credential typed into a config file ends up in git, ConfigMaps and backups; reference it instead."""
    for name, template in settings.headers.set.items():
        if secrets.looks_sensitive(name) and not secrets.has_reference(template):
            yield _Finding(
                f"headers.set.{name}",
                "credential-looking header value written inline; write it as ${file:PATH} or"
                " ${env:NAME} so the secret stays out of config files",
                template,
            )


def _inline_credentials(settings: PolicySettings) -> Iterator[_Finding]:
    """A client secret or API key typed into a config file is as exposed as an inline header."""
    if settings.credentials is None:
        return
    for at, template in settings.credentials.secret_templates():
        if at == ("oauth2", "client_id") or secrets.has_reference(template):
            continue  # a client id names the client; it is not the secret
        yield _Finding(
            format_path(("credentials", *at)),
            "secret written inline; write it as ${file:PATH} or ${env:NAME} so it stays out of config files",
            template,
        )


def _tunnel_blind_spots(settings: PolicySettings) -> Iterator[_Finding]:
    """A CONNECT tunnel carries bytes Outrigger cannot read (TLS from the app to the upstream)."""
    if settings.connect != "tunnel":
        return
    blind = [
        name
        for name, present in (
            ("retries", settings.retries is not None),
            ("headers", bool(settings.headers.set or settings.headers.remove)),
            ("idempotency", settings.idempotency is not None),
            ("circuit_breaker", settings.circuit_breaker is not None),
            ("rate_limit", settings.rate_limit is not None),
        )
        if present
    ]
    if blind:
        yield _Finding(
            "connect",
            f"{', '.join(blind)} cannot apply to CONNECT tunnels (their bytes are the app's own TLS);"
            " they apply only to plain http:// requests to this policy",
            tuple(blind),
        )


FALLBACK_STATUS_PATH = "fallback.status"


def _fallback_fakes_success(settings: PolicySettings) -> Iterator[_Finding]:
    """A 2xx fallback tells a POST (or PATCH) it succeeded when it never reached the upstream: the
    app records a payment or an order that does not exist. Routes that match no such method are
    exempt (see `lint`)."""
    fallback = settings.fallback
    if fallback is None or not 200 <= fallback.status <= 299:
        return
    yield _Finding(
        FALLBACK_STATUS_PATH,
        f"the fallback answers {fallback.status}, so a POST or PATCH that never"
        " reached the upstream looks successful to the app; use a non-2xx status, or declare the"
        " 2xx fallback on a route matching only safe methods (e.g. match: {method: GET})",
        fallback.status,
    )


def _failover(settings: PolicySettings) -> Iterator[_Finding]:
    """Failover upstreams' own credentials are secrets too; without breakers or retries, failover
    has little to go on."""
    failover = settings.failover
    if failover is None:
        return
    for index, upstream in enumerate(failover.upstreams):
        for name, template in upstream.headers.set.items():
            if secrets.looks_sensitive(name) and not secrets.has_reference(template):
                yield _Finding(
                    f"failover.upstreams[{index}].headers.set.{name}",
                    "credential-looking header value written inline; write it as ${file:PATH} or"
                    " ${env:NAME} so the secret stays out of config files",
                    template,
                )
    if settings.circuit_breaker is None:
        yield _Finding(
            "failover",
            "failover without a circuit_breaker section: no upstream's breaker can open, so every"
            " request tries the primary first; add circuit_breaker (each upstream gets its own)",
        )
    if _retrying(settings) is None:
        yield _Finding(
            "failover",
            "failover without retries: a failed attempt is not sent to the next upstream (only an"
            " open breaker is skipped); add retries with max_attempts of 2 or more",
        )


def _cache_shares_credentials(settings: PolicySettings) -> Iterator[_Finding]:
    """A cache not keyed by Authorization on a policy whose apps send their own: a response fetched
    with one credential could be served to a request with another. When the policy sets (or removes)
    Authorization itself (header rules or credentials), every request reaches the upstream with one of
    its credentials: no warning."""
    cache = settings.cache
    if cache is None or any(name.lower() == "authorization" for name in cache.key_headers):
        return
    names = [*settings.headers.set, *settings.headers.remove]
    if settings.credentials is not None:
        names.append(settings.credentials.header)
    if any(name.lower() == "authorization" for name in names):
        return
    yield _Finding(
        "cache.key_headers",
        "the cache is not keyed by Authorization and the policy does not set Authorization itself,"
        " so apps send their own credentials: a response fetched with one credential could be served"
        " to another (Outrigger then stores such responses only when marked public, s-maxage or"
        " must-revalidate); add Authorization to cache.key_headers",
    )


SETTINGS_RULES: Sequence[Callable[[PolicySettings], Iterator[_Finding]]] = (
    _deadline,
    _unsafe_methods,
    _no_budget,
    _inline_secrets,
    _inline_credentials,
    _tunnel_blind_spots,
    _fallback_fakes_success,
    _failover,
    _cache_shares_credentials,
)


def _settings_findings(settings: PolicySettings) -> list[_Finding]:
    return [finding for rule in SETTINGS_RULES for finding in rule(settings)]


def _covers(wildcard: str, pattern: str) -> bool:
    """Whether requests for `pattern` (an exact host or a longer wildcard) would match `wildcard`
    (on the same claimed port)."""
    (wild_name, wild_port), (name, port) = split_host_pattern(wildcard), split_host_pattern(pattern)
    suffix = wild_name[1:]  # ".example.com"
    name = name[2:] if name.startswith("*.") else name
    return port == wild_port and name.endswith(suffix) and len(name) > len(suffix)


def _shadowed_wildcards(policy: Policy, policies: Sequence[Policy]) -> Iterator[_Finding]:
    """Exact host beats wildcard and the longest suffix wins, so hosts another policy claims under a
    wildcard never get this policy's settings, which its author may not expect."""
    for index, wildcard in enumerate(policy.hosts):
        if not wildcard.startswith("*."):
            continue
        for other in policies:
            if other is policy:
                continue
            taken = [host for host in other.hosts if _covers(wildcard, host)]
            if taken:
                yield _Finding(
                    f"hosts[{index}]",
                    f"{wildcard} does not apply to {', '.join(taken)}: requests for them go to the"
                    f" policy at {other.source} (exact host beats wildcard, longest suffix wins)",
                )


def _open_proxy(config: Config) -> Iterator[_Finding]:
    """Any host plus private addresses for all of them: whoever can make the app send a URL
    (an SSRF bug, a user-supplied webhook) reaches the cluster's internals and 169.254.169.254."""
    if config.main.unknown_hosts == "allow" and config.main.defaults.allow_private_addresses:
        yield _Finding(
            "defaults.allow_private_addresses",
            "open proxy: unknown_hosts: allow with allow_private_addresses: true in defaults lets"
            " requests for any host reach loopback, private and link-local addresses (cloud metadata"
            " at 169.254.169.254 included); set allow_private_addresses on the policies that need it",
        )


def _inline_webhook_secrets(config: Config) -> Iterator[_Finding]:
    """A webhook signing secret typed into the config ends up in git and ConfigMaps like any other."""
    for at, _, template in webhook_secret_templates(config.main):
        if not secrets.has_reference(template):
            yield _Finding(
                format_path(at),
                "webhook secret written inline; write it as ${file:PATH} or ${env:NAME}"
                " so the secret stays out of config files",
            )


def _inline_fleet_password(config: Config) -> Iterator[_Finding]:
    fleet = config.main.fleet
    if fleet is not None and inline_password(fleet.redis):
        yield _Finding(
            "fleet.redis",
            "Redis password written inline; write it as ${file:PATH} or ${env:NAME}"
            " (redis://:${env:REDIS_PASSWORD}@host:6379/0) so it stays out of config files",
        )


def _main_key_line(config_path: Path, name: str) -> int:
    """Line of a top-level key (``defaults:``, ``webhooks:``) in the main config (1 if not found)."""
    try:
        node = yaml.compose(config_path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return 1
    if isinstance(node, yaml.MappingNode):
        for key, _value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == name:
                return int(key.start_mark.line) + 1
    return 1


def _safe_only(route: Route) -> bool:
    """The route matches only methods that are neither POST nor PATCH."""
    methods = route.match.method
    return methods is not None and not KEYED_METHODS.intersection(methods)


def _format(where: str, path: str, message: str) -> str:
    return f"{where}: {path}: warning: {message}"


def lint(config: Config) -> list[str]:
    """Every warning for a loaded config, defaults first, then policies in load order."""
    warnings: list[str] = []
    inherited = _settings_findings(config.main.defaults)
    where = f"{config.path}:{_main_key_line(config.path, 'defaults')}"
    warnings += [_format(where, f"defaults.{f.path}", f.message) for f in inherited]
    warnings += [_format(where, f.path, f.message) for f in _open_proxy(config)]
    at_fleet = f"{config.path}:{_main_key_line(config.path, 'fleet')}"
    warnings += [_format(at_fleet, f.path, f.message) for f in _inline_fleet_password(config)]
    webhooks = list(_inline_webhook_secrets(config))
    if webhooks:
        at = f"{config.path}:{_main_key_line(config.path, 'webhooks')}"
        warnings += [_format(at, f.path, f.message) for f in webhooks]
    for policy in config.policies:
        own = _settings_findings(policy.settings)
        findings = [f for f in own if f not in inherited]
        findings += _shadowed_wildcards(policy, config.policies)
        for index, route in enumerate(policy.routes):
            findings += [
                _Finding(f"routes[{index}].{f.path}", f.message)
                for f in _settings_findings(route.settings)
                if f not in own and not (f.path == FALLBACK_STATUS_PATH and _safe_only(route))
            ]
        warnings += [_format(policy.source, f.path, f.message) for f in findings]
    return warnings
