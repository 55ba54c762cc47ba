"""A round-robin TCP load balancer on loopback, for instances that share one PUBLIC_URL.

Each new connection goes to the next backend that is ready (its /readyz answered 200 at the
last check, every 0.1 s) and accepts it; a draining or dead backend gets none, as a platform's
router does. Connections already open stay where they are. TCP-level, so WebSockets pass
through.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import aiohttp

from tests.redis_server import TcpProxy, free_port


class LoadBalancer:
    def __init__(self, backend_ports: list[int]) -> None:
        self.backends = backend_ports
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._turn = itertools.count()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.ready: set[int] = set(backend_ports)  # until the first check says otherwise
        self._checker: asyncio.Task[None] | None = None

    async def start(self) -> LoadBalancer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self._checker = asyncio.create_task(self._check_readiness())
        return self

    async def _check_readiness(self) -> None:
        timeout = aiohttp.ClientTimeout(total=0.5)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                for port in self.backends:
                    ok = False
                    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                        async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                            ok = resp.status == 200
                    (self.ready.add if ok else self.ready.discard)(port)
                await asyncio.sleep(0.1)

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        first = next(self._turn)
        for i in range(len(self.backends)):
            port = self.backends[(first + i) % len(self.backends)]
            if port not in self.ready:
                continue
            try:
                return await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
        raise OSError("no backend is up")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await self._connect()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(TcpProxy._pipe(reader, up_writer))
                tg.create_task(TcpProxy._pipe(up_reader, writer))
        except (OSError, ExceptionGroup, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(task)
            for w in (writer, up_writer):
                if w is not None:
                    w.transport.abort()
