"""Redis for fleet-scoped state (SPEC 12): one client, one health flag, failing open.

Every call is bounded by ``fleet.timeout``. The first call that fails or is late marks Redis
down (logged once, ``outrigger_fleet_backend_up 0``) and answers None, so its caller goes on
with local state; from then on calls answer None at once (a dead Redis costs the request path
nothing) while one probe pings Redis every `FLEET_PROBE_INTERVAL_S`; its first answer marks
Redis up again and fleet state is shared once more.

redis-py's asyncio client is imported here only, so the default (local) mode runs without the
``redis`` package (``pip install 'outrigger[fleet]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol

from yarl import URL

from proxy import secrets
from proxy.config import defaults
from proxy.config.model import Fleet
from proxy.fleet import scripts

log = logging.getLogger("outrigger.fleet")

_CLOSE_GRACE_S = 1.0
"""On shutdown, how long reports still on their way to Redis get to land."""


class Script(Protocol):
    async def __call__(self, keys: Sequence[str], args: Sequence[int]) -> Any: ...


class FleetUnavailable(RuntimeError):
    """Fleet mode is configured but cannot start (the redis package is missing, a secret is gone)."""


_MASK = "****"


def _inline(value: str | None, references: dict[str, str]) -> bool:
    return bool(value) and value not in references


def inline_password(url: str) -> bool:
    """The Redis URL (as written) carries a password, in its userinfo or its query, that is not
    a ``${file:}``/``${env:}`` reference."""
    return redacted(url) != url


def redacted(url: str) -> str:
    """The Redis URL as written, for logs and /config: references as written, an inline password
    shown as ``****``."""
    text, references = secrets.masked_references(url)
    parsed = URL(text)
    in_userinfo = _inline(parsed.password, references)
    in_query = _inline(parsed.query.get("password"), references)
    if not (in_userinfo or in_query):
        return url
    if in_userinfo:
        parsed = parsed.with_password(_MASK)
    if in_query:
        parsed = parsed.update_query(password=_MASK)
    shown = str(parsed)
    for word, reference in references.items():
        shown = shown.replace(word, reference)
    return shown


class FleetBackend:
    def __init__(
        self,
        settings: Fleet,
        base_dir: Path = Path("."),
        probe_interval: float = defaults.FLEET_PROBE_INTERVAL_S,
    ) -> None:
        """`base_dir` resolves a relative ``${file:}`` in the URL (the main config's folder)."""
        try:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError as error:
            raise FleetUnavailable(
                "the main config has a fleet section but the redis package is not installed:"
                " pip install 'outrigger[fleet]'"
            ) from error
        try:
            url = secrets.render(settings.redis, base_dir)
        except secrets.SecretError as error:
            raise FleetUnavailable(f"fleet.redis: {error}") from error
        self.settings = settings
        self._redis = Redis.from_url(
            url,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            retry=Retry(NoBackoff(), 0),  # a slow or dead Redis is a fallback to local state, not a retry
            health_check_interval=0,
        )
        self._probe_interval = probe_interval
        self._probe_script = self.script(scripts.PROBE)
        self._probe_key = f"{settings.key_prefix}:probe"
        self.up = True
        """Until `start`'s first ping, or the first call, says otherwise."""
        self._probe: asyncio.Task[None] | None = None
        self._reports: set[asyncio.Task[Any]] = set()
        self._closed = False

    def start(self) -> None:
        """Ask Redis once, in the background: a Redis unreachable from the start shows as down at
        once (gauge, /state), not only at the first fleet-scoped request."""
        self.report(self._first_ping())

    async def _first_ping(self) -> None:
        error = await self._ping()
        if error is not None:
            self._mark_down(error)

    async def _ping(self) -> Exception | None:
        """None when Redis took a write within the timeout, else what went wrong. A write, not a
        PING: a Redis out of memory or a read-only replica answers PING but fails every script."""
        try:
            async with asyncio.timeout(self.settings.timeout):
                await self._probe_script(keys=(self._probe_key,), args=())
        except asyncio.CancelledError:
            raise
        except Exception as error:  # whatever it is, Redis is not answering
            return error
        return None

    def key(self, kind: str, name: str) -> str:
        """One key per policy and kind; the braces keep a policy's keys in one Redis Cluster slot
        (a script may only touch keys of one slot)."""
        return f"{self.settings.key_prefix}:{{{name}}}:{kind}"

    def script(self, source: str) -> Script:
        """A Lua script run with EVALSHA (loaded again by redis-py when Redis has forgotten it)."""
        script: Script = self._redis.register_script(source)
        return script

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[int]) -> Any | None:
        """The script's answer, or None when Redis is down, fails or is slower than the timeout."""
        if not self.up:
            return None
        try:
            async with asyncio.timeout(self.settings.timeout):
                return await script(keys=keys, args=args)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # whatever Redis did, the request goes on locally
            self._mark_down(error)
            return None

    def report(self, call: Coroutine[Any, Any, Any]) -> None:
        """Run `call` (a `run` whose answer nobody waits for) without holding up the request."""
        if self._closed:
            call.close()
            return
        task = asyncio.get_running_loop().create_task(call)
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    def _mark_down(self, error: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        reason = str(error) or type(error).__name__
        log.error(
            "fleet Redis %s is unreachable (%s): each sidecar goes on with its local state",
            redacted(self.settings.redis),
            reason,
        )
        if not self._closed:
            self._probe = asyncio.get_running_loop().create_task(self._wait_for_redis())

    async def _wait_for_redis(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._probe_interval)
            # the pooled connections lead to the Redis that went away (a restarted one has
            # closed them): without this, the first script after the rejoin would fail again
            with contextlib.suppress(Exception):  # closing a dead connection may time out
                await self._redis.connection_pool.disconnect()
            if await self._ping() is not None:
                continue  # still down: the next probe asks again
            self.up = True
            log.warning(
                "fleet Redis %s answers again: fleet state is shared again", redacted(self.settings.redis)
            )
            return

    async def close(self) -> None:
        self._closed = True
        if self._reports:
            await asyncio.wait(set(self._reports), timeout=_CLOSE_GRACE_S)
        for task in (*self._reports, self._probe):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._redis.aclose()
