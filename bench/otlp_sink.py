"""A local OTLP/HTTP trace sink for the benchmark: accepts POST /v1/traces, answers 200.

Counts export requests, bytes and spans; GET /stats returns them as JSON. Listens on 127.0.0.1 only.

    python bench/otlp_sink.py --port 4318
"""

import argparse
import gzip

from aiohttp import web

# opentelemetry-proto comes with Outrigger's OTLP exporter dependency.
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

STATS = web.AppKey("stats", dict[str, int])


def count_spans(payload: bytes) -> int:
    message = ExportTraceServiceRequest.FromString(payload)
    return sum(len(scope.spans) for resource in message.resource_spans for scope in resource.scope_spans)


async def traces(request: web.Request) -> web.Response:
    payload = await request.read()
    if request.headers.get("Content-Encoding") == "gzip":
        payload = gzip.decompress(payload)
    stats = request.app[STATS]
    stats["requests"] += 1
    stats["bytes"] += len(payload)
    stats["spans"] += count_spans(payload)
    return web.Response(body=b"", content_type="application/x-protobuf")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATS] = {"requests": 0, "bytes": 0, "spans": 0}
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
