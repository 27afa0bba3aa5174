"""`headers.set` / `headers.remove` end to end, secret references, and secrets staying secret.

The upstream echoes the raw header lines it received, so duplicates and casing are visible.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from proxy.config.loader import load_config
from tests.conftest import StartProxy, free_port, loopback_policy, write_config
from tests.e2e.procs import OutriggerProcess, config_ports, outrigger_command

ENV_NAME = "OUTRIGGER_E2E_TOKEN"
ENV_SECRET = "env-secret-7f3a9c41d2"
FILE_SECRET = "file-secret-b81e55a0c9"
RELATIVE_SECRET = "relative-secret-03d6e7f2aa"
INLINE_SECRET = "inline-secret-9e2f04c6b3"
ALL_SECRETS = (ENV_SECRET, FILE_SECRET, RELATIVE_SECRET, INLINE_SECRET)


async def _echo(aiohttp_server: AiohttpServer) -> TestServer:
    """Answers with the raw header lines it received, in order, plus method and path."""

    async def echo(request: web.Request) -> web.Response:
        await request.read()
        lines = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]
        return web.json_response({"method": request.method, "path": request.path_qs, "headers": lines})

    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(20):
            await response.write(b"x")
            await asyncio.sleep(0.05)
        return response

    app = web.Application()
    app.router.add_get("/drip", drip)
    app.router.add_route("*", "/{tail:.*}", echo)
    return await aiohttp_server(app)


def _values(echo: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in echo["headers"] if key.lower() == name.lower()]


def _plant_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Env var, an absolute secret file and one relative to the config folder; returns the absolute one."""
    monkeypatch.setenv(ENV_NAME, ENV_SECRET)
    absolute = tmp_path / "mounted" / "api-key"
    absolute.parent.mkdir()
    absolute.write_text(FILE_SECRET + "\n")  # as kubectl writes it: one trailing newline
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "relative.txt").write_text(RELATIVE_SECRET)
    return absolute


def _secret_rules(absolute: Path) -> dict[str, Any]:
    return {
        "set": {
            "X-Literal": "plain-value",
            "Authorization": f"Bearer ${{env:{ENV_NAME}}}",
            "X-Api-Key": f"${{file:{absolute}}}",
            # Relative to the config file's folder (tmp_path), not to policies/ nor the cwd.
            "X-Relative-Key": "${file:secrets/relative.txt}",
            "X-Auth-Token": INLINE_SECRET,
        }
    }


async def _request(
    url: str,
    *,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    proxy: str | None = None,
) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client,
        client.request(method, url, headers=headers or [], proxy=proxy) as response,
    ):
        assert response.status == 200, await response.text()
        result: dict[str, Any] = await response.json()
        return result


@pytest.mark.parametrize("mode", ["dedicated-port", "absolute-form", "host-header"])
async def test_set_literal_env_and_file_values_reach_the_upstream(
    aiohttp_server: AiohttpServer,
    start_proxy: StartProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    upstream = await _echo(aiohttp_server)
    absolute = _plant_secrets(tmp_path, monkeypatch)
    assert not (Path.cwd() / "secrets" / "relative.txt").exists()
    port = free_port()
    proxy = await start_proxy(
        [loopback_policy(f"http://127.0.0.1:{upstream.port}", listen=port, headers=_secret_rules(absolute))]
    )
    if mode == "dedicated-port":
        echo = await _request(f"http://127.0.0.1:{port}/v1/x")
    elif mode == "absolute-form":
        echo = await _request("http://upstream.test/v1/x", proxy=proxy.url)
    else:
        echo = await _request(f"{proxy.url}/v1/x", headers=[("Host", "upstream.test")])
    assert _values(echo, "X-Literal") == ["plain-value"]
    assert _values(echo, "Authorization") == [f"Bearer {ENV_SECRET}"]
    assert _values(echo, "X-Api-Key") == [FILE_SECRET], "one trailing newline is dropped"
    assert _values(echo, "X-Relative-Key") == [RELATIVE_SECRET]
    assert _values(echo, "X-Auth-Token") == [INLINE_SECRET]


async def test_set_overrides_the_app_value_of_the_same_header(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    upstream = await _echo(aiohttp_server)
    proxy = await start_proxy(
        [
            loopback_policy(
                f"http://127.0.0.1:{upstream.port}", headers={"set": {"Authorization": "Bearer policy"}}
            )
        ]
    )
    echo = await _request(
        f"{proxy.url}/x",
        headers=[
            ("Host", "upstream.test"),
            ("authorization", "Bearer from-the-app"),
            ("AUTHORIZATION", "Basic second-app-value"),
            ("X-App", "kept"),
        ],
    )
    assert _values(echo, "Authorization") == ["Bearer policy"], "exactly one value: the policy's"
    assert _values(echo, "X-App") == ["kept"]


async def test_remove_strips_app_headers_in_any_case_and_every_copy(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    upstream = await _echo(aiohttp_server)
    proxy = await start_proxy(
        [
            loopback_policy(
                f"http://127.0.0.1:{upstream.port}",
                headers={"remove": ["X-Internal-Debug", "Cookie"]},
            )
        ]
    )
    echo = await _request(
        f"{proxy.url}/x",
        headers=[
            ("Host", "upstream.test"),
            ("x-internal-debug", "1"),
            ("X-INTERNAL-DEBUG", "2"),
            ("Cookie", "session=abc"),
            ("X-Keep", "yes"),
        ],
    )
    assert _values(echo, "X-Internal-Debug") == []
    assert _values(echo, "Cookie") == []
    assert _values(echo, "X-Keep") == ["yes"]


async def test_route_headers_apply_only_on_matching_requests(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    upstream = await _echo(aiohttp_server)
    policy = loopback_policy(
        f"http://127.0.0.1:{upstream.port}",
        headers={"set": {"X-Policy": "base"}, "remove": ["X-Drop"]},
        routes=[
            {
                "match": {"method": "POST", "path": "/v1/special*"},
                "headers": {"set": {"X-Route": "special", "X-Policy": "overridden"}},
            }
        ],
    )
    proxy = await start_proxy([policy])
    app_headers = [("Host", "upstream.test"), ("X-Drop", "gone")]

    async def send(method: str, path: str) -> dict[str, Any]:
        return await _request(f"{proxy.url}{path}", method=method, headers=app_headers)

    matched = await send("POST", "/v1/special/42?expand=1")
    assert _values(matched, "X-Route") == ["special"]
    assert _values(matched, "X-Policy") == ["overridden"]
    assert _values(matched, "X-Drop") == [], "the policy's remove still applies under the route"
    for method, path in [("GET", "/v1/special/42"), ("POST", "/v1/other"), ("POST", "/v2/special")]:
        other = await send(method, path)
        assert _values(other, "X-Route") == [], (method, path)
        assert _values(other, "X-Policy") == ["base"], (method, path)
        assert _values(other, "X-Drop") == [], (method, path)


async def test_control_headers_never_reach_the_upstream(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy
) -> None:
    upstream = await _echo(aiohttp_server)
    proxy = await start_proxy([loopback_policy(f"http://127.0.0.1:{upstream.port}")])
    echo = await _request(
        f"{proxy.url}/x",
        headers=[("Host", "upstream.test"), ("x-outrigger-timeout-ms", "5000"), ("X-Outrigger-Other", "1")],
    )
    assert [k for k, _ in echo["headers"] if k.lower().startswith("x-outrigger-")] == []


# --------------------------------------------------------------------------- secrets stay secret


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, ENV_NAME: ENV_SECRET}
    return subprocess.run(
        [*outrigger_command(), *args], capture_output=True, text=True, timeout=20, env=env, check=False
    )


def _secret_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream: str) -> Path:
    absolute = _plant_secrets(tmp_path, monkeypatch)
    policy = loopback_policy(
        upstream,
        headers=_secret_rules(absolute),
        routes=[
            {
                "match": {"path": "/v1/special*"},
                "headers": {"set": {"X-Route-Key": f"${{file:{absolute}}}", "Cookie": INLINE_SECRET}},
            }
        ],
    )
    return write_config(tmp_path, [policy], drain_idle="200ms")  # `run` exits soon after SIGTERM


@pytest.mark.parametrize("url", ["http://upstream.test/v1/x", "http://upstream.test/v1/special/1"])
def test_explain_never_prints_secret_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    config = _secret_config(tmp_path, monkeypatch, "http://127.0.0.1:9")
    result = _run_cli("explain", "-c", str(config), "POST", url)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for secret in ALL_SECRETS:
        assert secret not in output
    report = yaml.safe_load(result.stdout)
    shown = report["settings"]["headers"]["set"]
    assert shown["X-Literal"] == "plain-value", "non-secret values stay readable"
    assert shown["Authorization"] == f"Bearer ${{env:{ENV_NAME}}}", "the reference is shown, not its value"
    assert shown["X-Relative-Key"] == "${file:secrets/relative.txt}"
    assert INLINE_SECRET not in shown["X-Auth-Token"]


def test_check_never_prints_secret_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _secret_config(tmp_path, monkeypatch, "http://127.0.0.1:9")
    result = _run_cli("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    for secret in ALL_SECRETS:
        assert secret not in result.stdout + result.stderr


async def test_secrets_never_appear_in_log_records(
    aiohttp_server: AiohttpServer,
    start_proxy: StartProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream = await _echo(aiohttp_server)
    absolute = _plant_secrets(tmp_path, monkeypatch)
    rules = _secret_rules(absolute)
    proxy = await start_proxy(
        [
            loopback_policy(
                f"http://127.0.0.1:{upstream.port}",
                headers=rules,
                timeouts={"connect": "200ms", "total": "300ms", "per_try": "300ms", "stream": "300ms"},
            ),
            loopback_policy(f"http://127.0.0.1:{free_port()}", host="dead.test", headers=rules),
        ]
    )
    echo = await _request(f"{proxy.url}/ok", headers=[("Host", "upstream.test")])
    assert _values(echo, "Authorization") == [f"Bearer {ENV_SECRET}"], "the secret was really sent"
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.url}/x", headers={"Host": "dead.test"}) as response:
            assert response.status == 502
        async with client.get(f"{proxy.url}/drip", headers={"Host": "upstream.test"}) as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()  # cut short by stream: a logged warning
    assert any(r.name.startswith("outrigger") for r in caplog.records), "log capture works"
    text = caplog.text + "\n".join(json.dumps(r.args, default=str) for r in caplog.records)
    for secret in ALL_SECRETS:
        assert secret not in text


async def test_secrets_never_appear_in_the_output_of_outrigger_run(
    aiohttp_server: AiohttpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = await _echo(aiohttp_server)
    config = _secret_config(tmp_path, monkeypatch, f"http://127.0.0.1:{upstream.port}")
    main_port, admin_port = config_ports(config)
    process = OutriggerProcess(config, admin_port, tmp_path, "--log-level", "DEBUG").start()
    try:
        await process.wait_ready()
        base = f"http://127.0.0.1:{main_port}"
        for path in ("/v1/x", "/v1/special/1"):
            echo = await _request(f"{base}{path}", headers=[("Host", "upstream.test")])
            assert _values(echo, "X-Api-Key") == [FILE_SECRET]
        process.send(signal.SIGTERM)
        assert await process.wait_exit(5) == 0
    finally:
        process.kill()
    output = process.output
    assert "listening on" in output, "the log output was captured"
    for secret in ALL_SECRETS:
        assert secret not in output


# --------------------------------------------------------------------------- policies on one line


async def test_policies_written_on_one_line_keep_their_own_credentials(
    aiohttp_server: AiohttpServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("X-Secret", ""))

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    upstream = await aiohttp_server(app)
    url = f"http://127.0.0.1:{upstream.port}"
    proxy = await start_proxy([loopback_policy(url, host="placeholder.test")])
    flow = [
        loopback_policy(url, host="a.test", headers={"set": {"X-Secret": "for-a"}}),
        loopback_policy(url, host="b.test", headers={"set": {"X-Secret": "for-b"}}),
    ]
    policy_file = tmp_path / "policies" / "test.yaml"
    policy_file.write_text(yaml.safe_dump(flow, default_flow_style=True, width=100_000))
    assert len(policy_file.read_text().strip().splitlines()) == 1, "both policies on one line"
    await proxy.server.apply(load_config(proxy.config.path))
    async with aiohttp.ClientSession() as client:
        for host, secret in (("a.test", "for-a"), ("b.test", "for-b")):
            async with client.get(f"{proxy.url}/x", headers={"Host": host}) as reply:
                assert reply.status == 200
                assert await reply.text() == secret
