"""The caller's leg over a Twilio Media Streams socket (Starlette WebSocket)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from gateway.carriers import twilio
from gateway.events import CarrierEvent, ProtocolError, StreamStarted, StreamStopped

log = structlog.get_logger(__name__)

# `connected` and `start` come within a second of the upgrade; a socket that sends neither
# in this long is not a Twilio stream.
START_TIMEOUT_S = 10.0
# Frames that may come before `start`: `connected`, and perhaps junk. More is not Twilio.
MAX_FRAMES_BEFORE_START = 8
# Twilio sends a media frame every 20 ms for the whole call, silence included, so a socket
# that has said nothing this long is dead (a half-open TCP connection), and the call is over.
IDLE_TIMEOUT_S = 10.0
# A send waits this long for room in the socket's buffer; past it the caller's side is
# stalled for good, and the socket is closed rather than stall the agent's side too.
SEND_TIMEOUT_S = 5.0


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
                    event = twilio.parse_frame(text)
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
    def __init__(self, ws: WebSocket, stream_sid: str) -> None:
        self._ws = ws
        self.stream_sid = stream_sid

    async def events(self) -> AsyncIterator[CarrierEvent | ProtocolError]:
        """Frames until `stop` (yielded) or the socket closes. Malformed ones as ProtocolError."""
        while True:
            try:
                async with asyncio.timeout(IDLE_TIMEOUT_S):
                    text = await _receive(self._ws)
                if text is None:
                    return
                event = twilio.parse_frame(text)
            except ProtocolError as exc:
                yield exc
                continue
            except TimeoutError:
                log.warning("carrier_silent", stream_sid=self.stream_sid, idle_s=IDLE_TIMEOUT_S)
                return
            except (WebSocketDisconnect, RuntimeError):
                return  # closed underneath us (replaced or shutting down)
            if event is not None:
                yield event
                if isinstance(event, StreamStopped):
                    return

    async def _send(self, text: str) -> None:
        if self._ws.application_state is WebSocketState.CONNECTED:
            # If the caller is gone, the uplink sees the close and ends the call.
            try:
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await self._ws.send_text(text)
            except (WebSocketDisconnect, RuntimeError, OSError):
                pass
            except TimeoutError:
                log.warning("carrier_not_reading", stream_sid=self.stream_sid)
                await self.close(1011, "not reading")

    async def send_audio(self, payload_b64: str) -> None:
        await self._send(twilio.media_frame(self.stream_sid, payload_b64))

    async def send_mark(self, name: str) -> None:
        await self._send(twilio.mark_frame(self.stream_sid, name))

    async def send_clear(self) -> None:
        await self._send(twilio.clear_frame(self.stream_sid))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(RuntimeError, OSError, TimeoutError):
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await self._ws.close(code, reason)
