"""A standalone upstream for the streaming memory test (runs as its own process).

    python -m tests.e2e.stream_upstream --port PORT

- ``GET /download?size=N`` streams N bytes of `pattern` without holding more than one block
  (with Content-Length; add ``&chunked`` for a chunked body).
- ``POST|PUT /upload?stall_after=N&stall=S`` drains the body chunk by chunk (stopping to read for S
  seconds once N bytes arrived, to push back on the sender) and answers ``{"bytes": n, "sha256": hex}``.
- ``GET /health`` answers ``ok``.

The byte pattern is deterministic, so the test can compute the expected hash on its side.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import struct
from collections.abc import Iterator

from aiohttp import web

BLOCK_SIZE = 64 * 1024
_BASE = random.Random(20261124).randbytes(BLOCK_SIZE)


def pattern(size: int) -> Iterator[bytes]:
    """`size` bytes in blocks of BLOCK_SIZE; each block starts with its index, so a lost or repeated block
    changes the hash."""
    index = 0
    remaining = size
    while remaining > 0:
        block = struct.pack(">Q", index) + _BASE[8:]
        yield block[:remaining]
        remaining -= len(block)
        index += 1


async def download(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("size", "0"))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if "chunked" not in request.query:  # ?chunked: no Content-Length, the size is known only at the end
        response.content_length = size
    await response.prepare(request)
    for block in pattern(size):
        await response.write(block)  # waits for the socket to drain: nothing piles up here
    await response.write_eof()
    return response


async def upload(request: web.Request) -> web.Response:
    stall_after = int(request.query.get("stall_after", "-1"))
    stall = float(request.query.get("stall", "0"))
    digest = hashlib.sha256()
    count = 0
    async for chunk in request.content.iter_chunked(BLOCK_SIZE):
        digest.update(chunk)
        count += len(chunk)
        if 0 <= stall_after <= count:
            stall_after = -1
            await asyncio.sleep(stall)  # a slow upstream: the proxy must stop reading from the app
    return web.json_response({"bytes": count, "sha256": digest.hexdigest()})


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def build_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/download", download)
    app.router.add_route("POST", "/upload", upload)
    app.router.add_route("PUT", "/upload", upload)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(build_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
