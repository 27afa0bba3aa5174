"""The reverse proxy a Python user would write with aiohttp: the benchmark's reference.

Stock asyncio, one shared ClientSession, the response body streamed back chunk by chunk,
no decompression. Deliberately plain: no tuning, no policies.

    python bench/naive_proxy.py --port 8000 --upstream http://127.0.0.1:8080
"""

import argparse
from collections.abc import AsyncIterator

from aiohttp import ClientSession, web
from multidict import CIMultiDict, CIMultiDictProxy

SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


def without_hop_by_hop(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


async def proxy(request: web.Request) -> web.StreamResponse:
    headers = without_hop_by_hop(request.headers)
    headers.popall("Host", None)
    session = request.app[SESSION]
    body = request.content if request.body_exists else None
    url = request.app[UPSTREAM] + request.path_qs
    async with session.request(request.method, url, headers=headers, data=body) as upstream:
        response = web.StreamResponse(status=upstream.status, headers=without_hop_by_hop(upstream.headers))
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(64 * 1024):
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    async with ClientSession(auto_decompress=False) as session:
        app[SESSION] = session
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8080")
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
