"""Failover: each attempt goes to the first upstream whose breaker admits it (SPEC 9).

The upstreams are the primary (the request's own target: ``upstream``, or the
requested host) followed by ``failover.upstreams`` in order; each has its own
circuit breaker (when the policy has a ``circuit_breaker`` section), kept in
`PolicyState`. This layer sits between retry and the rate limiter and takes the
breaker layer's place: it owns the choice of upstream, so it also asks that
upstream's breaker.

For each attempt, starting from the upstream of the previous attempt (or the
next one, when that attempt failed with a condition in ``failover.on``), the
upstreams are tried in order, wrapping around:

- with ``circuit_open`` in ``on`` (the default), an upstream whose breaker
  refuses (open, or half-open with its trials in flight) is skipped without
  spending an attempt; when every breaker refuses, the soonest ``CircuitOpen``
  is raised (retries stop: the retry layer asks `all_open`);
- the chosen upstream becomes ``request.target``; its own header rules (secrets
  rendered once here) replace the policy's, applied by the attempt layer on
  the headers as they were before the first attempt, so the primary's
  credentials never reach another upstream. The idempotency key was added
  above retry, so every upstream gets the same one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy import errors
from proxy.config.model import CIRCUIT_OPEN, OutcomeSet, PolicySettings, UpstreamTarget
from proxy.exchange import FailoverState, Handler, HeaderEdits, ProxyRequest, ProxyResponse
from proxy.layers.attempt import render_rules
from proxy.layers.breaker import Admission, CircuitBreaker, guarded


@dataclass(frozen=True)
class _Upstream:
    target: UpstreamTarget | None
    """None for the primary: the request's own target."""
    breaker: CircuitBreaker | None
    edits: HeaderEdits | None
    """None for the primary: the attempt layer's own (policy or route) rules."""
    settings: PolicySettings | None
    """The settings with this upstream's ``tls``; None: the request's own."""


class FailoverLayer:
    def __init__(
        self,
        settings: PolicySettings,
        primary_breaker: CircuitBreaker | None,
        breakers: Mapping[str, CircuitBreaker],
        base_dir: Path,
    ) -> None:
        failover = settings.failover
        assert failover is not None
        upstreams = [_Upstream(None, primary_breaker, None, None)]
        for upstream in failover.upstreams:
            tls = upstream.tls
            upstreams.append(
                _Upstream(
                    upstream.url,
                    breakers.get(str(upstream.url)),
                    render_rules(upstream.headers, base_dir),
                    settings.model_copy(update={"tls": tls}) if tls is not None else None,
                )
            )
        self.upstreams: Sequence[_Upstream] = tuple(upstreams)
        outcomes = OutcomeSet(tuple(c for c in failover.on if c != CIRCUIT_OPEN))
        self.statuses = outcomes.statuses
        self.errors = outcomes.errors
        self.skip_refused = CIRCUIT_OPEN in failover.on

    def all_open(self) -> bool:
        """Every upstream's breaker is open: no retry can help (the retry layer stops)."""
        return all(u.breaker is not None and u.breaker.is_open() for u in self.upstreams)

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        state = request.failover
        if state is None:
            state = request.failover = FailoverState(request.target, request.settings, request.headers.copy())
        else:
            request.headers = state.headers.copy()  # the previous attempt's header rules are undone
        count = len(self.upstreams)
        start = (state.index + 1) % count if state.move_on else state.index
        refusals: list[errors.CircuitOpen] = []
        for step in range(count):
            index = (start + step) % count
            upstream = self.upstreams[index]
            admission: Admission | None = None
            if upstream.breaker is not None:
                try:
                    admission = await upstream.breaker.admit_async()
                except errors.CircuitOpen as refusal:
                    if not self.skip_refused:
                        raise
                    refusals.append(refusal)
                    continue
            return await self._attempt(request, next, state, index, upstream, admission)
        waits = [r.retry_after for r in refusals if r.retry_after is not None]
        raise errors.CircuitOpen(
            f"the circuit breakers of all {count} upstreams are open", retry_after=min(waits, default=None)
        )

    async def _attempt(
        self,
        request: ProxyRequest,
        next: Handler,
        state: FailoverState,
        index: int,
        upstream: _Upstream,
        admission: Admission | None,
    ) -> ProxyResponse:
        """One attempt to `upstream` (its breaker, if any, has admitted it: `admission`)."""
        request.target = upstream.target or state.primary
        request.settings = upstream.settings or state.settings
        state.edits = upstream.edits
        if index != state.index:
            state.moves.append(str(request.target))
        state.index, state.move_on = index, False
        try:
            if upstream.breaker is not None and admission is not None:
                response = await guarded(upstream.breaker, admission, request, next)
            else:
                response = await next(request)
        except errors.OutriggerError as error:
            state.move_on = error.condition in self.errors
            raise
        state.move_on = response.status in self.statuses
        return response
