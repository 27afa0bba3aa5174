"""Safe hot reload (SPEC 6): watch, validate fully, swap atomically, carry state over.

Triggers: content-hash polling of every file the config depends on (which
sees Kubernetes ConfigMap symlink swaps and rotated ``${file:...}`` secrets),
SIGHUP, and ``POST /reload``. An invalid config never replaces a working one:
the error is kept for ``/config``, logged, and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from proxy.config.loader import Config, ConfigError, current_fingerprint, load_config
from proxy.server import ProxyServer, Runtime, ShuttingDown

log = logging.getLogger("outrigger.reload")

RESTART_ONLY = ("listen", "admin", "limits", "drain_timeout", "drain_idle", "telemetry", "data_dir", "fleet")
"""Main-config keys bound to sockets, the HTTP parser or the exporter or the store at start-up."""
WEBHOOKS_LISTEN = "webhooks.listen"
"""Restart-only too (the webhook listener's socket); the rest of ``webhooks`` reloads."""


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    version: str
    error: str | None
    at: float
    trigger: str
    unexpected: bool = False
    """The reload failed on a bug, not on the config: the admin API answers 500, not 422."""

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "version": self.version,
            "error": self.error,
            "at": self.at,
            "trigger": self.trigger,
        }


class Reloader:
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.last: ReloadResult | None = None
        self._lock = asyncio.Lock()
        self._applied = asyncio.Event()
        """Set after each applied reload, so the watcher picks up a new poll interval at once."""

    async def reload(self, trigger: str) -> ReloadResult:
        """Load, validate and apply; on any problem the running config stays and the error is kept."""
        async with self._lock:
            current = self.server.runtime.config
            if self.server.draining:
                self.last = ReloadResult(False, current.version, "shutting down", time.time(), trigger)
                return self.last
            try:
                config, runtime = await asyncio.to_thread(self._prepare, current)
                if runtime is not None:
                    await self.server.apply(config, runtime)
            except (ConfigError, OSError, ValueError, ShuttingDown) as error:  # ValueError: a secret gone
                return self._reject(trigger, current, str(error))
            except Exception as error:  # a bug: the running config must outlive it
                log.exception("config reload (%s) failed unexpectedly", trigger)
                return self._reject(trigger, current, f"unexpected {type(error).__name__}: {error}", True)
            self.last = ReloadResult(True, config.version, None, time.time(), trigger)
            self._applied.set()
            self.server.telemetry.metrics.reloads.labels("success").inc()
            if config.version != current.version:
                log.info("config reloaded (%s): version %s -> %s", trigger, current.version, config.version)
            return self.last

    def _prepare(self, current: Config) -> tuple[Config, Runtime | None]:
        """Everything that reads files — config, policies, ``${file:}`` secrets — runs here, in a
        thread; the runtime is None when nothing changed."""
        config = load_config(current.path)
        _check_restart_only(current, config)
        if config.version == current.version:
            return config, None
        return config, self.server.build_runtime(config)

    def _reject(self, trigger: str, current: Config, message: str, unexpected: bool = False) -> ReloadResult:
        self.last = ReloadResult(False, current.version, message, time.time(), trigger, unexpected)
        self.server.telemetry.metrics.reloads.labels("error").inc()
        log.error(
            "config reload (%s) rejected; still serving version %s:\n%s", trigger, current.version, message
        )
        return self.last

    async def watch(self) -> None:
        """Poll file contents every `reload_poll_interval` (as currently configured); reload once per
        distinct change (a rejected change is not retried until the files change again)."""
        seen = self.server.runtime.config.version
        while True:
            config = self.server.runtime.config
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(config.main.reload_poll_interval):
                    await self._applied.wait()
            self._applied.clear()
            config = self.server.runtime.config
            try:
                fingerprint = await asyncio.to_thread(current_fingerprint, config)
            except OSError as error:
                log.warning("cannot read config files: %s", error)
                continue
            if fingerprint not in (seen, self.server.runtime.config.version):
                seen = fingerprint
                await self.reload("file change")  # never raises: a failure is logged and kept


def _check_restart_only(current: Config, new: Config) -> None:
    changed = [key for key in RESTART_ONLY if getattr(current.main, key) != getattr(new.main, key)]
    if _webhooks_listen(current) != _webhooks_listen(new):
        changed.append(WEBHOOKS_LISTEN)
    if changed:
        raise ConfigError(
            [f"{new.path}: {', '.join(changed)} changed: restart Outrigger to apply (not reloadable)"]
        )


def _webhooks_listen(config: Config) -> object:
    """The webhook listener's address; None without a ``webhooks`` section (adding or removing the
    section opens or closes a listener, so it is a restart too)."""
    return config.main.webhooks.listen if config.main.webhooks is not None else None
