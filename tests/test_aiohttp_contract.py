"""aiohttp internals Outrigger relies on (the upstream leg, proxy/transport/, uses none).

proxy/server/protocol.py and respond.py subclass aiohttp's `RequestHandler`, `web.Server` and
`web.StreamResponse` and reach into their private parts. aiohttp may change those in any
release, so pyproject.toml pins a minor version, and these tests fail loudly, naming the
attribute, before a bump ships.
"""

from __future__ import annotations

import asyncio
import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import pytest
from aiohttp import hdrs, web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.http_parser import HttpRequestParser, HttpRequestParserPy
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_protocol import RequestHandler
from packaging.requirements import Requirement

from proxy.server.protocol import ProxyWebServer, RefusingRequestHandler
from proxy.server.respond import PassThroughResponse

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

SERVER_KWARGS = {
    "max_line_size": 4096,
    "max_field_size": 4096,
    "max_headers": 10,
    "auto_decompress": False,
    "access_log": None,
}
"""What ProxyServer.start passes through web.Server to every RequestHandler."""


def _aiohttp_requirement() -> Requirement:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in dependencies if Requirement(d).name == "aiohttp")


def _parameters(function: object) -> list[str]:
    assert callable(function)
    return list(inspect.signature(function).parameters)


def test_aiohttp_has_an_upper_bound_and_the_installed_version_is_within_it() -> None:
    requirement = _aiohttp_requirement()
    assert any(spec.operator == "<" for spec in requirement.specifier), (
        "aiohttp needs an upper bound: Outrigger uses its private attributes (see this module)"
    )
    assert requirement.specifier.contains(version("aiohttp")), (requirement, version("aiohttp"))


async def test_web_server_keeps_loop_and_handler_kwargs_as_private_attributes() -> None:
    """ProxyWebServer.__call__ builds its handler from `self._loop` and `self._kwargs`."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(handler, handler_cancellation=True, **SERVER_KWARGS)  # type: ignore[arg-type]
    assert server._loop is asyncio.get_running_loop()
    assert server._kwargs == SERVER_KWARGS
    assert server.handler_cancellation is True


def test_web_server_call_builds_a_request_handler_from_manager_loop_and_kwargs() -> None:
    source = inspect.getsource(web.Server.__call__)
    assert "RequestHandler(self, loop=self._loop, **self._kwargs)" in source


def test_request_handler_init_takes_manager_loop_and_the_server_kwargs() -> None:
    parameters = inspect.signature(RequestHandler.__init__).parameters
    assert list(parameters)[:2] == ["self", "manager"]
    assert parameters["loop"].kind is inspect.Parameter.KEYWORD_ONLY
    assert set(SERVER_KWARGS) <= set(parameters), set(SERVER_KWARGS) - set(parameters)


async def test_proxy_server_builds_our_handler_which_knows_its_manager() -> None:
    """RefusingRequestHandler.handle_error reads `self._manager` to record the refusal."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = ProxyWebServer(handler, lambda request, error: "id", header_timeout=10.0, **SERVER_KWARGS)
    built = server()
    assert isinstance(built, RefusingRequestHandler)
    assert built._manager is server
    assert "_manager" in RequestHandler.__slots__


def test_request_handler_handle_error_signature() -> None:
    """RefusingRequestHandler overrides it and calls super() with these positional arguments."""
    signature = inspect.signature(RequestHandler.handle_error)
    assert list(signature.parameters) == ["self", "request", "status", "exc", "message"]
    defaults = [p.default for p in list(signature.parameters.values())[2:]]
    assert defaults == [500, None, None]
    assert _parameters(RefusingRequestHandler.handle_error) == _parameters(RequestHandler.handle_error)


@pytest.mark.parametrize("parser", [HttpRequestParser, HttpRequestParserPy], ids=["c", "python"])
async def test_too_many_headers_is_a_bad_http_message_saying_so(parser: type[HttpRequestParserPy]) -> None:
    """handle_error tells 431 from 400 by this message (aiohttp has no exception class for it)."""
    request = parser(mock.Mock(), asyncio.get_running_loop(), 2**16, max_headers=2)
    with pytest.raises(BadHttpMessage, match=r"(?i)too many headers"):
        request.feed_data(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")


def test_stream_response_prepare_headers_is_a_private_coroutine_method() -> None:
    assert inspect.iscoroutinefunction(web.StreamResponse._prepare_headers)
    assert _parameters(web.StreamResponse._prepare_headers) == ["self"]


async def test_prepare_headers_is_where_content_type_and_server_are_invented() -> None:
    """PassThroughResponse strips exactly what `_prepare_headers` adds; both halves are checked."""
    plain = web.StreamResponse()
    await plain.prepare(make_mocked_request("GET", "/"))
    assert {hdrs.CONTENT_TYPE, hdrs.SERVER} <= set(plain.headers)
    passed = PassThroughResponse()
    await passed.prepare(make_mocked_request("GET", "/"))
    assert hdrs.CONTENT_TYPE not in passed.headers
    assert hdrs.SERVER not in passed.headers
    assert hdrs.DATE in passed.headers


def test_stream_response_sends_its_head_at_once_unless_told_otherwise() -> None:
    """PassThroughResponse.coalesce_head flips this flag (web.Response already holds its head)."""
    assert web.StreamResponse._send_headers_immediately is True
    assert web.Response._send_headers_immediately is False


def test_request_handler_set_parser_takes_a_feed_data_parser() -> None:
    """The splice hands the app's bytes after an upgrade or CONNECT to our own feed_data/feed_eof."""
    from aiohttp.web_protocol import RequestHandler

    parameters = list(inspect.signature(RequestHandler.set_parser).parameters)
    assert parameters[:2] == ["self", "parser"]


def test_request_handler_queues_parsed_messages_and_error_infos_for_start() -> None:
    """The header timeout queues an `_ErrInfo` the way data_received queues a parser error: it
    counts it in `_request_count`, appends it to `_messages` and wakes `_waiter`, and `start()`
    turns it into a call of handle_error with its status and exception."""
    from aiohttp.web_protocol import _ErrInfo

    assert {"_request_count", "_messages", "_waiter", "_force_close", "_close"} <= set(
        RequestHandler.__slots__
    )
    assert _ErrInfo(status=408, exc=ValueError("x"), message="m").status == 408
    data_received = inspect.getsource(RequestHandler.data_received)
    assert "self._request_count += 1" in data_received
    assert "self._messages.append((msg, payload))" in data_received
    assert "waiter.set_result(None)" in data_received
    start = inspect.getsource(RequestHandler.start)
    assert "isinstance(message, _ErrInfo)" in start
    assert "self._make_error_handler(message)" in start
    assert "self.handle_error(\n                request, err_info.status, err_info.exc, err_info.message" in (
        inspect.getsource(RequestHandler._make_error_handler)
    )


def test_stream_response_writes_its_status_line_in_write_headers_from_the_request_version() -> None:
    """ErrorResponse overrides `_write_headers` (and reads `_req`, `_payload_writer`) to answer in
    HTTP/1.1 whatever version the request line claimed."""
    assert inspect.iscoroutinefunction(web.StreamResponse._write_headers)
    source = inspect.getsource(web.StreamResponse._write_headers)
    assert "request = self._req" in source
    assert "writer = self._payload_writer" in source
    assert "version = request.version" in source
    assert "await writer.write_headers(status_line, self._headers)" in source
    assert "writer.send_headers()" in source
    assert web.Response._send_headers_immediately is False, "ErrorResponse relies on write_eof sending"
