"""The ``policy`` source: a stored fire-and-forget request replayed through its policy's pipeline.

The policy is looked up by name in the config running at delivery time, so a hot reload's new
settings (upstream, credentials, limits, delivery backoff) apply to deliveries already stored.
A delivery whose policy is not in the current config waits (see worker.py) until it comes back
or the delivery's ttl ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from multidict import CIMultiDict
from opentelemetry.context import Context
from yarl import URL

from proxy import errors
from proxy.config.defaults import DELIVERY_RETRY_ON
from proxy.config.model import Delivery as DeliverySettings
from proxy.config.model import OutcomeSet, UpstreamTarget
from proxy.delivery.store import Delivery
from proxy.delivery.worker import Attempt, settle
from proxy.exchange import ProxyRequest, RequestBody
from proxy.provider_headers import retry_after_seconds
from proxy.telemetry import REQUEST_ID_HEADER, Telemetry

if TYPE_CHECKING:
    from proxy.server.runtime import Runtime


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


class PolicyDispatcher:
    def __init__(
        self, runtime: Callable[[], Runtime], telemetry: Telemetry, wall: Callable[[], float]
    ) -> None:
        self._runtime = runtime
        self._telemetry = telemetry
        self._wall = wall

    def settings(self, delivery: Delivery) -> DeliverySettings | str:
        runtime = self._runtime()
        policy = runtime.pipelines.policies.get(delivery.source)
        if policy is None:
            return (
                f"policy {delivery.source} is not in the current config (version {runtime.config.version});"
                " waiting for it until the delivery's ttl ends"
            )
        return policy.settings.delivery or DeliverySettings()  # delivery turned off: still deliver

    async def send(self, delivery: Delivery, context: Context, traced: bool) -> Attempt:
        runtime = self._runtime()
        policy = runtime.pipelines.policies[delivery.source]
        match = runtime.router.route_for(policy, delivery.method, delivery.path_qs.partition("?")[0])
        headers = CIMultiDict(delivery.headers)
        request = ProxyRequest(
            method=delivery.method,
            host=delivery.host,
            target=policy.upstream or UpstreamTarget.of_url(URL(delivery.target)),
            path_qs=delivery.path_qs,
            headers=headers,
            body=RequestBody(_once(delivery.body) if delivery.body else None, len(delivery.body)),
            policy=policy,
            settings=match.settings,
            request_id=headers.get(REQUEST_ID_HEADER, delivery.id),
            trace_context=context,
            traced=traced,
            delivery_id=delivery.id,
        )
        retry_on = OutcomeSet(match.settings.retries.on if match.settings.retries else DELIVERY_RETRY_ON)
        try:
            try:
                response = await runtime.pipelines.handler(match)(request)
            except errors.OutriggerError as error:
                return _failed(error, retry_on)
            await settle(response)
            retry_after = retry_after_seconds(response.headers.get("Retry-After"), self._wall())
            return Attempt(response.status, None, response.status in retry_on.statuses, retry_after)
        finally:
            self._telemetry.record_replayed(request, runtime.pipelines.states.get(policy.name))


def _failed(error: errors.OutriggerError, retry_on: OutcomeSet) -> Attempt:
    """An error instead of an answer: retried when it is one of the retry conditions, a local
    refusal (breaker, limiter, bulkhead: transient by nature), or its status is in them."""
    if error.condition is not None:
        retryable = error.condition in retry_on.errors
    else:
        retryable = isinstance(error, errors.Rejected) or error.status in retry_on.statuses
    return Attempt(error.status, error.condition or error.error_type, retryable, error.retry_after)
