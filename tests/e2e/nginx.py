"""A real nginx (the Debian package's binary) on loopback, for differential transport tests.

Every `Nginx` is our own: its config, pid file, logs and temp paths live in a
directory of its own, it runs in the foreground (``daemon off;``) and listens
only on 127.0.0.1 ports handed out by `free_port`. It never touches port 80
or the system's nginx. A missing binary is an error with a clear message,
never a silent skip: the tests that need nginx are part of the suite.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

NGINX_BINARY = "/usr/sbin/nginx"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0

_COMMON = """\
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format conn '$connection $connection_requests "$request" $status';
    access_log {tmp}/access.log conn;
    client_body_temp_path {tmp}/tmp/client;
    proxy_temp_path {tmp}/tmp/proxy;
    fastcgi_temp_path {tmp}/tmp/fastcgi;
    uwsgi_temp_path {tmp}/tmp/uwsgi;
    scgi_temp_path {tmp}/tmp/scgi;
    types {{ text/plain txt; text/html html; application/octet-stream bin; }}
    default_type application/octet-stream;
{servers}
}}
"""


def nginx_binary() -> str:
    """The nginx to run: /usr/sbin/nginx (Debian's), else one on PATH; a clear error if none."""
    if os.access(NGINX_BINARY, os.X_OK):
        return NGINX_BINARY
    found = shutil.which("nginx")
    if found:
        return found
    raise RuntimeError(
        f"nginx is required by the differential transport tests but neither {NGINX_BINARY} nor an "
        "nginx on PATH exists: apt-get install nginx (.ci/run does this; it never starts a system nginx)"
    )


def _answers(port: int) -> bool:
    """True when 127.0.0.1:`port` accepts a connection and answers an HTTP request."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"GET /__ready HTTP/1.1\r\nHost: ready.test\r\nConnection: close\r\n\r\n")
            return sock.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


class Nginx:
    """One nginx process. Put files to serve in `www` (`write`), then `start` with the
    ``server { ... }`` blocks (plain nginx text) and the ports they listen on: it waits until
    every port answers. `stop` ends the process and removes its directory."""

    def __init__(self) -> None:
        self.binary = nginx_binary()
        # Not under pytest's tmp dirs (0700): nginx workers run as an unprivileged user when
        # started by root, and must be able to read what they serve.
        self.tmp = Path(tempfile.mkdtemp(prefix="outrigger-nginx-"))
        self.tmp.chmod(0o755)
        self.www = self.tmp / "www"
        self.www.mkdir(mode=0o755)
        (self.tmp / "tmp").mkdir()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        return self.tmp / "nginx.conf"

    @property
    def access_log(self) -> Path:
        return self.tmp / "access.log"

    @property
    def error_log(self) -> Path:
        return self.tmp / "error.log"

    def write(self, name: str, data: bytes) -> Path:
        """A file nginx serves as ``/name`` (readable by its workers)."""
        path = self.www / name
        path.write_bytes(data)
        path.chmod(0o644)
        return path

    def _command(self, *extra: str) -> list[str]:
        return [self.binary, "-p", f"{self.tmp}/", "-e", str(self.error_log), "-c", str(self.conf), *extra]

    def _log_tail(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no error log)"

    def start(self, servers: str, ports: Sequence[int]) -> Nginx:
        self.conf.write_text(_COMMON.format(tmp=self.tmp, servers=servers))
        check = subprocess.run(self._command("-t", "-q"), capture_output=True, timeout=30, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t rejected {self.conf}:\n{check.stderr.decode(errors='replace')}")
        out = (self.tmp / "nginx.out").open("wb")
        try:
            self._process = subprocess.Popen(
                self._command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            out.close()
        deadline = time.monotonic() + START_TIMEOUT
        waiting = list(ports)
        while waiting:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"nginx exited with {self._process.returncode} while starting:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not answer on {waiting} within {START_TIMEOUT}s")
            if _answers(waiting[0]):
                waiting.pop(0)
            else:
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown, workers included), SIGKILL to its session if it lingers."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: the master and any lingering worker
                process.wait(STOP_TIMEOUT)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def access_lines(self) -> list[str]:
        """The access log so far (one line per request: connection serial, request number on
        that connection, request line, status). nginx writes each line as the request ends."""
        try:
            return self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return []
