"""The `outrigger` command: run, check, explain, schema, deliveries."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from proxy import event_loop
from proxy.admin import build_admin_app
from proxy.config import presets
from proxy.config.lint import lint
from proxy.config.loader import Config, ConfigError, load_config
from proxy.config.model import PolicySettings, PolicyTarget
from proxy.config.units import format_duration
from proxy.deliveries_cli import DEFAULT_ADMIN_URL, deliveries_command
from proxy.delivery.store import STATES
from proxy.explain import explain
from proxy.fleet import FleetUnavailable
from proxy.reload import Reloader
from proxy.server import ProxyServer
from proxy.server.lifecycle import DrainEnd

log = logging.getLogger("outrigger")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outrigger", description="Sidecar resilience proxy")
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run", help="serve until SIGTERM/SIGINT, then drain")
    run.add_argument("-c", "--config", required=True)
    run.add_argument("--log-level", default="INFO")
    run.add_argument(
        "--loop",
        choices=event_loop.CHOICES,
        default="auto",
        help="event loop: uvloop when installed (auto, the default), or asyncio's own",
    )
    check = verbs.add_parser("check", help="validate config and policies")
    check.add_argument("-c", "--config", required=True)
    check.add_argument("--strict", action="store_true", help="exit 1 on lint warnings too (for CI)")
    exp = verbs.add_parser("explain", help="show the policy and merged settings for a request")
    exp.add_argument("-c", "--config", required=True)
    exp.add_argument("method")
    exp.add_argument("url")
    verbs.add_parser("schema", help="print the JSON Schema of a policy file")
    deliveries = verbs.add_parser("deliveries", help="inspect and retry stored deliveries (admin API)")
    deliveries.add_argument("action", choices=["list", "show", "retry"])
    deliveries.add_argument("id", nargs="?", help="the delivery id (show, retry)")
    deliveries.add_argument("--state", choices=STATES, help="list: only these")
    where = deliveries.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", help="read the admin address from this config")
    where.add_argument("--admin", help=f"admin API base URL (default {DEFAULT_ADMIN_URL})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verb == "schema":
        print(json.dumps(policy_file_schema(), indent=2))
        return 0
    if args.verb == "deliveries":
        if args.action in ("show", "retry") and not args.id:
            parser.error(f"deliveries {args.action} needs a delivery id")
        return deliveries_command(args.action, args.id, args.state, args.admin, args.config)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        print(f"{len(error.problems)} problem(s) found", file=sys.stderr)
        return 1
    if args.verb == "check":
        print(f"{config.path}: OK ({len(config.policies)} policies, version {config.version})")
        warnings = lint(config)
        for warning in warnings:
            print(warning)
        if warnings:
            print(f"{len(warnings)} warning(s)")
        return 1 if warnings and args.strict else 0
    if args.verb == "explain":
        try:
            print(explain(config, args.method, args.url), end="")
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    # Diagnostics go to stderr; the JSON access log has stdout to itself (proxy/telemetry/access_log.py).
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        event_loop.run(serve(config), args.loop)
    except FleetUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


_DRAIN_ENDS: dict[DrainEnd, str] = {
    "idle": "nothing in flight for drain_idle",
    "timeout": "drain_timeout reached",
    "signal": "second signal, stopping at once",
}


async def serve(config: Config) -> None:
    """Run the proxy and admin listeners until SIGTERM/SIGINT, then drain; a second signal stops at once.

    While draining the listeners keep serving (the app's shutdown-time calls go through), until
    nothing has been in flight for drain_idle or drain_timeout passes. SIGHUP reloads the config;
    files are also polled for changes."""
    stop = asyncio.Event()
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop_signal() -> None:
        (interrupted if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal)
    proxy = ProxyServer(config)
    reloader = Reloader(proxy)
    admin = web.AppRunner(build_admin_app(proxy, reloader), handle_signals=False, access_log=None)
    await admin.setup()
    background: set[asyncio.Task[object]] = set()

    def reload_on_signal() -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(reloader.reload("SIGHUP"))
        background.add(task)
        task.add_done_callback(background.discard)

    watcher: asyncio.Task[None] | None = None
    try:
        await web.TCPSite(admin, config.main.admin.host, config.main.admin.port, reuse_address=True).start()
        await proxy.start()
        loop.add_signal_handler(signal.SIGHUP, reload_on_signal)
        watcher = asyncio.create_task(reloader.watch())
        log.info(
            "outrigger ready (config version %s, %d policies, %s loop)",
            config.version,
            len(config.policies),
            event_loop.current(),
        )
        await stop.wait()
        log.info(
            "draining: still serving (Connection: close, /readyz 503) until nothing is in flight for %s,"
            " at most %s; a second signal stops at once",
            format_duration(config.main.drain_idle),
            format_duration(config.main.drain_timeout),
        )
        end = await proxy.drain(interrupted)
        log.info("drain over: %s", _DRAIN_ENDS[end])
    finally:
        for task in [*background, *([watcher] if watcher else [])]:
            task.cancel()
        await proxy.stop(interrupted)
        with contextlib.suppress(Exception):
            await admin.cleanup()
    log.info("stopped")


def policy_file_schema() -> dict[str, object]:
    """JSON Schema of a policy file: one policy or a list of them."""

    class PolicyFile(PolicyTarget, PolicySettings):
        pass

    policy = PolicyFile.model_json_schema()
    policy["properties"][presets.PRESET_KEY] = {
        "description": "a provider preset this policy is built on; its own keys win",
        "enum": list(presets.names()),
    }
    definitions = policy.pop("$defs", {})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Outrigger policy file",
        "$defs": {**definitions, "Policy": policy},
        "anyOf": [
            {"$ref": "#/$defs/Policy"},
            {"type": "array", "items": {"$ref": "#/$defs/Policy"}},
        ],
    }
