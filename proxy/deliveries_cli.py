"""`outrigger deliveries list|show|retry`: the admin API's /deliveries, for people at a terminal.

Talks to a running Outrigger over HTTP (stdlib urllib: one short request, no event loop); the
address is ``--admin URL``, else the ``admin`` listener of ``-c CONFIG``, else the default.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from proxy.config.defaults import ADMIN_LISTEN_HOST, ADMIN_LISTEN_PORT
from proxy.config.loader import ConfigError, load_config

DEFAULT_ADMIN_URL = f"http://{ADMIN_LISTEN_HOST}:{ADMIN_LISTEN_PORT}"
TIMEOUT_S = 10.0
_COLUMNS = ("ID", "STATE", "SOURCE", "METHOD", "PATH", "ATTEMPTS", "LAST", "CREATED")


def admin_url(admin: str | None, config: str | None) -> str:
    if admin:
        return admin.rstrip("/")
    if config:
        address = load_config(config).main.admin
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"http://{host}:{address.port}"
    return DEFAULT_ADMIN_URL


def _request(method: str, url: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except ValueError:
            return error.code, {"error": {"message": body.decode(errors="replace")}}


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _last(view: dict[str, Any]) -> str:
    status, error = view.get("last_status"), view.get("last_error")
    parts = [str(status)] if status is not None else []
    if error:
        parts.append(str(error))
    return " ".join(parts) or "-"


def table(views: list[dict[str, Any]]) -> str:
    """Aligned columns, one delivery per line (the last column may run long)."""
    rows = [
        (
            v["id"],
            v["state"],
            v["source"],
            v["method"],
            v["path"],
            str(v["attempts"]),
            _last(v),
            _when(v["created_at"]),
        )
        for v in views
    ]
    widths = [max(len(row[i]) for row in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [_COLUMNS, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def details(view: dict[str, Any]) -> str:
    """One delivery, one field per line."""
    fields = [
        ("id", view["id"]),
        ("state", view["state"]),
        ("source", f"{view['source']} ({view['kind']})"),
        ("request", f"{view['method']} {view['host']}{view['path']}"),
        ("attempts", view["attempts"]),
        ("last outcome", _last(view)),
        ("created", _when(view["created_at"])),
        ("last attempt", _when(view["last_attempt_at"])),
        ("next attempt", _when(view["next_attempt_at"])),
        ("finished", _when(view["finished_at"])),
        ("expires", _when(view["expires_at"])),
    ]
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in fields)


def deliveries_command(
    action: str, delivery_id: str | None, state: str | None, admin: str | None, config: str | None
) -> int:
    """Exit 0 on success, 1 when the admin API refuses (unknown id, not dead), 2 when unreachable."""
    try:
        base = admin_url(admin, config)
    except ConfigError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 2
    try:
        if action == "list":
            status, body = _request("GET", f"{base}/deliveries" + (f"?state={state}" if state else ""))
        elif action == "show":
            status, body = _request("GET", f"{base}/deliveries/{delivery_id}")
        else:
            status, body = _request("POST", f"{base}/deliveries/{delivery_id}/retry")
    except (urllib.error.URLError, OSError) as error:
        print(f"error: cannot reach the admin API at {base}: {error}", file=sys.stderr)
        return 2
    if status != 200:
        message = (body or {}).get("error", {}).get("message", f"HTTP {status}")
        print(f"error: {message}", file=sys.stderr)
        return 1
    if action == "list":
        views = body["deliveries"]
        print(table(views) if views else "no deliveries" + (f" in state {state}" if state else ""))
    elif action == "show":
        print(details(body))
    else:
        print(f"delivery {body['id']} is pending again (due now)")
    return 0
