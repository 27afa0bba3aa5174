"""The access log writer: one preformatted JSON line per request onto stdout, off the event loop.

`logging` costs a LogRecord, handler locks and a formatter per line (about 5% of the loop under
load), and a plain write to a full stdout pipe would stall every request. Here the loop only
appends a ready line to a deque; a daemon thread batches whatever is pending into one write.
When stdout cannot keep up, lines beyond `max_pending` are dropped and counted, never queued
without bound and never waited for.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, BinaryIO

MAX_PENDING_LINES = 10_000
"""Lines waiting for stdout beyond which new ones are dropped (and counted)."""
BATCH_DELAY_S = 0.01
"""How long the thread lets lines gather once woken: one wakeup and one write per batch rather
than per line, so it rarely contends with the event loop for the GIL."""

_ENCODER = json.JSONEncoder(separators=(",", ":"))
"""Built once: `json.dumps` with custom separators makes a new encoder on every call."""


def encode_line(entry: dict[str, Any]) -> str:
    """One JSON object on one line (control characters and non-ASCII escaped)."""
    return _ENCODER.encode(entry)


class AccessLogWriter:
    """Buffered, never-blocking writer of access log lines; `flush`/`close` drain it (blocking)."""

    def __init__(
        self,
        stream: BinaryIO | None = None,
        *,
        on_drop: Callable[[int], None] = lambda count: None,
        max_pending: int = MAX_PENDING_LINES,
    ) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._on_drop = on_drop
        self._max_pending = max_pending
        self._pending: deque[str] = deque()
        self._wake = threading.Event()
        self._write_lock = threading.Lock()
        """One writer at a time (the thread, or `flush`), so lines never interleave or reorder."""
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dropped = 0

    def write(self, line: str) -> None:
        """Queue one line (without its newline); called on the event loop, returns at once."""
        if len(self._pending) >= self._max_pending:
            self._dropped(1)
            return
        self._pending.append(line)
        if not self._wake.is_set():
            if self._thread is None:
                self._start()
            self._wake.set()

    def flush(self) -> None:
        """Write everything pending now, on the calling thread (blocks while stdout does)."""
        with self._write_lock:
            self._drain()

    def close(self, timeout: float = 5.0) -> None:
        """Drain and stop the thread (blocking: call from a worker thread); a later `write` restarts it.
        A stdout that stays stuck for `timeout` keeps the thread and whatever it still holds."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        thread.join(timeout)
        if thread.is_alive():
            return
        self._thread, self._stopping = None, False
        self._wake.clear()  # a line written meanwhile is drained just below, or restarts the thread
        self.flush()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outrigger-access-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if not self._stopping:
                time.sleep(BATCH_DELAY_S)  # meanwhile the event stays set: writers skip `set()`
            self._wake.clear()  # before draining: a line appended from now on sets it again
            self.flush()
            if self._stopping:
                return

    def _drain(self) -> None:
        pending = self._pending
        batch: list[str] = []
        while pending:
            batch.append(pending.popleft())
        if not batch:
            return
        batch.append("")
        try:
            self._stream.write("\n".join(batch).encode())
            self._stream.flush()
        except (OSError, ValueError):  # stdout closed or broken: the lines are lost, and counted
            self._dropped(len(batch) - 1)

    def _dropped(self, count: int) -> None:
        self.dropped += count
        self._on_drop(count)
