"""The app-facing side of Outrigger (aiohttp's HTTP/1.1 server).

    lifecycle.py  listeners (main and per-policy ports), start, reload swap, drain
    handler.py    one request: entry -> the policy's pipeline -> response, with telemetry
    entry.py      the three entry modes: an aiohttp request becomes a ProxyRequest
    respond.py    streaming the response back; Outrigger's own error responses
    protocol.py   aiohttp's server answering parser refusals with our error bodies
    runtime.py    everything derived from one config, swapped whole on reload

Every request takes one snapshot of the current `Runtime`, so a reload never
changes a request halfway.
"""

from proxy.server.lifecycle import ProxyServer, ShuttingDown
from proxy.server.runtime import Runtime

__all__ = ["ProxyServer", "Runtime", "ShuttingDown"]
