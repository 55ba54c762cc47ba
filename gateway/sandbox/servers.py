"""Run ASGI apps on free loopback ports inside the current event loop (sandbox and tests)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from gateway.http_deadlines import with_header_deadline
from gateway.ws_select import server_ws_protocol

# The gateway's own limit on a WebSocket message: Twilio frames are ~300 bytes, so 64 KiB
# leaves room for `start` with large custom parameters and refuses anything absurd.
WS_MAX_SIZE = 64 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The cyclic garbage collector's generation-0 threshold. A call allocates a few tracked objects
# per frame (futures, dicts, frames) at 200 frames a second, so CPython's default of 700 runs a
# young collection several hundred times a second at 100 calls; 20,000 runs it ~25 times as
# rarely for at most a few MiB more of young objects. Nothing per frame makes cycles.
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """For a long-running server: move what start-up built (modules, settings, the app) out of
    the collector's sight, so the rare full collection walks live calls only (a full walk of
    everything loaded took milliseconds, which showed up as latency), and collect young
    objects in larger batches. Call once, after start-up's imports."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def uvicorn_config(app: Any, host: str, port: int, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": None,  # structlog owns logging
        "access_log": False,
        "ws": server_ws_protocol(),  # the fast path, or uvicorn's own if it would not fit
        "ws_max_size": WS_MAX_SIZE,
        "ws_ping_interval": None,  # Twilio does not answer pings; its stream has its own liveness
        "timeout_graceful_shutdown": 10,
        "lifespan": "on",
    }
    options.update(overrides)
    # Whichever HTTP implementation is picked (cli picks httptools), headers get a deadline.
    options["http"] = with_header_deadline(options.get("http", "auto"))
    return uvicorn.Config(app, **options)


@contextlib.asynccontextmanager
async def serve(app: Any, port: int | None = None, **overrides: Any) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 until the block exits; yields its http:// origin."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, **overrides))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # raises the start-up error
                raise RuntimeError("server stopped during start-up")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
