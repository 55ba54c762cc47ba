"""The caller's leg over a Twilio Media Streams socket.

The handshake and `start` go through Starlette's WebSocket; the call's frames then go through
the ASGI `receive` and `send` the route was called with (uvicorn's, and Starlette's exception
middleware's thin `send` wrapper), skipping the WebSocket object's per-message state checks and
its session wrapper, since they run 100 times a second per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import structlog
from starlette.types import Receive, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from gateway.carriers.twilio import codec
from gateway.events import CarrierEvent, ProtocolError, StreamStarted, StreamStopped
from gateway.liveness import Liveness

log = structlog.get_logger(__name__)

# `connected` and `start` come within a second of the upgrade; a socket that sends neither
# in this long is not a Twilio stream.
START_TIMEOUT_S = 10.0
# Frames that may come before `start`: `connected`, and perhaps junk. More is not Twilio.
MAX_FRAMES_BEFORE_START = 8
# Twilio sends a media frame every 20 ms for the whole call, silence included, so a socket
# that has said nothing this long is dead (a half-open TCP connection), and the call is over.
# The session's watchdog enforces it from `TwilioMediaLeg.liveness`.
IDLE_TIMEOUT_S = 10.0
# A send waits this long for room in the socket's buffer; past it the caller's side is stalled
# for good, and the watchdog ends the call rather than stall the agent's side too.
SEND_TIMEOUT_S = 5.0
# Closing waits for room in the send buffer at most this long.
CLOSE_TIMEOUT_S = 2.0


async def _receive(ws: WebSocket) -> str | None:
    """The next text frame; None when the socket is closed. Binary frames are protocol errors."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        return None
    text = message.get("text")
    if text is None:
        raise ProtocolError("binary frame on a Media Streams socket")
    return text


async def wait_for_start(ws: WebSocket) -> StreamStarted | None:
    """Read up to the `start` frame; None if the socket closes or sends no valid `start`."""
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            for _ in range(MAX_FRAMES_BEFORE_START):
                try:
                    text = await _receive(ws)
                    if text is None:
                        return None
                    event = codec.parse_frame(text)
                except ProtocolError as exc:
                    log.warning("carrier_frame_dropped", error=str(exc), phase="before_start")
                    continue
                if isinstance(event, StreamStarted):
                    return event
                if isinstance(event, StreamStopped):
                    return None
    except (TimeoutError, WebSocketDisconnect):
        return None
    return None


class TwilioMediaLeg:
    silent_after_s = IDLE_TIMEOUT_S
    stalled_after_s = SEND_TIMEOUT_S

    def __init__(self, ws: WebSocket, stream_sid: str, receive: Receive, send: Send) -> None:
        """`receive` and `send`: the ASGI callables `ws` was made from."""
        self._ws = ws
        self._receive = receive
        self._asgi_send = send
        self.stream_sid = stream_sid
        self.liveness = Liveness()

    async def events(self) -> AsyncIterator[CarrierEvent | ProtocolError]:
        """Frames until `stop` (yielded) or the socket closes. Malformed ones as ProtocolError."""
        receive, liveness = self._receive, self.liveness
        while True:
            try:
                message = await receive()
                liveness.received()
                if message["type"] != "websocket.receive":
                    return  # websocket.disconnect
                text = message.get("text")
                if text is None:
                    raise ProtocolError("binary frame on a Media Streams socket")
                event = codec.parse_frame(text)
            except ProtocolError as exc:
                yield exc
                continue
            except (WebSocketDisconnect, RuntimeError, OSError):
                return  # closed underneath us (replaced or shutting down)
            if event is not None:
                yield event
                if isinstance(event, StreamStopped):
                    return

    async def _send(self, text: str) -> None:
        # If the caller is gone, the uplink sees the close and ends the call; a send that
        # waits for good is the watchdog's to notice (`liveness`).
        liveness = self.liveness
        liveness.send_waiting_since = time.monotonic()
        try:
            await self._asgi_send({"type": "websocket.send", "text": text})
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            liveness.send_waiting_since = 0.0

    async def send_audio(self, payload_b64: str) -> None:
        await self._send(codec.media_frame(self.stream_sid, payload_b64))

    async def send_mark(self, name: str) -> None:
        await self._send(codec.mark_frame(self.stream_sid, name))

    async def send_clear(self) -> None:
        await self._send(codec.clear_frame(self.stream_sid))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(RuntimeError, OSError, TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._ws.close(code, reason)
