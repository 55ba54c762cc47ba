"""A local Line agent that speaks the Calls API (PROTOCOLS.md section 5), for tests and demos.

It greets on `start`, stops talking and sends `clear` when the caller speaks over it
(energy-based), answers DTMF, sends `custom`, ends the call with close 1000 `call ended by agent`
on a chosen digit, serves any of the four output formats, and records everything it receives.

Where Cartesia's docs say how the real service behaves, it behaves so: it refuses a socket
without the API key (401; `X-API-Key` or `Authorization: Bearer`), speaks in its own configured
output format whatever the client asked, reads the caller's audio in the `input_format` of
`start`, echoes `config` (and `agent`) in its `ack`, and closes a socket that has sent nothing,
not even a ping, for 180 s with 1000 `connection idle timeout`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from gateway.audio import OUTPUT_FORMATS, pcm16_to_ulaw, rms_dbfs, tone_pcm16, ulaw_to_pcm16

log = structlog.get_logger(__name__)


def _text(frame: dict[str, Any]) -> str:
    """A Calls API frame: JSON in a text frame, as the real service sends it."""
    return orjson.dumps(frame).decode()


GREETING_HZ = 440.0  # the "voice" of the emulator: a tone the tests can find in a recording
GOODBYE_HZ = 660.0
CHUNK_MS = 40


@dataclass
class AgentBehaviour:
    output_format: str = "mulaw_8000"
    greeting_s: float = 1.0
    goodbye_s: float = 0.5
    # The caller "speaks" when a frame is louder than this; this many loud frames in a row
    # while the agent is talking is a barge-in.
    speech_dbfs: float = -30.0
    barge_in_frames: int = 3
    end_digit: str = "#"  # close 1000 "call ended by agent" after a goodbye
    dtmf_replies: dict[str, str] = field(default_factory=lambda: {"*": "147"})
    transfer_digit: str = "0"  # send transfer_call to transfer_target
    transfer_target: str = "+15550001111"
    # The transfer_call frame's fields beside `event` and `stream_id`; default: the target under
    # `transfer.target_phone_number`.
    transfer_fields: dict[str, Any] | None = None
    close_after_transfer: bool = False  # like Line's own transfer tool: the agent side ends
    end_call_tool_digit: str = "7"  # a tool POSTs {"action":"end_call"} to the control URL
    transfer_tool_digit: str = "9"  # a tool POSTs {"action":"transfer_call"} to transfer_target
    # After a tool's POST, close the socket this long later (as Line's runtime does once its
    # end-call or transfer tool has run); None: keep it open until the gateway closes it.
    close_after_tool_s: float | None = None
    # As a Line agent does: the tool's POST goes out at once while the goodbye spoken just
    # before it is still being synthesised; its audio follows this long after the POST.
    # None: the goodbye is sent, then the POST.
    goodbye_after_tool_s: float | None = None
    send_custom: bool = True
    ack_delay_s: float = 0.0
    refuse_status: int = 0  # answer the upgrade with this HTTP status instead
    refuse_first: int = 0  # answer this many upgrades 429 (busy), then accept
    never_ack: bool = False
    continuous: bool = False  # talk without end (benchmarks): 20 ms chunks at real time
    pace: float = 2.0  # send speech this many times faster than real time
    # Sent as they are, one WebSocket frame each (str: text, bytes: binary), right after the
    # ack and before the greeting: junk, unknown events, anything a test wants the gateway to see.
    extra_frames: tuple[str | bytes, ...] = ()
    frames_before_ack: tuple[str | bytes, ...] = ()  # the same, between `start` and the ack
    # Whether the ack names the agent's output format in `config.output_format`. Cartesia's own
    # client reads only `input_format` from it, so by default it does not.
    ack_reports_output_format: bool = False
    idle_timeout_s: float = 180.0  # closed after this long without a client frame or ping


@dataclass
class AgentCall:
    """What one call's socket brought to the agent."""

    path: str
    headers: dict[str, str]
    start: dict[str, Any] | None = None
    audio_in: bytearray = field(default_factory=bytearray)  # mu-law 8 kHz, as received
    frames_in: list[dict[str, Any]] = field(default_factory=list)
    dtmf_in: list[str] = field(default_factory=list)
    clears_sent: int = 0
    control_replies: list[tuple[int, Any]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    # Tools run beside the socket's reader, as a real agent's do: a reader blocked on a tool
    # would stop reading, and a close frame from the gateway would wait behind unread audio.
    tools: set[asyncio.Task[None]] = field(default_factory=set)
    close_code: int | None = None
    close_reason: str | None = None
    hung_up_at: float | None = None  # when the agent closed the socket itself (monotonic)
    audio_out: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, bytes) sent

    @property
    def metadata(self) -> dict[str, Any]:
        return (self.start or {}).get("metadata", {})


def speech(freq: float, seconds: float, output_format: str) -> bytes:
    encoding, rate = OUTPUT_FORMATS[output_format]
    pcm = tone_pcm16(freq, seconds, rate, amplitude=0.3)
    return pcm16_to_ulaw(pcm) if encoding == "mulaw" else pcm


IDLE_CLOSE_REASON = "connection idle timeout"


class _HeardConnection(ServerConnection):
    """Notes when the client last sent anything, pings included (the idle timeout's clock)."""

    last_heard = 0.0

    def data_received(self, data: bytes) -> None:
        self.last_heard = time.monotonic()
        super().data_received(data)


class AgentEmulator:
    def __init__(self, behaviour: AgentBehaviour | None = None, *, api_key: str = "") -> None:
        """`api_key`: the key a socket must carry (none checked when empty)."""
        self.behaviour = behaviour or AgentBehaviour()
        self.api_key = api_key
        self.calls: list[AgentCall] = []
        self.refused = 0  # upgrades answered with an error status
        self._sockets: dict[int, ServerConnection] = {}  # id(call) -> its socket, while open
        self._server: Server | None = None
        self.url = ""

    @contextlib.asynccontextmanager
    async def running(self, port: int = 0) -> AsyncIterator[AgentEmulator]:
        async with serve(
            self._handle,
            "127.0.0.1",
            port,
            process_request=self._check_request,
            compression=None,
            create_connection=_HeardConnection,
        ) as server:
            self._server = server
            bound = server.sockets[0].getsockname()[1]
            self.url = f"ws://127.0.0.1:{bound}"
            yield self

    def _check_request(self, connection: ServerConnection, request: Any) -> Any:
        if self.behaviour.refuse_status or self.refused < self.behaviour.refuse_first:
            self.refused += 1
            return connection.respond(self.behaviour.refuse_status or 429, "refused by the emulator\n")
        if not request.path.startswith("/agents/stream/"):
            return connection.respond(404, "no such agent path\n")
        if self.api_key and not self._authorised(request.headers):
            return connection.respond(401, "missing or invalid API key\n")
        return None

    def _authorised(self, headers: Any) -> bool:
        return headers.get("X-API-Key") == self.api_key or headers.get("Authorization") == (
            f"Bearer {self.api_key}"
        )

    async def wait_for_call(self, index: int = 0, within_s: float = 10.0) -> AgentCall:
        async with asyncio.timeout(within_s):
            while len(self.calls) <= index or self.calls[index].start is None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        return self.calls[index]

    def drop(self, call: AgentCall, code: int | None = None, reason: str = "") -> None:
        """The agent's side of `call` goes away mid-call: with a close `code`, or (None) with
        no close frame at all, as a crashed process or a network cut."""
        ws = self._sockets.get(id(call))
        if ws is None:
            return
        if code is None:
            ws.transport.abort()
        else:
            asyncio.get_running_loop().create_task(ws.close(code, reason))

    def live_sockets(self) -> int:
        """Agent sessions open right now."""
        return len(self._sockets)

    async def _handle(self, ws: ServerConnection) -> None:
        call = AgentCall(path=ws.request.path, headers=dict(ws.request.headers.raw_items()))
        self.calls.append(call)
        self._sockets[id(call)] = ws
        talk = _Talker(ws, self.behaviour, call)
        try:
            first = orjson.loads(await ws.recv())
            if first.get("event") != "start":
                await ws.close(1002, "first frame must be start")
                return
            call.start = first
            stream_id = first.get("stream_id") or "sandbox-stream"
            talk.stream_id = stream_id
            if self.behaviour.never_ack:
                await ws.wait_closed()
                return
            await asyncio.sleep(self.behaviour.ack_delay_s)
            for raw in self.behaviour.frames_before_ack:
                await ws.send(raw)
            await ws.send(_text(self._ack(first, stream_id)))
            for raw in self.behaviour.extra_frames:
                await ws.send(raw)
            resumed = bool(call.metadata.get("resumed"))
            if self.behaviour.send_custom:
                # Its own state, as a Line agent would keep it: how many sessions it has had.
                state = {
                    "greeting": True,
                    "sessions": int(call.metadata.get("agent_state", {}).get("sessions", 0)) + 1,
                }
                await ws.send(_text({"event": "custom", "stream_id": stream_id, "metadata": state}))
            if not resumed or self.behaviour.continuous:  # a resumed session does not greet again
                talk.say(GREETING_HZ, self.behaviour.greeting_s, continuous=self.behaviour.continuous)
            idle = asyncio.create_task(self._close_when_idle(ws))
            try:
                await self._listen(ws, call, talk)
            finally:
                idle.cancel()
        except ConnectionClosed:
            pass
        finally:
            self._sockets.pop(id(call), None)
            await talk.stop()
            if call.tools:
                await asyncio.wait(call.tools, timeout=5)
            # From the protocol: websockets 13 (which cartesia-line pins) has them only there.
            call.close_code, call.close_reason = ws.protocol.close_code, ws.protocol.close_reason
            call.closed.set()

    def _ack(self, start: dict[str, Any], stream_id: str) -> dict[str, Any]:
        config = dict(start.get("config") or {})
        if self.behaviour.ack_reports_output_format:
            config["output_format"] = self.behaviour.output_format
        ack: dict[str, Any] = {"event": "ack", "stream_id": stream_id, "config": config}
        if "agent" in start:
            ack["agent"] = start["agent"]
        return ack

    async def _close_when_idle(self, ws: ServerConnection) -> None:
        limit = self.behaviour.idle_timeout_s
        while True:
            last = getattr(ws, "last_heard", 0.0) or time.monotonic()
            await asyncio.sleep(max(0.01, last + limit - time.monotonic()))
            if time.monotonic() - getattr(ws, "last_heard", 0.0) >= limit:
                await ws.close(1000, IDLE_CLOSE_REASON)
                return

    async def _listen(self, ws: ServerConnection, call: AgentCall, talk: _Talker) -> None:
        loud = 0
        input_format = ((call.start or {}).get("config") or {}).get("input_format", "mulaw_8000")
        encoding = OUTPUT_FORMATS.get(input_format, ("mulaw", 8000))[0]
        async for text in ws:
            frame = orjson.loads(text)
            call.frames_in.append(frame)
            event = frame.get("event")
            if event == "media_input":
                audio = base64.b64decode(frame["media"]["payload"])
                call.audio_in += audio  # as received, in the start's input_format
                pcm = ulaw_to_pcm16(audio) if encoding == "mulaw" else audio
                loud = loud + 1 if rms_dbfs(pcm) > self.behaviour.speech_dbfs else 0
                if loud >= self.behaviour.barge_in_frames and talk.speaking:
                    await talk.interrupt()
                    call.clears_sent += 1
            elif event == "dtmf":
                digit = frame.get("dtmf", "")
                call.dtmf_in.append(digit)
                await self._on_digit(ws, call, talk, digit)

    async def _on_digit(self, ws: ServerConnection, call: AgentCall, talk: _Talker, digit: str) -> None:
        b = self.behaviour
        if digit in b.dtmf_replies:
            await ws.send(
                _text({"event": "dtmf", "stream_id": talk.stream_id, "dtmf": b.dtmf_replies[digit]})
            )
        if digit == b.end_digit:
            await talk.interrupt(send_clear=False)
            await talk.send_all(GOODBYE_HZ, b.goodbye_s)
            await ws.close(1000, "call ended by agent")
        elif digit == b.transfer_digit:
            fields = b.transfer_fields or {"transfer": {"target_phone_number": b.transfer_target}}
            await ws.send(_text({"event": "transfer_call", "stream_id": talk.stream_id, **fields}))
            if b.close_after_transfer:
                await ws.close(1000, "call ended by agent")
        elif digit == b.end_call_tool_digit:
            self._run_tool(ws, call, talk, {"action": "end_call"})
        elif digit == b.transfer_tool_digit:
            self._run_tool(ws, call, talk, {"action": "transfer_call", "to": b.transfer_target})

    def _run_tool(self, ws: ServerConnection, call: AgentCall, talk: _Talker, body: dict[str, Any]) -> None:
        task = asyncio.create_task(self._use_tool(ws, call, talk, body))
        call.tools.add(task)
        task.add_done_callback(call.tools.discard)

    async def _use_tool(
        self, ws: ServerConnection, call: AgentCall, talk: _Talker, body: dict[str, Any]
    ) -> None:
        """What a tool written for the hosted connector does: say goodbye, then POST to the
        control URL."""
        url = call.metadata.get("vox_session_control_url", "")
        late = self.behaviour.goodbye_after_tool_s
        if late is None:
            await talk.send_all(GOODBYE_HZ, self.behaviour.goodbye_s)
        async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
            call.control_replies.append((resp.status, await resp.json()))
        if late is not None:
            await asyncio.sleep(late)
            with contextlib.suppress(ConnectionClosed):
                await talk.send_all(GOODBYE_HZ, self.behaviour.goodbye_s)
        if self.behaviour.close_after_tool_s is not None:
            await asyncio.sleep(self.behaviour.close_after_tool_s)
            call.hung_up_at = time.monotonic()
            with contextlib.suppress(ConnectionClosed):
                await ws.close(1000, "call ended by agent")


class _Talker:
    """Sends the agent's speech in chunks, faster than real time like a real TTS."""

    def __init__(self, ws: ServerConnection, behaviour: AgentBehaviour, call: AgentCall) -> None:
        self._ws = ws
        self._b = behaviour
        self._call = call
        self.stream_id = ""
        self._task: asyncio.Task[None] | None = None
        self._until = 0.0

    @property
    def speaking(self) -> bool:
        """Until the caller would have heard the last of it (speech is sent ahead of time)."""
        return time.monotonic() < self._until

    def say(self, freq: float, seconds: float, *, continuous: bool = False) -> None:
        self._until = float("inf") if continuous else time.monotonic() + seconds + 0.2
        self._task = asyncio.create_task(self._say(freq, seconds, continuous))

    async def _say(self, freq: float, seconds: float, continuous: bool) -> None:
        if continuous:
            await self._stream_forever(freq)
            return
        await self.send_all(freq, seconds)

    async def send_all(self, freq: float, seconds: float) -> None:
        audio = speech(freq, seconds, self._b.output_format)
        if not audio:
            return
        per_chunk = len(audio) * CHUNK_MS // max(1, int(seconds * 1000))
        per_chunk -= per_chunk % 2
        for offset in range(0, len(audio), per_chunk):
            await self._send(audio[offset : offset + per_chunk])
            await asyncio.sleep(CHUNK_MS / 1000 / self._b.pace)

    async def _stream_forever(self, freq: float) -> None:
        chunk = speech(freq, 0.02, self._b.output_format)
        started = time.monotonic()
        sent = 0
        while True:
            await self._send(chunk)
            sent += 1
            await asyncio.sleep(max(0.0, started + sent * 0.02 - time.monotonic()))

    async def _send(self, audio: bytes) -> None:
        self._call.audio_out.append((time.monotonic(), len(audio)))
        payload = base64.b64encode(audio).decode()
        await self._ws.send(
            f'{{"event":"media_output","stream_id":"{self.stream_id}","media":{{"payload":"{payload}"}}}}'
        )

    async def interrupt(self, *, send_clear: bool = True) -> None:
        await self.stop()
        if send_clear:
            await self._ws.send(_text({"event": "clear", "stream_id": self.stream_id}))

    async def stop(self) -> None:
        self._until = 0.0
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await self._task
            self._task = None
