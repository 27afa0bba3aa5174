"""Idle upstream connections, keyed so that a connection is reused only where it is valid.

The key is (checked address, port, TLS context, SNI name): two host names
on one IP never share a TLS connection, and a rotated certificate (a new
context) never inherits an old connection. The most recently used
connection is handed out first, so the cold ones reach `keepalive` and are
closed by one periodic sweep. A connection the upstream closed while idle
leaves the pool at once (`connection_lost`), so it is never handed out.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from proxy.transport.connection import UpstreamConnection


class PoolKey(NamedTuple):
    address: str
    port: int
    tls: ssl.SSLContext | None
    server_name: str | None


class ConnectionPool:
    def __init__(self, max_per_key: int, keepalive: float) -> None:
        self._max_per_key = max_per_key
        self._keepalive = keepalive
        self._idle: dict[PoolKey, list[UpstreamConnection]] = {}
        self._open: collections.Counter[PoolKey] = collections.Counter()
        self._keys: dict[UpstreamConnection, PoolKey] = {}
        self._waiters: dict[PoolKey, collections.deque[asyncio.Future[None]]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def idle(self, key: PoolKey) -> UpstreamConnection | None:
        """A pooled connection for `key` that is still open, or None."""
        connections = self._idle.get(key)
        while connections:
            connection = connections.pop()
            if connection.open:
                return connection
        return None

    async def connect(
        self, key: PoolKey, open_connection: Callable[[], Awaitable[UpstreamConnection]]
    ) -> UpstreamConnection:
        """An idle connection, else a new one; waits (FIFO) while `key` is at its cap.

        The caller bounds the wait (the connect timeout)."""
        while True:
            connection = self.idle(key)
            if connection is not None:
                return connection
            if self._open[key] < self._max_per_key:
                break
            waiter = asyncio.get_running_loop().create_future()
            queue = self._waiters.setdefault(key, collections.deque())
            queue.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake(key)  # it was handed a turn just as it gave up: pass the turn on
                raise
            finally:
                if waiter in queue:
                    queue.remove(waiter)
        self._open[key] += 1
        try:
            connection = await open_connection()
        except BaseException:
            self._gone(key)
            raise
        self._keys[connection] = key
        return connection

    def give_back(self, connection: UpstreamConnection) -> None:
        """After an exchange: pooled when reusable, closed otherwise."""
        key = self._keys.get(connection)
        if key is None:
            return
        if not connection.reusable:
            connection.abort()  # connection_lost -> closed() frees its place
            return
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(key, []).append(connection)
        self._wake(key)
        if self._sweeper is None:
            self._schedule_sweep()

    def closed(self, connection: UpstreamConnection) -> None:
        """The connection's transport is gone (either side closed it)."""
        key = self._keys.pop(connection, None)
        if key is None:
            return
        idle = self._idle.get(key)
        if idle and connection in idle:
            idle.remove(connection)
        self._gone(key)

    def close_all(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self._keys):
            connection.abort()

    @property
    def open_connections(self) -> int:
        return sum(self._open.values())

    def _gone(self, key: PoolKey) -> None:
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]
        self._wake(key)

    def _wake(self, key: PoolKey) -> None:
        queue = self._waiters.get(key)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(max(self._keepalive / 4, 0.05), self._sweep)

    def _sweep(self) -> None:
        """Close connections idle longer than `keepalive`; reschedule while any stay idle."""
        self._sweeper = None
        cutoff = asyncio.get_running_loop().time() - self._keepalive
        for key, connections in list(self._idle.items()):
            stale = [c for c in connections if c.idle_since <= cutoff]
            for connection in stale:
                connections.remove(connection)
                connection.abort()
            if not connections:
                del self._idle[key]
        if self._idle:
            self._schedule_sweep()
