"""Safe hot reload end to end (SPEC 6): triggers, validation, load, state carry-over, ports, secrets.

Every test runs a real Outrigger (in process, or `outrigger run` as a subprocess for SIGHUP)
and real loopback upstreams. Policy edits are written atomically (temp file + rename), the
way a careful operator or Kubernetes would, so the content-hash watcher never sees half a file.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from proxy import secrets
from proxy.admin import build_admin_app
from proxy.config.loader import load_config
from proxy.reload import Reloader
from proxy.server import ProxyServer
from tests.conftest import Launch, StartProxy, free_port, loopback_policy, write_ca_file_config, write_config
from tests.e2e.procs import OutriggerProcess, config_ports, port_refuses, wait_until
from tests.fakes import CALL_TIMEOUT, Gate, ScriptedUpstream, app_get

HOST = "upstream.test"
HOLD_LIMIT = 10.0
"""Longest an upstream handler is held, so a hang fails the test instead of stalling it."""
POLL = "100ms"
WITHIN = 5.0
"""Upper bound for any wait on a reload to become visible."""


# --------------------------------------------------------------------------- helpers


def write_atomically(path: Path, text: str | bytes) -> None:
    """Replace `path` in one rename (the temp name is a dot-file, which the loader skips)."""
    temp = path.with_name(f".{path.name}.tmp")
    if isinstance(text, bytes):
        temp.write_bytes(text)
    else:
        temp.write_text(text)
    os.replace(temp, path)


def make_config(directory: Path, policies: list[dict[str, Any]], **main: Any) -> Path:
    """`write_config` with a 100 ms `reload_poll_interval`, so a watcher notices edits quickly."""
    return write_config(directory, policies, **{"reload_poll_interval": POLL, **main})


def write_policies(config_dir: Path, policies: list[dict[str, Any]]) -> None:
    write_atomically(config_dir / "policies" / "test.yaml", yaml.safe_dump(policies))


def edit_main(config_path: Path, **changes: Any) -> None:
    settings = yaml.safe_load(config_path.read_text())
    settings.update(changes)
    write_atomically(config_path, yaml.safe_dump(settings))


@dataclass
class Upstream:
    """Records the headers of every request; /hold/... waits for `gate`; answers `status` + `headers`."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def hits(self) -> int:
        return len(self.seen)

    def values(self, header: str, prefix: str = "/") -> list[str | None]:
        return [headers.get(header.lower()) for path, headers in self.seen if path.startswith(prefix)]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.seen.append((request.path, {k.lower(): v for k, v in request.headers.items()}))
        if request.path.startswith("/hold"):
            self.held += 1
            await asyncio.wait_for(self.gate.wait(), HOLD_LIMIT)
        return web.Response(status=self.status, text=f"upstream {self.status}", headers=self.headers)


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> AsyncIterator[Upstream]:
    recorder = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    recorder.server = await aiohttp_server(app)
    yield recorder
    recorder.gate.set()  # free any held handler before the server closes


@dataclass
class Live:
    """An in-process Outrigger sharing one Reloader between the admin API and the file watcher."""

    server: ProxyServer
    reloader: Reloader
    config_path: Path
    client: aiohttp.ClientSession

    @property
    def port(self) -> int:
        return self.server.runtime.config.main.listen.port

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.server.runtime.config.main.admin.port}"

    @property
    def version(self) -> str:
        return self.server.runtime.config.version

    async def get(
        self, path: str = "/x", host: str = HOST, port: int | None = None
    ) -> tuple[int, dict[str, str], str]:
        async with self.client.get(
            f"http://127.0.0.1:{port or self.port}{path}", headers={"Host": host}
        ) as response:
            return response.status, dict(response.headers), await response.text()

    async def reload(self) -> tuple[int, dict[str, Any]]:
        async with self.client.post(f"{self.admin}/reload") as response:
            return response.status, await response.json()

    async def admin_json(self, path: str) -> Any:
        async with self.client.get(f"{self.admin}{path}") as response:
            assert response.status == 200, path
            return await response.json()

    async def reloads(self, result: str) -> float:
        """`outrigger_config_reloads_total{result=...}` from GET /metrics (0 while never counted)."""
        async with self.client.get(f"{self.admin}/metrics") as response:
            text = await response.text()
        match = re.search(
            rf'^outrigger_config_reloads_total\{{result="{result}"\}} (\S+)$', text, re.MULTILINE
        )
        return float(match.group(1)) if match else 0.0


Serve = Callable[..., Awaitable[Live]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start Outrigger from a config file; `watch=True` also runs the content-hash watcher
    (polling every `reload_poll_interval`, as `outrigger run` does)."""
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def start(config_path: Path, watch: bool = False) -> Live:
        config = load_config(config_path)
        server = ProxyServer(config)
        reloader = Reloader(server)
        admin = web.AppRunner(build_admin_app(server, reloader), access_log=None)
        await admin.setup()
        await web.TCPSite(admin, "127.0.0.1", config.main.admin.port).start()
        await server.start()
        connector = aiohttp.TCPConnector(limit=0)
        client = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=15))
        watcher = asyncio.create_task(reloader.watch()) if watch else None

        async def cleanup() -> None:
            if watcher is not None:
                watcher.cancel()
                await asyncio.wait({watcher}, timeout=2)
                if not watcher.cancelled():
                    watcher.exception()  # retrieved (a crashed watcher is asserted on by its test)
            await client.close()
            await server.stop()
            await admin.cleanup()

        cleanups.append(cleanup)
        return Live(server, reloader, config.path, client)

    yield start
    for cleanup in reversed(cleanups):
        await cleanup()


def header_policy(upstream: Upstream, value: str, **extra: Any) -> dict[str, Any]:
    """A policy that stamps `X-Config: value` on every upstream request (shows which config served)."""
    return loopback_policy(upstream.url, headers={"set": {"X-Config": value}}, **extra)


# --------------------------------------------------------------------------- triggers


async def test_post_reload_serves_the_edited_policy(serve: Serve, upstream: Upstream, tmp_path: Path) -> None:
    config = make_config(tmp_path, [header_policy(upstream, "v1")])
    live = await serve(config)
    before = live.version
    assert (await live.get())[0] == 200
    status, _, _ = await live.get(host="new.test")
    assert status == 403  # not allowed yet

    policy = header_policy(upstream, "v2")
    policy["hosts"] = [HOST, "new.test"]
    write_policies(tmp_path, [policy])
    status, body = await live.reload()

    assert status == 200, body
    assert body["ok"] is True
    assert body["error"] is None
    assert body["trigger"] == "admin"
    assert body["version"] != before
    assert body["version"] == live.version == load_config(config).version
    assert (await live.get())[0] == 200
    assert (await live.get(host="new.test"))[0] == 200
    assert upstream.values("X-Config") == ["v1", "v2", "v2"]
    assert (await live.admin_json("/config"))["version"] == body["version"]
    assert await live.reloads("success") == 1


async def test_post_reload_without_changes_keeps_the_runtime(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    live = await serve(make_config(tmp_path, [header_policy(upstream, "v1")]))
    runtime = live.server.runtime
    status, body = await live.reload()
    assert status == 200
    assert body["version"] == runtime.config.version
    assert live.server.runtime is runtime  # nothing rebuilt, nothing reset


async def test_watcher_picks_up_an_edit_without_any_signal(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    live = await serve(make_config(tmp_path, [header_policy(upstream, "v1")]), watch=True)
    before = live.version
    assert (await live.get())[0] == 200

    write_policies(tmp_path, [header_policy(upstream, "v2")])

    async def reloaded() -> bool:
        return live.version != before

    assert await wait_until(reloaded, within=WITHIN), "the watcher did not reload the edited policy"
    assert (await live.get())[0] == 200
    assert upstream.values("X-Config") == ["v1", "v2"]
    assert live.reloader.last is not None
    assert live.reloader.last.trigger == "file change"
    assert (await live.admin_json("/config"))["last_reload"]["trigger"] == "file change"


async def test_watcher_sees_a_new_policy_file_in_a_policy_folder(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    live = await serve(make_config(tmp_path, [header_policy(upstream, "v1")]), watch=True)
    assert (await live.get(host="other.test"))[0] == 403

    write_atomically(
        tmp_path / "policies" / "other.yaml",
        yaml.safe_dump(loopback_policy(upstream.url, host="other.test")),
    )

    async def allowed() -> bool:
        return (await live.get(host="other.test"))[0] == 200

    assert await wait_until(allowed, within=WITHIN), "a policy file added to the folder was not picked up"


async def test_raised_poll_interval_applies_to_the_running_watcher(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    config = make_config(tmp_path, [header_policy(upstream, "v1")])
    live = await serve(config, watch=True)
    edit_main(config, reload_poll_interval="1h")

    async def applied() -> bool:
        return live.server.runtime.config.main.reload_poll_interval == 3600

    assert await wait_until(applied, within=WITHIN)
    await asyncio.sleep(0.3)  # the watcher's last 100 ms sleep ends; the next one is an hour
    before = live.version
    write_policies(tmp_path, [header_policy(upstream, "v2")])
    await asyncio.sleep(0.5)
    assert live.version == before  # no longer polled every 100 ms
    assert (await live.reload())[0] == 200
    assert live.version != before


async def test_lowered_poll_interval_applies_without_waiting_out_the_old_one(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    config = make_config(tmp_path, [header_policy(upstream, "v1")], reload_poll_interval="1h")
    live = await serve(config, watch=True)
    await asyncio.sleep(0.1)  # the watcher is in its first, hour-long sleep
    edit_main(config, reload_poll_interval=POLL)
    assert (await live.reload())[0] == 200
    before = live.version

    write_policies(tmp_path, [header_policy(upstream, "v2")])

    async def reloaded() -> bool:
        return live.version != before

    assert await wait_until(reloaded, within=3), "the watcher is still in the old hour-long sleep"


def _configmap_version(root: Path, name: str, files: dict[str, str]) -> None:
    """Write one timestamped ConfigMap payload folder (`..2026_01_01/...`)."""
    for relative, text in files.items():
        target = root / name / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def _configmap_swap(root: Path, old: str, new: str, files: dict[str, str]) -> None:
    """What the kubelet's AtomicWriter does: new payload, `..data_tmp` symlink renamed over `..data`,
    then the old payload folder removed."""
    _configmap_version(root, new, files)
    os.symlink(new, root / "..data_tmp")
    os.replace(root / "..data_tmp", root / "..data")
    shutil.rmtree(root / old)


async def test_configmap_symlink_swap_of_a_policy_folder(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    """Policies mounted from a ConfigMap: `policies/test.yaml -> ..data/test.yaml`."""
    mount = tmp_path / "policies"
    config = make_config(tmp_path, [])
    (mount / "test.yaml").unlink()
    _configmap_version(mount, "..2026_01_01", {"test.yaml": yaml.safe_dump([header_policy(upstream, "v1")])})
    os.symlink("..2026_01_01", mount / "..data")
    os.symlink("..data/test.yaml", mount / "test.yaml")
    live = await serve(config, watch=True)
    before = live.version
    assert (await live.get())[0] == 200

    _configmap_swap(
        mount, "..2026_01_01", "..2026_01_02", {"test.yaml": yaml.safe_dump([header_policy(upstream, "v2")])}
    )

    async def reloaded() -> bool:
        return live.version != before

    assert await wait_until(reloaded, within=WITHIN), "the ..data symlink swap was not noticed"
    assert (await live.get())[0] == 200
    assert upstream.values("X-Config") == ["v1", "v2"]
    assert live.reloader.last is not None
    assert live.reloader.last.ok


async def test_configmap_symlink_swap_of_the_whole_config_folder(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    """The Kubernetes layout for a ConfigMap holding config.yaml and policies/test.yaml:

    <dir>/..2026_01_01/config.yaml, <dir>/..2026_01_01/policies/test.yaml,
    <dir>/..data -> ..2026_01_01, <dir>/config.yaml -> ..data/config.yaml,
    <dir>/policies/test.yaml -> ../..data/policies/test.yaml
    """
    root = tmp_path / "configmap"
    root.mkdir()
    main = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "policy_dirs": ["policies/"],
        "reload_poll_interval": POLL,
    }

    def payload(value: str) -> dict[str, str]:
        return {
            "config.yaml": yaml.safe_dump(main),
            "policies/test.yaml": yaml.safe_dump([header_policy(upstream, value)]),
        }

    _configmap_version(root, "..2026_01_01", payload("v1"))
    os.symlink("..2026_01_01", root / "..data")
    os.symlink("..data/config.yaml", root / "config.yaml")
    (root / "policies").mkdir()
    os.symlink("../..data/policies/test.yaml", root / "policies" / "test.yaml")
    live = await serve(root / "config.yaml", watch=True)
    before = live.version
    assert (await live.get())[0] == 200

    _configmap_swap(root, "..2026_01_01", "..2026_01_02", payload("v2"))

    async def reloaded() -> bool:
        return live.version != before

    assert await wait_until(reloaded, within=3), (
        f"no reload after the ..data swap; last reload: {live.reloader.last}"
    )
    assert live.reloader.last is not None
    assert live.reloader.last.ok, live.reloader.last.error
    assert (await live.get())[0] == 200
    assert upstream.values("X-Config") == ["v1", "v2"]


# --------------------------------------------------------------------------- subprocess: SIGHUP, polling


async def _get_via(port: int) -> int:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client,
        client.get(f"http://127.0.0.1:{port}/x", headers={"Host": HOST}) as response,
    ):
        return response.status


async def _wait_version_change(process: OutriggerProcess, before: str) -> str:
    current = before

    async def changed() -> bool:
        nonlocal current
        body = await process.readyz()
        current = body["config_version"] if body else before
        return current != before

    assert await wait_until(changed, within=WITHIN), f"still version {before}:\n{process.output}"
    return current


async def test_sighup_reloads_a_running_process(launch: Launch, upstream: Upstream, tmp_path: Path) -> None:
    # The watcher polls hourly here, so only the signal can explain a reload within the test.
    config = write_config(tmp_path, [header_policy(upstream, "v1")], reload_poll_interval="1h")
    port, _ = config_ports(config)
    process = launch(config)
    before = (await process.wait_ready(within=20))["config_version"]
    assert await _get_via(port) == 200

    write_policies(tmp_path, [header_policy(upstream, "v2")])
    await asyncio.sleep(0.3)
    status, _ = await process.admin_get("/readyz")
    assert status == 200
    assert (await process.readyz() or {}).get("config_version") == before  # nothing without the signal

    process.send(signal.SIGHUP)
    after = await _wait_version_change(process, before)

    assert after == load_config(config).version
    _, shown = await process.admin_get("/config")
    assert shown["last_reload"]["trigger"] == "SIGHUP"
    assert shown["last_reload_error"] is None
    assert await _get_via(port) == 200
    assert upstream.values("X-Config") == ["v1", "v2"]
    assert process.proc is not None
    assert process.proc.poll() is None  # SIGHUP reloads, it does not stop the process


async def test_running_process_polls_files_by_content_hash(
    launch: Launch, upstream: Upstream, tmp_path: Path
) -> None:
    config = write_config(tmp_path, [header_policy(upstream, "v1")], reload_poll_interval=POLL)
    port, _ = config_ports(config)
    process = launch(config)
    before = (await process.wait_ready(within=20))["config_version"]
    assert await _get_via(port) == 200

    write_policies(tmp_path, [header_policy(upstream, "v2")])
    await _wait_version_change(process, before)

    _, shown = await process.admin_get("/config")
    assert shown["last_reload"]["trigger"] == "file change"
    assert await _get_via(port) == 200
    assert upstream.values("X-Config") == ["v1", "v2"]


# --------------------------------------------------------------------------- validation


def _bad_yaml(upstream: Upstream) -> str:
    return f"- hosts: [{HOST}]\n  upstream: {upstream.url}\n  headers: {{set: {{X-Config: [v2}}\n"


def _unknown_key(upstream: Upstream) -> str:
    return yaml.safe_dump([{**header_policy(upstream, "v2"), "timeoutz": {"total": "1s"}}])


def _per_try_over_total(upstream: Upstream) -> str:
    return yaml.safe_dump([{**header_policy(upstream, "v2"), "timeouts": {"per_try": "5s", "total": "1s"}}])


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(_bad_yaml, r"\(top level\): invalid YAML: ", id="bad-yaml"),
        pytest.param(_unknown_key, r"\[0\]\.timeoutz: unknown key", id="unknown-key"),
        pytest.param(
            _per_try_over_total,
            r"\[0\]\.timeouts: per_try \(5s\) is longer than total \(1s\)",
            id="per-try-over-total",
        ),
    ],
)
async def test_invalid_edit_is_rejected_and_the_old_config_keeps_serving(
    serve: Serve,
    upstream: Upstream,
    tmp_path: Path,
    make: Callable[[Upstream], str],
    expected: str,
) -> None:
    live = await serve(make_config(tmp_path, [header_policy(upstream, "v1")]))
    before = live.version
    policy_file = tmp_path / "policies" / "test.yaml"

    write_atomically(policy_file, make(upstream))
    status, body = await live.reload()

    assert status == 422
    assert body["ok"] is False
    assert body["version"] == before
    assert re.fullmatch(rf"{re.escape(str(policy_file))}:\d+: {expected}.*", body["error"]), body["error"]
    assert live.version == before
    assert (await live.get())[0] == 200
    assert upstream.values("X-Config") == ["v1"]  # the old header rules still apply
    shown = await live.admin_json("/config")
    assert shown["version"] == before
    assert shown["last_reload_error"] == body["error"]
    assert await live.reloads("error") == 1
    assert await live.reloads("success") == 0

    write_policies(tmp_path, [header_policy(upstream, "v2")])
    status, body = await live.reload()

    assert status == 200, body
    assert live.version != before
    assert (await live.get())[0] == 200
    assert upstream.values("X-Config") == ["v1", "v2"]
    shown = await live.admin_json("/config")
    assert shown["last_reload_error"] is None
    assert shown["version"] == live.version
    assert await live.reloads("success") == 1
    assert await live.reloads("error") == 1


async def test_watcher_rejects_an_invalid_edit_then_applies_the_fix(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    live = await serve(make_config(tmp_path, [header_policy(upstream, "v1")]), watch=True)
    before = live.version
    write_atomically(tmp_path / "policies" / "test.yaml", _unknown_key(upstream))

    async def rejected() -> bool:
        return await live.reloads("error") == 1

    assert await wait_until(rejected, within=WITHIN), "the watcher did not report the invalid edit"
    assert live.version == before
    assert "unknown key" in (await live.admin_json("/config"))["last_reload_error"]
    assert (await live.get())[0] == 200
    await asyncio.sleep(0.3)
    assert await live.reloads("error") == 1  # one report per distinct change, not one per poll

    write_policies(tmp_path, [header_policy(upstream, "v2")])

    async def applied() -> bool:
        return live.version != before

    assert await wait_until(applied, within=WITHIN)
    assert (await live.admin_json("/config"))["last_reload_error"] is None
    assert (await live.get())[0] == 200
    assert upstream.values("X-Config") == ["v1", "v2"]


def _not_utf8(upstream: Upstream) -> bytes:
    return f"- hosts: [{HOST}]\n  upstream: {upstream.url}\n  headers: {{set: {{X-Config: '".encode() + (
        b"\xff\xfe'}}\n"
    )


async def test_post_reload_rejects_a_file_that_is_not_utf8(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    live = await serve(make_config(tmp_path, [header_policy(upstream, "v1")]))
    before = live.version
    write_atomically(tmp_path / "policies" / "test.yaml", _not_utf8(upstream))

    async with live.client.post(f"{live.admin}/reload") as response:
        status = response.status
    assert status == 422
    assert live.version == before
    assert await live.reloads("error") == 1
    assert (await live.admin_json("/config"))["last_reload_error"]


async def test_watcher_survives_a_file_that_is_not_utf8(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    live = await serve(make_config(tmp_path, [header_policy(upstream, "v1")]), watch=True)
    before = live.version
    write_atomically(tmp_path / "policies" / "test.yaml", _not_utf8(upstream))
    await asyncio.sleep(0.4)
    assert live.version == before

    write_policies(tmp_path, [header_policy(upstream, "v2")])

    async def applied() -> bool:
        return live.version != before

    assert await wait_until(applied, within=3), "the watcher stopped after the undecodable file"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("limits", {"max_header_bytes": "32KiB"}),
        ("telemetry", {"service_name": "renamed"}),
        ("drain_timeout", "5s"),
    ],
)
async def test_changing_a_restart_only_key_is_rejected(
    serve: Serve, upstream: Upstream, tmp_path: Path, key: str, value: Any
) -> None:
    config = make_config(tmp_path, [header_policy(upstream, "v1")])
    live = await serve(config)
    before = live.version
    edit_main(config, **{key: value})
    write_policies(tmp_path, [header_policy(upstream, "v2")])  # a valid change in the same edit

    status, body = await live.reload()

    assert status == 422
    assert body["error"] == f"{config}: {key} changed: restart Outrigger to apply (not reloadable)"
    assert live.version == before
    assert (await live.admin_json("/config"))["last_reload_error"] == body["error"]
    assert await live.reloads("error") == 1
    assert (await live.get())[0] == 200
    assert upstream.values("X-Config") == ["v1"]  # all or nothing: the policy edit did not apply either


async def test_reloadable_main_keys_apply(serve: Serve, upstream: Upstream, tmp_path: Path) -> None:
    """`defaults` and `unknown_hosts` are not restart-only: a reload applies them."""
    config = make_config(tmp_path, [header_policy(upstream, "v1")])
    live = await serve(config)
    edit_main(config, defaults={"headers": {"set": {"X-Default": "on"}}})

    status, body = await live.reload()

    assert status == 200, body
    assert (await live.get())[0] == 200
    assert upstream.values("X-Default") == ["on"]


# --------------------------------------------------------------------------- under load


async def test_reload_with_50_requests_in_flight_loses_none(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    live = await serve(make_config(tmp_path, [header_policy(upstream, "old")]))
    in_flight = [asyncio.create_task(live.get(f"/hold/{i}")) for i in range(50)]

    async def all_held() -> bool:
        return upstream.held == 50

    assert await wait_until(all_held, within=WITHIN), (
        f"only {upstream.held} of 50 requests reached the upstream"
    )

    write_policies(tmp_path, [header_policy(upstream, "new")])
    status, body = await live.reload()
    assert status == 200, body
    fresh = await live.get("/after")  # served while the 50 are still held
    assert fresh[0] == 200
    assert upstream.values("X-Config", "/after") == ["new"]
    assert not any(task.done() for task in in_flight)

    upstream.gate.set()
    done, pending = await asyncio.wait(in_flight, timeout=10)
    assert not pending
    results = [task.result() for task in done]
    assert [status for status, _, _ in results] == [200] * 50
    assert all(text == "upstream 200" for _, _, text in results)
    assert upstream.values("X-Config", "/hold") == ["old"] * 50
    assert upstream.values("X-Config", "/after") == ["new"]


async def test_requests_in_flight_on_a_closed_listen_port_finish(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    dedicated = free_port()
    config = make_config(tmp_path, [header_policy(upstream, "old", listen=dedicated)])
    live = await serve(config)
    in_flight = [asyncio.create_task(live.get(f"/hold/{i}", port=dedicated)) for i in range(10)]

    async def all_held() -> bool:
        return upstream.held == 10

    assert await wait_until(all_held, within=WITHIN)
    write_policies(tmp_path, [header_policy(upstream, "new")])
    status, body = await live.reload()
    assert status == 200, body
    assert await port_refuses(dedicated)

    upstream.gate.set()
    done, pending = await asyncio.wait(in_flight, timeout=10)
    assert not pending
    assert [task.result()[0] for task in done] == [200] * 10


# --------------------------------------------------------------------------- state carry-over


async def _state(live: Live, section: str) -> Any:
    return (await live.admin_json("/state"))[HOST][section]


async def test_open_breaker_survives_an_unrelated_change_and_resets_when_its_section_changes(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.status = 503
    breaker = {"failure_threshold": 2, "reset_timeout": "30s"}
    live = await serve(make_config(tmp_path, [header_policy(upstream, "v1", circuit_breaker=breaker)]))
    for _ in range(2):
        assert (await live.get())[0] == 503
    status, headers, _ = await live.get()
    assert (status, headers.get("x-outrigger-error")) == (503, "circuit_open")
    assert upstream.hits == 2

    write_policies(tmp_path, [header_policy(upstream, "v2", circuit_breaker=breaker)])
    assert (await live.reload())[0] == 200
    assert (await _state(live, "circuit_breaker"))["state"] == "open"
    status, headers, _ = await live.get()
    assert (status, headers.get("x-outrigger-error")) == (503, "circuit_open")
    assert upstream.hits == 2  # still failing fast without contacting the upstream

    changed = {**breaker, "failure_threshold": 3}
    write_policies(tmp_path, [header_policy(upstream, "v3", circuit_breaker=changed)])
    assert (await live.reload())[0] == 200
    assert (await _state(live, "circuit_breaker"))["state"] == "closed"
    status, headers, _ = await live.get()
    assert status == 503
    assert "x-outrigger-error" not in headers  # the upstream's own 503
    assert upstream.hits == 3
    assert upstream.values("X-Config")[-1] == "v3"
    assert (await _state(live, "circuit_breaker"))["consecutive_failures"] == 1


async def test_provider_pause_survives_reloads_even_when_our_rate_limit_changes(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.status = 429
    upstream.headers = {"Retry-After": "30"}
    limit = {"rate": 100, "per": "1s", "burst": 100, "max_wait": "200ms", "adaptive": True}
    live = await serve(make_config(tmp_path, [header_policy(upstream, "v1", rate_limit=limit)]))
    status, headers, _ = await live.get()
    assert (status, headers.get("x-outrigger-error")) == (429, None)  # the provider's 429
    status, headers, _ = await live.get()
    assert (status, headers.get("x-outrigger-error")) == (429, "rate_limited")
    assert upstream.hits == 1

    write_policies(tmp_path, [header_policy(upstream, "v2", rate_limit=limit)])
    assert (await live.reload())[0] == 200
    assert (await _state(live, "rate_limit"))["paused_for_seconds"] > 20
    status, headers, _ = await live.get()
    assert (status, headers.get("x-outrigger-error")) == (429, "rate_limited")
    assert upstream.hits == 1  # the pause the provider asked for still holds

    # Our own limits changed, the provider's request did not: the pause (and quota) carry over.
    write_policies(tmp_path, [header_policy(upstream, "v3", rate_limit={**limit, "rate": 50})])
    assert (await live.reload())[0] == 200
    assert (await _state(live, "rate_limit"))["paused_for_seconds"] > 20
    status, headers, _ = await live.get()
    assert (status, headers.get("x-outrigger-error")) == (429, "rate_limited")
    assert upstream.hits == 1

    # Turning the limiter off and on again starts clean.
    write_policies(tmp_path, [header_policy(upstream, "v4")])
    assert (await live.reload())[0] == 200
    write_policies(tmp_path, [header_policy(upstream, "v5", rate_limit=limit)])
    assert (await live.reload())[0] == 200
    assert (await _state(live, "rate_limit"))["paused_for_seconds"] == 0


async def test_spent_retry_budget_survives_an_unrelated_change_and_resets_when_it_changes(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.status = 503

    def retries(min_per_second: float) -> dict[str, Any]:
        # ratio 0: the budget is only min_per_second * window retries (1, then 5)
        budget = {"ratio": 0, "min_per_second": min_per_second, "window": "50s"}
        return {"max_attempts": 3, "on": [503], "backoff": {"base": "1ms", "max": "2ms"}, "budget": budget}

    live = await serve(make_config(tmp_path, [header_policy(upstream, "v1", retries=retries(0.02))]))

    async def attempts() -> str | None:
        status, headers, _ = await live.get()
        assert status == 503
        return headers.get("x-outrigger-attempts")

    assert await attempts() == "2"  # the one retry the budget allows
    assert await attempts() == "1"  # budget spent
    spent = await _state(live, "retry_budget")
    assert spent["retries"] == 1

    write_policies(tmp_path, [header_policy(upstream, "v2", retries=retries(0.02))])
    assert (await live.reload())[0] == 200
    assert (await _state(live, "retry_budget"))["retries"] == 1
    assert await attempts() == "1"  # still spent after the reload
    assert upstream.values("X-Config")[-1] == "v2"

    write_policies(tmp_path, [header_policy(upstream, "v3", retries=retries(0.1))])
    assert (await live.reload())[0] == 200
    assert (await _state(live, "retry_budget"))["retries"] == 0
    assert await attempts() == "3"  # a fresh budget


async def test_state_of_one_policy_carries_over_when_another_policy_changes(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.status = 503
    breaker = {"failure_threshold": 1, "reset_timeout": "30s"}
    tripped = header_policy(upstream, "v1", circuit_breaker=breaker)
    other = loopback_policy(upstream.url, host="other.test", headers={"set": {"X-Config": "a"}})
    live = await serve(make_config(tmp_path, [tripped, other]))
    assert (await live.get())[0] == 503
    assert (await live.get())[1].get("x-outrigger-error") == "circuit_open"

    write_policies(tmp_path, [tripped, {**other, "headers": {"set": {"X-Config": "b"}}}])
    assert (await live.reload())[0] == 200
    assert (await live.get())[1].get("x-outrigger-error") == "circuit_open"
    assert (await live.get(host="other.test"))[0] == 503
    assert upstream.values("X-Config")[-1] == "b"


# --------------------------------------------------------------------------- listen ports


async def test_adding_and_removing_a_listen_port(serve: Serve, upstream: Upstream, tmp_path: Path) -> None:
    dedicated = free_port()
    live = await serve(make_config(tmp_path, [header_policy(upstream, "v1")]))
    assert await port_refuses(dedicated)

    extra = loopback_policy(upstream.url, host="dedicated.test", listen=dedicated)
    extra["headers"] = {"set": {"X-Config": "dedicated"}}
    write_policies(tmp_path, [header_policy(upstream, "v1"), extra])
    status, body = await live.reload()
    assert status == 200, body
    assert dedicated in live.server.bound_ports
    assert (await live.get(host=f"localhost:{dedicated}", port=dedicated))[0] == 200
    assert upstream.values("X-Config") == ["dedicated"]

    write_policies(tmp_path, [header_policy(upstream, "v1")])
    status, body = await live.reload()
    assert status == 200, body
    assert await port_refuses(dedicated)
    assert dedicated not in live.server.bound_ports
    assert (await live.get())[0] == 200  # the main listener is untouched


async def test_moving_a_listen_port_opens_the_new_one_and_closes_the_old(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    first, second = free_port(), free_port()
    live = await serve(make_config(tmp_path, [header_policy(upstream, "v1", listen=first)]))
    assert (await live.get(port=first))[0] == 200

    write_policies(tmp_path, [header_policy(upstream, "v2", listen=second)])
    assert (await live.reload())[0] == 200
    assert await port_refuses(first)
    assert (await live.get(port=second))[0] == 200
    assert upstream.values("X-Config") == ["v1", "v2"]


async def test_a_listen_port_taken_by_another_process_fails_the_reload_cleanly(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    live = await serve(make_config(tmp_path, [header_policy(upstream, "v1")]))
    before = live.version
    bound_before = sorted(live.server.bound_ports)
    also_free = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken: int = squatter.getsockname()[1]
        write_policies(
            tmp_path,
            [
                header_policy(upstream, "v2"),
                loopback_policy(upstream.url, host="a.test", listen=also_free),
                loopback_policy(upstream.url, host="b.test", listen=taken),
            ],
        )

        status, body = await live.reload()

        assert status == 422
        assert str(taken) in body["error"]
        assert "address already in use" in body["error"].lower()
        assert live.version == before
        assert sorted(live.server.bound_ports) == bound_before
        assert await port_refuses(also_free)  # the port opened before the failure was closed again
        assert (await live.get())[0] == 200
        assert upstream.values("X-Config") == ["v1"]
        shown = await live.admin_json("/config")
        assert shown["version"] == before
        assert shown["last_reload_error"] == body["error"]
        assert await live.reloads("error") == 1

    status, body = await live.reload()  # the port is free now
    assert status == 200, body
    assert (await live.get(host="b.test", port=taken))[0] == 200


# --------------------------------------------------------------------------- secret rotation


def _token_policy(upstream: Upstream) -> dict[str, Any]:
    return loopback_policy(upstream.url, headers={"set": {"Authorization": "Bearer ${file:token.txt}"}})


async def test_rotated_secret_file_is_used_after_the_watcher_notices(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    token = tmp_path / "token.txt"
    token.write_text("first-token\n")
    live = await serve(make_config(tmp_path, [_token_policy(upstream)]), watch=True)
    assert token in live.server.runtime.config.files
    before = live.version
    runtime = live.server.runtime
    assert (await live.get())[0] == 200

    write_atomically(token, "second-token\n")

    async def rotated() -> bool:
        return live.version != before

    assert await wait_until(rotated, within=WITHIN), "the rotated secret file was not noticed"
    assert live.server.runtime is not runtime
    assert (await live.get())[0] == 200
    assert upstream.values("Authorization") == ["Bearer first-token", "Bearer second-token"]
    shown = json.dumps(await live.admin_json("/config"))
    assert "second-token" not in shown
    assert "first-token" not in shown


async def test_rotated_secret_file_is_used_after_post_reload(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    token = tmp_path / "token.txt"
    token.write_text("first-token")
    live = await serve(make_config(tmp_path, [_token_policy(upstream)]))
    assert (await live.get())[0] == 200

    token.write_text("second-token")
    assert (await live.get())[0] == 200
    status, body = await live.reload()
    assert status == 200, body
    assert (await live.get())[0] == 200
    assert upstream.values("Authorization") == [
        "Bearer first-token",
        "Bearer first-token",  # rendered once per config: unchanged until the reload
        "Bearer second-token",
    ]


async def test_unreadable_rotated_secret_keeps_the_old_one(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    token = tmp_path / "token.txt"
    token.write_text("first-token")
    live = await serve(make_config(tmp_path, [_token_policy(upstream)]))
    token.unlink()

    status, body = await live.reload()

    assert status == 422
    assert "token.txt" in body["error"]
    assert (await live.get())[0] == 200
    assert upstream.values("Authorization") == ["Bearer first-token"]


# --------------------------------------------------------------------------- unexpected failures


def _boom(*args: object, **kwargs: object) -> None:
    raise RuntimeError("boom")


@pytest.mark.parametrize("stage", ["proxy.reload.load_config", "proxy.pipeline.build_layers"])
async def test_an_unexpected_error_during_reload_is_a_json_500_and_the_old_config_keeps_serving(
    serve: Serve, upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    live = await serve(make_config(tmp_path, [header_policy(upstream, "v1")]))
    before = live.version
    write_policies(tmp_path, [header_policy(upstream, "v2")])
    monkeypatch.setattr(stage, _boom)

    status, body = await live.reload()

    assert status == 500, body
    assert body["error"] == {"type": "internal_error", "message": "unexpected RuntimeError: boom"}
    assert (body["ok"], body["version"], body["trigger"]) == (False, before, "admin")
    assert live.version == before
    assert (await live.get())[0] == 200
    assert upstream.values("X-Config") == ["v1"]
    assert (await live.admin_json("/config"))["last_reload_error"] == "unexpected RuntimeError: boom"
    assert await live.reloads("error") == 1

    monkeypatch.undo()
    assert (await live.reload())[0] == 200
    assert (await live.get())[0] == 200
    assert upstream.values("X-Config") == ["v1", "v2"]


async def test_a_reload_renders_secrets_off_the_event_loop(
    serve: Serve, upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading `${file:}` secrets (and policy files) blocks: the loop must keep serving meanwhile."""
    secret = tmp_path / "token"
    secret.write_text("t1\n")
    policy = loopback_policy(upstream.url, headers={"set": {"Authorization": f"Bearer ${{file:{secret}}}"}})
    live = await serve(make_config(tmp_path, [policy]))
    secret.write_text("t2\n")
    loop_thread = threading.get_ident()
    threads: list[int] = []
    render = secrets.render

    def recording(template: str, base_dir: Path) -> str:
        threads.append(threading.get_ident())
        return render(template, base_dir)

    monkeypatch.setattr(secrets, "render", recording)

    status, body = await live.reload()

    assert status == 200, body
    assert threads, "the secret was not rendered again"
    assert loop_thread not in threads
    assert (await live.get())[0] == 200
    assert upstream.values("Authorization") == ["Bearer t2"]


# --------------------------------------------------------------------------- TLS files


async def test_a_reload_rebuilds_only_the_tls_contexts_whose_files_changed(
    tmp_path: Path, start_proxy: StartProxy
) -> None:
    _, ca_file = write_ca_file_config(tmp_path)
    proxy = await start_proxy([loopback_policy("https://127.0.0.1:9", tls={"ca_file": str(ca_file)})])
    tls = proxy.config.policies[0].settings.tls
    assert tls.ca_file is not None
    before = proxy.server.upstream._ssl_context(tls)
    assert proxy.server.upstream._ssl_context(tls) is before, "cached between reloads"
    await proxy.server.apply(load_config(proxy.config.path))
    assert proxy.server.upstream._ssl_context(tls) is before, "unchanged files: pooled TLS stays"
    trustme.CA().cert_pem.write_to_path(str(ca_file))  # a rotated CA
    os.utime(ca_file, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    await proxy.server.apply(load_config(proxy.config.path))
    assert proxy.server.upstream._ssl_context(tls) is not before, "a rotated file is read again"


# --------------------------------------------------------------------------- no reload while draining


async def test_reload_while_draining_is_refused_and_reopens_no_listener(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    gate = Gate(text="ok", hold_limit=8)
    upstream = await ScriptedUpstream(gate).start(aiohttp_server)
    proxy = await start_proxy([loopback_policy(upstream.url)], drain_timeout="8s")
    in_flight = asyncio.create_task(app_get(proxy, "/held"))
    await gate.wait_arrivals(1, within=3)

    stopping = asyncio.create_task(proxy.server.stop())
    try:
        assert await wait_until(lambda: proxy.server.bound_ports == [], within=2.0)
        # an edit that a reload would apply (new version), with a port of its own to open
        policies = proxy.config.path.parent / "policies" / "test.yaml"
        extra = loopback_policy(upstream.url, host="other.test", listen=free_port())
        policies.write_text(yaml.safe_dump([*yaml.safe_load(policies.read_text()), extra]))
        async with (
            aiohttp.ClientSession(timeout=CALL_TIMEOUT) as client,
            client.post(f"http://127.0.0.1:{proxy.admin_port}/reload") as response,
        ):
            result = await response.json()
        assert proxy.server.bound_ports == [], "a reload during shutdown reopened a listener"
        assert response.status == 422, result
        assert result["ok"] is False
        assert result["error"] == "shutting down"
        assert result["version"] == proxy.config.version
        assert not stopping.done()
    finally:
        gate.open.set()
    assert (await in_flight)[0] == 200
    await asyncio.wait_for(stopping, 8)
    assert proxy.server.bound_ports == []
