"""Which policy (and route) applies to a request.

Exact host beats wildcard; among wildcards the longest suffix wins; a
dedicated ``listen`` port names its policy directly. Built once per config.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from proxy.config.loader import Config
from proxy.config.model import Policy, PolicySettings, RouteMatch, UpstreamTarget

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


class Router:
    def __init__(self, config: Config) -> None:
        self._exact: dict[str, Policy] = {}
        wildcards: list[tuple[str, Policy]] = []
        self._by_port: dict[int, Policy] = {}
        for policy in config.policies:
            for pattern in policy.hosts:
                if pattern.startswith("*."):
                    wildcards.append((pattern[1:], policy))
                else:
                    self._exact[pattern] = policy
            if policy.listen is not None:
                self._by_port[policy.listen] = policy
        self._wildcards = sorted(wildcards, key=lambda item: len(item[0]), reverse=True)
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

    def policy_for_host(self, host: str) -> Policy | None:
        match = self.match_host(host)
        return None if match is None else match.policy

    def match_host(self, host: str) -> HostMatch | None:
        """The policy for `host` and the pattern that chose it, so `explain` reports the same
        decision the server makes. Case and a trailing dot are ignored."""
        name = host.lower().rstrip(".")
        policy = self._exact.get(name)
        if policy is not None:
            return HostMatch(policy, name)
        for suffix, candidate in self._wildcards:
            if name.endswith(suffix) and len(name) > len(suffix):
                return HostMatch(candidate, f"*{suffix}")
        return None if self._fallback is None else HostMatch(self._fallback, None)

    def policy_for_port(self, port: int) -> Policy | None:
        return self._by_port.get(port)

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
    return upstream_for(policy, policy.name, None)
