"""A throwaway nginx running the proxy configuration that compose ships, for tests.

    with NginxServer([port_a, port_b]) as nginx:    # nginx -p <temp dir>, daemon off
        nginx.url                                   # https://127.0.0.1:<free port>
        nginx.ssl_context()                         # trusts its self-signed certificate
        nginx.access_log()                          # one dict per finished request

`shipped_config` reads deploy/nginx/line-gateway.conf and substitutes only what differs on this
machine: the upstream servers (loopback ports instead of compose's service names), the listen
address and the certificate paths. Each substitution must match the shipped file exactly as
many times as expected, so the file cannot drift away from what the test runs. The wrapper
config around it (pid, logs, temp paths, an access log naming the upstream) is the test's own,
as the nginx image's nginx.conf is in compose. Never binds port 443 or reads /etc/nginx.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import pytest

from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONF = ROOT / "deploy" / "nginx" / "line-gateway.conf"
DEFAULT_BINARY = "/usr/sbin/nginx"
# The fields of the wrapper's access log, tab-separated: what the tests assert on.
LOG_FIELDS = ("method", "uri", "status", "upstream", "host", "upgrade")


def nginx_binary() -> str | None:
    if os.access(DEFAULT_BINARY, os.X_OK):
        return DEFAULT_BINARY
    return shutil.which("nginx")


def require_tools() -> str:
    """nginx's path; fails the test (never skips it) when nginx or openssl is missing."""
    binary = nginx_binary()
    if binary is None or shutil.which("openssl") is None:
        # scripts/test.sh installs both from Debian; a missing one must fail the run.
        pytest.fail("nginx or openssl is not installed: run scripts/test.sh")
    return binary


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A one-day certificate for 127.0.0.1 and localhost, with openssl's CLI: (cert, key)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def _substitute(text: str, pattern: str, replacement: str, count: int) -> str:
    new, found = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if found != count:
        raise AssertionError(f"{SHIPPED_CONF.name}: expected {count} match(es) of {pattern!r}, found {found}")
    return new


def shipped_config(upstream_ports: list[int], listen_port: int, cert: Path, key: Path) -> str:
    """deploy/nginx/line-gateway.conf with this machine's addresses and certificate."""
    text = SHIPPED_CONF.read_text()
    servers = re.findall(r"^\s*server gateway-\d+:8080 .*;$", text, flags=re.MULTILINE)
    if len(servers) != len(upstream_ports):
        raise AssertionError(f"the shipped upstream has {len(servers)} servers, not {len(upstream_ports)}")
    for i, port in enumerate(upstream_ports, start=1):
        # `resolve` re-resolves compose's service names; loopback addresses need none (and
        # Debian 12's nginx 1.22 predates it in open source).
        pattern = rf"^(\s*server )gateway-{i}:8080( [^;\n]*?)( resolve)?;$"
        text = _substitute(text, pattern, rf"\g<1>127.0.0.1:{port}\g<2>;", 1)
    text = _substitute(text, r"^(\s*listen )443 ssl;$", rf"\g<1>127.0.0.1:{listen_port} ssl;", 1)
    text = _substitute(text, r"^(\s*ssl_certificate\s+)\S+;$", rf"\g<1>{cert};", 1)
    return _substitute(text, r"^(\s*ssl_certificate_key\s+)\S+;$", rf"\g<1>{key};", 1)


def _wrapper(directory: Path, site: Path) -> str:
    log_format = "\\t".join(
        ["$request_method", "$uri", "$status", "$upstream_addr", "$http_host", "$http_upgrade"]
    )
    temp = "\n".join(
        f"    {kind}_temp_path {directory / (kind + '_temp')};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} info;
events {{ worker_connections 512; }}
http {{
    log_format line_gateway_test '{log_format}';
    access_log {directory / "access.log"} line_gateway_test;
{temp}
    include {site};
}}
"""


class NginxServer:
    """nginx in the foreground (`daemon off`) in front of loopback `upstream_ports`, with its
    prefix, configuration, certificate and logs in a temporary directory of its own."""

    def __init__(self, upstream_ports: list[int], port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary or require_tools()
        self.port = port or free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.directory = Path(tempfile.mkdtemp(prefix="nginx-test-"))
        # When the tests run as root, nginx's workers run as an unprivileged user: let them in.
        self.directory.chmod(0o755)
        self.site = self.directory / "line-gateway.conf"
        try:
            self.cert, self.key = self_signed_certificate(self.directory)
            self.site.write_text(shipped_config(upstream_ports, self.port, self.cert, self.key))
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self.conf = self.directory / "nginx.conf"
        self.conf.write_text(_wrapper(self.directory, self.site))
        self._proc: subprocess.Popen[bytes] | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this server's certificate (and verifies it)."""
        return ssl.create_default_context(cafile=str(self.cert))

    def _args(self, *extra: str) -> list[str]:
        error_log = str(self.directory / "error.log")
        return [self.binary, "-p", str(self.directory), "-c", str(self.conf), "-e", error_log, *extra]

    def start(self, timeout: float = 10.0) -> NginxServer:
        check = subprocess.run(self._args("-t"), capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t refused the configuration:\n{check.stderr}")
        self._proc = subprocess.Popen(self._args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not start on port {self.port}:\n{self.error_log()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # fast shutdown: open WebSockets are cut
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def error_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / "error.log").read_text(errors="replace")[-4000:]
        return ""

    def access_log(self) -> list[dict[str, str]]:
        """One dict per finished request (nginx logs a WebSocket when it closes), LOG_FIELDS."""
        path = self.directory / "access.log"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [dict(zip(LOG_FIELDS, line.split("\t"), strict=True)) for line in lines]

    def __enter__(self) -> NginxServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
