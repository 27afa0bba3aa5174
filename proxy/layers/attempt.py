"""One attempt: the policy's header rules (with rendered secrets) and the per_try timeout."""

from __future__ import annotations

import asyncio
from pathlib import Path

from proxy import errors, secrets
from proxy.config.model import HeaderRules
from proxy.config.units import format_duration
from proxy.exchange import Handler, ProxyRequest, ProxyResponse


class AttemptLayer:
    def __init__(self, per_try: float, headers: HeaderRules, base_dir: Path) -> None:
        self.per_try = per_try
        self.remove = headers.remove
        self.set = tuple((name, secrets.render(value, base_dir)) for name, value in headers.set.items())

    async def __call__(self, request: ProxyRequest, next: Handler) -> ProxyResponse:
        for name in self.remove:
            request.headers.popall(name, None)
        for name, value in self.set:
            request.headers[name] = value
        request.attempts += 1
        try:
            async with asyncio.timeout(self.per_try):
                return await next(request)
        except TimeoutError:
            raise errors.AttemptTimeout(
                f"no response head within per_try {format_duration(self.per_try)}"
            ) from None
