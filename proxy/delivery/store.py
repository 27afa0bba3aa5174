"""The durable delivery store: one small interface, so a fleet backend can follow the SQLite one.

A delivery is a stored request plus its bookkeeping. Its life::

    enqueue -> pending --claim--> (attempt) --record--> pending (again later) | done | dead
                                                          dead --retry--> pending

Two kinds of source share it: ``policy`` (a fire-and-forget request, delivered through the
policy's pipeline; source = the policy name) and ``webhook`` (an inbound event forwarded to the
app; source = the route path). A webhook enqueues with a dedupe key (its event id): within the
dedupe window a redelivery of the same (source, key) gets the existing delivery's id back and
nothing new is stored.

Every write is committed before the call returns: a caller may acknowledge (202/200) only then.
A write the store cannot commit raises `errors.StoreUnavailable` and leaves nothing behind.
Times are wall-clock seconds (they must mean the same after a restart).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

State = Literal["pending", "done", "dead"]
STATES: tuple[State, ...] = ("pending", "done", "dead")
Kind = Literal["policy", "webhook"]


@dataclass(frozen=True)
class NewDelivery:
    """What a source hands the store: the request to replay and how long it may take."""

    kind: Kind
    source: str
    """The policy name, or the webhook route: the ``source`` label of the delivery metrics."""
    method: str
    host: str
    """The requested host (policy), or the host of the forward URL (webhook): for logs and views."""
    path_qs: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    expires_at: float
    """Wall time after which it goes dead (created + ttl, as configured when it was accepted)."""
    target: str = ""
    """Where it goes: for a webhook the forward URL; for a policy the upstream the request resolved
    to (``https://host:port``), used when the policy names no upstream of its own at delivery time."""
    traceparent: str | None = None
    """The accepting request's trace context, for the span link of every attempt."""
    dedupe_key: str | None = None
    dedupe_window: float = 0.0
    """Seconds a (source, dedupe_key) pair stays known (webhook ``dedupe``)."""


@dataclass(frozen=True)
class Delivery:
    """A stored delivery as the worker and the admin API see it."""

    id: str
    kind: Kind
    source: str
    state: State
    method: str
    host: str
    path_qs: str
    target: str
    traceparent: str | None
    created_at: float
    expires_at: float
    next_attempt_at: float
    attempts: int
    last_status: int | None
    last_error: str | None
    last_attempt_at: float | None
    finished_at: float | None
    headers: tuple[tuple[str, str], ...] = ()
    """Only filled by `claim` (the worker sends them); never shown by the admin API."""
    body: bytes = b""
    """Only filled by `claim`."""

    def view(self, redact_path: Callable[[str], str] | None = None) -> dict[str, Any]:
        """What the admin API shows: status, attempts, last outcome and timestamps; never the body,
        the headers or their values. `redact_path` hides secrets the policy's redact_paths names."""
        path = self.path_qs.partition("?")[0]
        return {
            "id": self.id,
            "kind": self.kind,
            "source": self.source,
            "state": self.state,
            "method": self.method,
            "host": self.host,
            "path": redact_path(path) if redact_path is not None else path,
            "attempts": self.attempts,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "created_at": self.created_at,
            "next_attempt_at": self.next_attempt_at if self.state == "pending" else None,
            "last_attempt_at": self.last_attempt_at,
            "finished_at": self.finished_at,
            "expires_at": self.expires_at,
        }


@dataclass(frozen=True)
class Enqueued:
    id: str
    duplicate: bool
    """A redelivery within the dedupe window: `id` is the delivery stored the first time."""


@dataclass(frozen=True)
class Outcome:
    """One attempt's result as the worker decided it."""

    state: State
    at: float
    status: int | None = None
    error: str | None = None
    next_attempt_at: float | None = None
    """For ``pending``: when to try again."""
    counted: bool = True
    """False when nothing was attempted (the policy is not configured right now)."""


class DeliveryStore(Protocol):
    async def open(self) -> None:
        """Connect, create or migrate the schema, release leases of a previous run. Raises
        StoreUnavailable; a store that failed to open tries again on each later call."""

    async def enqueue(self, delivery: NewDelivery, now: float) -> Enqueued: ...

    async def claim(self, now: float, limit: int, lease: float) -> Sequence[Delivery]:
        """Pending deliveries due by `now`, at most `limit`, oldest due first, leased for `lease`
        seconds (a claim that is never recorded, e.g. after kill -9, is due again when the lease
        ends; a restart releases every lease at once)."""

    async def record(self, delivery_id: str, outcome: Outcome) -> None:
        """Store an attempt's outcome and release the claim."""

    async def next_due(self) -> float | None:
        """When the earliest unclaimed pending delivery is due (None: nothing pending)."""

    async def get(self, delivery_id: str) -> Delivery | None: ...

    async def list(self, state: State | None, limit: int) -> Sequence[Delivery]:
        """Newest first."""

    async def retry(self, delivery_id: str, now: float) -> Delivery | None:
        """A dead delivery becomes pending again, due now, with a fresh attempt count and ttl;
        None when there is no such dead delivery."""

    async def delete(self, delivery_id: str) -> bool: ...

    async def counts(self) -> dict[tuple[str, State], int]:
        """Deliveries by (source, state)."""

    def size_bytes(self) -> int:
        """The store's size on disk (cheap: read at every metrics scrape)."""

    async def purge(self, now: float) -> int:
        """Forget expired dedupe keys and done deliveries past their retention; returns rows removed."""

    async def close(self) -> None: ...
