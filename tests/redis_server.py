"""Throwaway Redis for tests: a private `redis-server` on a free port, and a cuttable TCP proxy.

    with RedisServer() as server:          # or RedisServer(port).start() ... .stop()
        registry = RedisRegistry(server.url)
        server.stop(); server.start()      # an outage; same port, data lost (no persistence)

    proxy = await TcpProxy(server.port).start()   # registry -> proxy -> redis
    await proxy.cut(); await proxy.restore()      # an outage where Redis keeps its data

Never touches port 6379 or a server someone started by hand. The `redis_server` fixture
(session scope) yields a started RedisServer and fails the test when redis-server is absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from types import TracebackType

import pytest

DEFAULT_BINARY = "/usr/bin/redis-server"
FORBIDDEN_PORTS = frozenset({6379})


def redis_binary() -> str | None:
    """Path of redis-server, or None when it is not installed."""
    if os.access(DEFAULT_BINARY, os.X_OK):
        return DEFAULT_BINARY
    return shutil.which("redis-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in FORBIDDEN_PORTS:
            return port


def _pings(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server child process: `--save "" --appendonly no --bind 127.0.0.1 --port N`.

    The port is chosen once (free at construction unless given) and kept across stop/start, so a
    test can take Redis away and bring it back where clients expect it. Data does not survive a
    restart.
    """

    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        if port in FORBIDDEN_PORTS:
            raise ValueError(f"port {port} is reserved for real servers; tests never use it")
        self.binary = binary or redis_binary()
        if self.binary is None:
            raise FileNotFoundError("redis-server is not installed")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="redis-test-")
        self._log = os.path.join(self._dir.name, "redis.log")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 5.0) -> RedisServer:
        """Start (or restart) on self.port; returns once the server answers PING."""
        if self.running:
            return self
        if _pings(self.port):
            raise RuntimeError(f"something else already answers on port {self.port}")
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", self._dir.name,
            "--logfile", self._log, "--daemonize", "no",
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _pings(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server and wait for it; a no-op when it is not running."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError), open(self._log, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
        return ""

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, running={self.running})"


class TcpProxy:
    """An asyncio TCP relay on 127.0.0.1 to a local port. `cut()` drops every connection and
    refuses new ones (the far side keeps its state); `restore()` listens again on the same port."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpProxy:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    restore = start

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    close = cut

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pipe(reader, up_writer))
                tg.create_task(self._pipe(up_reader, writer))
        except (OSError, ExceptionGroup, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(task)
            for w in (writer, up_writer):
                if w is not None:
                    w.transport.abort()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        raise ConnectionResetError("peer closed")  # end the other direction too


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server for the whole session (tests isolate themselves with key prefixes)."""
    if redis_binary() is None:
        # scripts/test.sh installs it; a missing server must fail the run, not skip it quietly.
        pytest.fail(f"redis-server not installed ({DEFAULT_BINARY} missing): run scripts/test.sh")
    with RedisServer() as server:
        yield server
