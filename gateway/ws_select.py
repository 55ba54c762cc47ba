"""Which WebSocket protocol the server runs: the fast path (`gateway.ws_protocol`) when uvicorn's
internals are the ones it was written for, else uvicorn's stock protocol and one warning.

The fast path subclasses uvicorn's websockets-sansio protocol and reaches into its state (the
message queue, `frames`, `read_paused`, `disconnected`, ...). Those are not a public API: uvicorn
0.35 to 0.52.0 lack `disconnected` (every call died at its first audio frame), before 0.35 the
module does not exist. So at start-up the fast path is checked against the uvicorn installed: a
known-good version, then each attribute and method it relies on, by name and shape. Anything
amiss and the server runs uvicorn's own protocol, slower but correct, and says so once.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import inspect
import re
from collections.abc import Iterator
from types import CodeType

import structlog
from uvicorn.config import WS_PROTOCOLS

log = structlog.get_logger(__name__)

# The first uvicorn whose websockets-sansio protocol has everything the fast path uses (0.52.1
# added `disconnected`, and the dropping of messages after `websocket.close` the fast path copies).
FAST_PATH_SINCE = (0, 52, 1)
# uvicorn's protocol the fast path derives from: the fallback, where this uvicorn has it.
STOCK = "websockets-sansio"

# Names each method of uvicorn's protocol must use (assign or read) for the fast path to fit.
USES: dict[str, frozenset[str]] = {
    "__init__": frozenset(
        {
            "queue",
            "frames",
            "curr_msg_data_type",
            "handshake_complete",
            "handshake_initiated",
            "initial_response",
            "close_sent",
            "writable",
            "conn",
            "read_paused",
            "disconnected",
            "config",
            "logger",
            "loop",
        }
    ),
    "connection_made": frozenset({"transport"}),
    "connection_lost": frozenset({"disconnected"}),
    "handle_text": frozenset({"frames", "curr_msg_data_type", "send_receive_event_to_app"}),
    "handle_bytes": frozenset({"frames", "curr_msg_data_type", "send_receive_event_to_app"}),
    "handle_cont": frozenset({"frames"}),
    # The fast path's Inbox stands in for the queue, and its reads pause as `receive` expects.
    "receive": frozenset({"queue", "read_paused", "resume_reading"}),
}
# Methods the fast path overrides or calls, and their parameters.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "data_received": ("self", "data"),
    "send": ("self", "message"),
    "send_receive_event_to_app": ("self",),
    "handle_parser_exception": ("self",),
}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def _names(code: CodeType) -> Iterator[str]:
    """The attribute and global names a function's code uses, nested code (comprehensions) too."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _names(const)


def _code_of(cls: type, method: str) -> CodeType | None:
    func = inspect.getattr_static(cls, method, None)
    func = getattr(func, "__func__", func)  # staticmethod or classmethod
    return getattr(inspect.unwrap(func), "__code__", None) if callable(func) else None


def fast_path_mismatches() -> list[str]:
    """What keeps the fast path off with the uvicorn (and websockets) installed; [] if nothing."""
    uvicorn_version = _version("uvicorn")
    if _release(uvicorn_version) < FAST_PATH_SINCE:
        since = ".".join(map(str, FAST_PATH_SINCE))
        return [f"uvicorn {uvicorn_version} is older than {since}"]
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

        from gateway.ws_protocol import FastPathWebSocketProtocol
    except ImportError as exc:
        return [f"cannot import the fast path: {exc}"]
    problems: list[str] = []
    for method, needed in USES.items():
        code = _code_of(WebSocketsSansIOProtocol, method)
        if code is None:
            problems.append(f"no {method}()")
            continue
        missing = needed - set(_names(code))
        if missing:
            problems.append(f"{method}() does not use {', '.join(sorted(missing))}")
    for method, params in SIGNATURES.items():
        func = getattr(WebSocketsSansIOProtocol, method, None)
        if not callable(func):
            problems.append(f"no {method}()")
        elif tuple(inspect.signature(func).parameters) != params:
            problems.append(f"{method}() takes ({', '.join(inspect.signature(func).parameters)})")
    if not inspect.iscoroutinefunction(getattr(WebSocketsSansIOProtocol, "send", None)):
        problems.append("send() is not a coroutine function")
    # The fast path replaces send_receive_event_to_app whole: uvicorn's must do nothing it does not.
    stock = _code_of(WebSocketsSansIOProtocol, "send_receive_event_to_app")
    ours = _code_of(FastPathWebSocketProtocol, "send_receive_event_to_app")
    if stock is not None and ours is not None:
        unknown = set(_names(stock)) - set(_names(ours))
        if unknown:
            problems.append(f"send_receive_event_to_app() now uses {', '.join(sorted(unknown))}")
    return problems


def stock_ws_protocol() -> str:
    """uvicorn's own protocol to fall back on: websockets-sansio where it exists."""
    return STOCK if STOCK in WS_PROTOCOLS else "auto"


@functools.cache
def server_ws_protocol() -> type[asyncio.Protocol] | str:
    """The `ws` option for uvicorn: decided, and a fallback warned about, once per process."""
    problems = fast_path_mismatches()
    if not problems:
        from gateway.ws_protocol import FastPathWebSocketProtocol

        return FastPathWebSocketProtocol
    stock = stock_ws_protocol()
    log.warning(
        "websocket_fast_path_off",
        reason="; ".join(problems),
        uvicorn=_version("uvicorn"),
        websockets=_version("websockets"),
        using=f"uvicorn's {stock} WebSocket protocol",
        hint="calls work; for the fast path install the versions in requirements.txt",
    )
    return stock
