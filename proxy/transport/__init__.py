"""Our HTTP/1.1 client for the upstream leg (asyncio protocols parsed by httptools).

client.py      one attempt: resolve + check, pooled connection, request written as sent
resolver.py    DNS answers with their SSRF verdicts, cached together
pool.py        idle connections keyed by (address, port, TLS context, SNI), capped, expiring
connection.py  the protocol: response head and body, flow control, no resends
failures.py    every transport failure as an error of our family (SPEC 5)
"""

from proxy.transport.client import UpstreamClient

__all__ = ["UpstreamClient"]
