"""Which policy (and route) applies to a request.

Exact host beats wildcard; among wildcards the longest suffix wins; a
dedicated ``listen`` port names its policy directly. Built once per config.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from proxy.config.loader import Config
from proxy.config.model import (
    DEFAULT_PORTS,
    Policy,
    PolicySettings,
    RouteMatch,
    UpstreamTarget,
    split_host_pattern,
)

UNKNOWN_POLICY_NAME = "(unknown)"
"""Policy label for hosts admitted by ``unknown_hosts: allow``."""


@dataclass(frozen=True)
class HostMatch:
    policy: Policy
    pattern: str | None
    """The host pattern that claimed the host (exact name or ``*.suffix``); None for the
    ``unknown_hosts: allow`` fallback."""


@dataclass(frozen=True)
class Match:
    policy: Policy
    settings: PolicySettings
    route: int | None
    """Index of the matched route, or None when the policy's own settings apply."""


def _route_matches(match: RouteMatch, method: str, path: str) -> bool:
    if match.method is not None and method not in match.method:
        return False
    return match.path is None or fnmatchcase(path, match.path)


def claim_key(name: str, port: int | None) -> tuple[str, int | None]:
    """What a request for `name`:`port` looks up: default ports share the bare name's claim."""
    return name, None if port in DEFAULT_PORTS else port


class Router:
    def __init__(self, config: Config) -> None:
        self._exact: dict[tuple[str, int | None], Policy] = {}
        self._wildcards: dict[tuple[str, int | None], Policy] = {}
        """``.example.com`` (with its claimed port) -> policy: found by walking a name's suffixes,
        longest first, so lookup cost depends on the name's labels, not on the number of policies."""
        self._by_port: dict[int, Policy] = {}
        self._plain: dict[str, Match] = {}
        """Per route-less policy, its one Match (built once, not per request)."""
        for policy in config.policies:
            for pattern in policy.hosts:
                name, port = split_host_pattern(pattern)
                if name.startswith("*."):
                    self._wildcards[(name[1:], port)] = policy
                else:
                    self._exact[(name, port)] = policy
            if policy.listen is not None:
                self._by_port[policy.listen] = policy
        self._fallback = (
            Policy(
                hosts=(UNKNOWN_POLICY_NAME,),
                upstream=None,
                listen=None,
                settings=config.main.defaults,
                routes=(),
                source=f"{config.path} (defaults, unknown_hosts: allow)",
            )
            if config.main.unknown_hosts == "allow"
            else None
        )

    @property
    def fallback(self) -> Policy | None:
        """The policy for hosts no policy claims, when ``unknown_hosts: allow``."""
        return self._fallback

    @property
    def ports(self) -> dict[int, Policy]:
        return dict(self._by_port)

    def policy_for_host(self, host: str, port: int | None = None) -> Policy | None:
        match = self.match_host(host, port)
        return None if match is None else match.policy

    def match_host(self, host: str, port: int | None = None) -> HostMatch | None:
        """The policy for `host`:`port` and the pattern that chose it, so `explain` reports the
        same decision the server makes. Case and a trailing dot are ignored; a pattern without a
        port claims only the default ports."""
        name, claimed = claim_key(host.lower().rstrip("."), port)
        suffix = "" if claimed is None else f":{claimed}"
        policy = self._exact.get((name, claimed))
        if policy is not None:
            return HostMatch(policy, (f"[{name}]" if ":" in name and suffix else name) + suffix)
        dot = name.find(".")
        while dot != -1:
            policy = self._wildcards.get((name[dot:], claimed))
            if policy is not None:
                return HostMatch(policy, f"*{name[dot:]}{suffix}")
            dot = name.find(".", dot + 1)
        return None if self._fallback is None else HostMatch(self._fallback, None)

    def policy_for_port(self, port: int) -> Policy | None:
        return self._by_port.get(port)

    def route_for(self, policy: Policy, method: str, path: str) -> Match:
        """`resolve_route`, with the one Match of a route-less policy built once, not per request."""
        if policy.routes:
            return self.resolve_route(policy, method, path)
        plain = self._plain.get(policy.name)
        if plain is None or plain.policy is not policy:
            plain = self._plain[policy.name] = Match(policy, policy.settings, None)
        return plain

    @staticmethod
    def resolve_route(policy: Policy, method: str, path: str) -> Match:
        """First route whose method and path glob match (path without the query)."""
        for index, route in enumerate(policy.routes):
            if _route_matches(route.match, method, path):
                return Match(policy, route.settings, index)
        return Match(policy, policy.settings, None)


def upstream_for(policy: Policy, host: str, port: int | None) -> UpstreamTarget:
    """The policy's upstream, else https to the requested host (a requested port other than 80 is kept)."""
    if policy.upstream is not None:
        return policy.upstream
    return UpstreamTarget(scheme="https", host=host, port=port if port not in (None, 80) else 443)


def dedicated_upstream(policy: Policy) -> UpstreamTarget:
    """Where a request arriving on the policy's own ``listen`` port goes: its upstream, else https
    to its first host (the loader requires that host to be exact). Shared by the server and explain."""
    name, port = policy.first_host
    return upstream_for(policy, name, port)
