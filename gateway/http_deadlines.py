"""uvicorn's HTTP protocols with a deadline on a request's headers.

uvicorn (0.55, httptools and h11 alike) arms no timer while a request's headers arrive: its
keep-alive timeout runs only between requests and stops at the first byte, and a new connection
gets none. A client that connects and sends nothing, or trickles its headers a byte a second,
holds the connection for as long as it likes. Here each connection must complete a request's
headers within HEADER_TIMEOUT_S of being opened (the first request) or of the first byte of the
request (later ones); past that it gets a 408 and is closed. Bodies have their own deadline,
`gateway.http.bodies.BODY_READ_TIMEOUT_S`, kept by the handlers that read them.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import structlog
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = structlog.get_logger(__name__)

# Twilio and the agents' tools send their headers in one write; ten seconds is far beyond any
# real client, and short enough that a trickling one gains little.
HEADER_TIMEOUT_S = 10.0

_TIMEOUT_BODY = b"request headers not received in time\n"
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _TIMEOUT_BODY
)


class _HeaderDeadline:
    """Mixed in before one of uvicorn's HTTP protocols (it uses their `loop`, `transport`,
    `cycle`: the request in flight, replaced as soon as the next one's headers are in)."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any
    _timer: asyncio.TimerHandle | None = None
    _armed_for: Any = None  # the cycle when the timer was armed: another one means headers came
    _heard = False  # a byte of the awaited request has come

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def data_received(self, data: bytes) -> None:
        awaiting = self.cycle is None or self.cycle.response_complete
        if awaiting:
            if self._timer is None:
                self._arm()  # the first byte of a later request
            self._heard = True
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not self._armed_for:
            self._disarm()

    def handle_websocket_upgrade(self, *args: Any) -> None:
        self._disarm()  # the socket is the WebSocket protocol's from here on
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._armed_for, self._heard = self.cycle, False
        self._timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        transport = self.transport
        if self.cycle is not self._armed_for or transport.is_closing():
            return  # the headers came (a pipelined request's), or the socket is closing
        if transport.get_protocol() is not self:
            return  # upgraded: the WebSocket protocol's now
        if self._heard:  # a connection that never said anything is closed without a word
            log.warning("http_headers_timeout", client=_peer(transport), timeout_s=HEADER_TIMEOUT_S)
            transport.write(TIMEOUT_RESPONSE)
        transport.close()


def _peer(transport: asyncio.Transport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else ""


@functools.cache
def with_header_deadline(http: str | type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """uvicorn's `http` option ("auto", "h11", "httptools" or a class) with the deadline added.
    A protocol other than uvicorn's HTTP/1.1 two (HTTP/2's) is returned as it is."""
    base = import_from_string(HTTP_PROTOCOLS.get(http, http)) if isinstance(http, str) else http
    if not issubclass(base, HttpToolsProtocol | H11Protocol) or issubclass(base, _HeaderDeadline):
        return base
    return type(f"HeaderDeadline{base.__name__}", (_HeaderDeadline, base), {})
