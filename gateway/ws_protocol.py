"""uvicorn's websockets-sansio WebSocket protocol, with a fast path for the frames calls are made of.

A call is 50 small text frames a second each way, and in the benchmark websockets' sans-I/O
parser and serializer (generators, a Frame object per frame) were the largest share of the
server's own Python time. Here the common case skips them:

- Receiving: whole, unfragmented, masked text or binary frames within `ws_max_size` are parsed
  and unmasked (websockets' compiled `apply_mask`) here, then delivered through uvicorn's own
  `send_receive_event_to_app` (UTF-8 check, queue, read pausing: unchanged). The first frame of
  any other kind (ping, close, fragment, anything malformed or too large) and everything after
  it go to websockets, which then owns the connection's parsing for good. It is handed whole
  frames only, so its parser is at a frame boundary when it takes over.
- Sending: a text or binary message on an open connection is framed here (server frames are
  not masked) and written at once; everything else (accept, close, a full write buffer, a
  connection that is closing) goes through uvicorn unchanged.

Connections that negotiated an extension (compression) take uvicorn's path throughout.

Delivering: uvicorn pauses reading after every message and resumes it at every `receive`, a
stop and a restart of the socket's libuv watcher per frame; here reading pauses once MAX_UNREAD
messages wait unread (as uvicorn's, what one read brought is queued whole, so a slow app holds
at most MAX_UNREAD messages and one read), and the messages wait in `Inbox`, which is
asyncio.Queue less its per-call loop lookup (a getpid() per frame on Python 3.11).

One control frame (a ping, say) hands the connection's parsing to websockets for good; Twilio's
media streams send none.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import deque
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import apply_mask  # compiled where websockets' speedups are built
from websockets.protocol import State

FIN_TEXT = 0x81
FIN_BINARY = 0x82
MASKED = 0x80
LENGTH_16 = 126
LENGTH_64 = 127
_U16 = struct.Struct("!H")
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
# Messages read and not yet taken by the app before reading from the socket pauses. A call's
# socket carries 50 frames a second, so this is a third of a second of audio.
MAX_UNREAD = 16


def frame_header(opcode_byte: int, length: int) -> bytes:
    """RFC 6455 header of an unmasked (server to client), unfragmented frame."""
    if length < LENGTH_16:
        return bytes((opcode_byte, length))
    if length < 1 << 16:
        return _HEADER_16.pack(opcode_byte, LENGTH_16, length)
    return _HEADER_64.pack(opcode_byte, LENGTH_64, length)


class Inbox:
    """What uvicorn's protocol uses of asyncio.Queue (unbounded; the protocol bounds it by
    pausing the socket), for one loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[Any] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        self._wake_one()

    async def get(self) -> Any:
        while not self._items:
            getter = self._loop.create_future()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()
                with contextlib.suppress(ValueError):
                    self._getters.remove(getter)
                if self._items:  # it was woken for an item it will not take: pass it on
                    self._wake_one()
                raise
        return self._items.popleft()

    def _wake_one(self) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return


class FastPathWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox(self.loop)  # type: ignore[assignment]
        # None: not decided yet (handshake under way); then True until websockets takes over.
        self._fast: bool | None = None
        self._fast_possible = True  # False once websockets' parser has seen bytes past the request
        # The start of a frame whose rest has not arrived, and how many bytes it must reach
        # before it is worth parsing again (a frame trickled in byte by byte is copied once).
        self._partial = bytearray()
        self._need = 0

    def data_received(self, data: bytes) -> None:
        if self._fast is None:
            if not self.handshake_complete:
                self._before_handshake(data)
                return
            self._fast = (
                self._fast_possible
                and self.initial_response is None
                and self.conn.state is State.OPEN
                and not self.conn.extensions
            )
        if self._fast and not self.close_sent:
            self._receive_fast(data)
        else:
            self._to_websockets(data)

    def _before_handshake(self, data: bytes) -> None:
        # uvicorn's HTTP protocol hands over the upgrade request alone; bytes after it (frames
        # a client sent before our 101) come in later calls. websockets parses frames straight
        # after the request, so once it has had any, it may be inside a frame and must go on.
        initiated = self.handshake_initiated
        super().data_received(data)
        if initiated:
            self._fast_possible = False

    def _to_websockets(self, data: bytes) -> None:
        self._fast = False
        if self._partial:
            data = bytes(self._partial) + data
            self._partial.clear()
        if data:
            super().data_received(data)

    def _keep(self, buf: bytes, pos: int, need: int) -> None:
        self._partial[:] = memoryview(buf)[pos:]
        self._need = need

    def _receive_fast(self, data: bytes) -> None:
        if self._partial:
            self._partial += data
            if len(self._partial) < self._need:
                return
            data = bytes(self._partial)
            self._partial.clear()
        buf = data
        end, pos = len(buf), 0
        max_size = self.config.ws_max_size
        while end - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            length = second & 0x7F
            if (first != FIN_TEXT and first != FIN_BINARY) or not second & MASKED or length == LENGTH_64:
                break  # not a plain data frame: websockets' to parse (and refuse, if need be)
            start = pos + 6  # 2 header bytes and the 4-byte mask
            if length == LENGTH_16:
                if end - pos < 4:
                    self._keep(buf, pos, 4)
                    return
                length = _U16.unpack_from(buf, pos + 2)[0]
                start += 2
            if length > max_size:
                break  # websockets closes with 1009
            stop = start + length
            if stop > end:
                self._keep(buf, pos, stop - pos)
                return
            self.frames = [apply_mask(buf[start:stop], buf[start - 4 : start])]
            self.curr_msg_data_type = "text" if first == FIN_TEXT else "bytes"
            self.send_receive_event_to_app()
            pos = stop
            if self.close_sent or self.conn.state is not State.OPEN:  # e.g. 1007, invalid UTF-8
                break
        else:
            if pos < end:
                self._keep(buf, pos, 2)
            return
        self._to_websockets(buf[pos:])

    def send_receive_event_to_app(self) -> None:
        """uvicorn's, but reading pauses only when MAX_UNREAD messages wait (see the module)."""
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return  # past `websocket.close`: discarded, as uvicorn does
        if self.curr_msg_data_type == "text":
            try:
                message = {"type": "websocket.receive", "text": data.decode()}
            except UnicodeDecodeError:
                self.logger.exception("Invalid UTF-8 sequence received from client.")
                self.conn.send_close(1007)
                self.handle_parser_exception()
                return
        else:
            message = {"type": "websocket.receive", "bytes": data}
        self.queue.put_nowait(message)
        if not self.read_paused and self.queue.qsize() >= MAX_UNREAD:
            self.read_paused = True
            self.transport.pause_reading()  # `receive` resumes it once the app has read them all

    async def send(self, message: Any) -> None:
        if message["type"] == "websocket.send" and self._fast_send_open():
            text = message.get("text")
            if text is not None:
                data = text.encode()
                self.transport.write(frame_header(FIN_TEXT, len(data)) + data)
                return
            data = message.get("bytes")
            if data is not None:
                self.transport.write(frame_header(FIN_BINARY, len(data)) + data)
                return
        await super().send(message)

    def _fast_send_open(self) -> bool:
        if self.disconnected:
            raise ClientDisconnected()
        return (
            self.handshake_complete
            and self.initial_response is None
            and not self.close_sent
            and self.writable.is_set()
            and self.conn.state is State.OPEN
            and not self.conn.extensions
        )
