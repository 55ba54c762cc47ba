"""A simulated Twilio call: signed webhook, signed Media Streams socket, real-time audio.

It behaves as Twilio does (PROTOCOLS.md sections 1-3): sends `connected`, `start`, a 20 ms mu-law
`media` frame every 20 ms, `dtmf` and `stop`; plays the gateway's audio at real-time rate,
echoes each `mark` when the audio queued before it has played, and on `clear` drops what is
queued and echoes every pending mark at once. What the caller heard is kept, with silence
where nothing played, and can be written to a WAV.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import re
import secrets
import ssl
import time
import wave
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.version import version as websockets_version

from gateway.audio import MULAW_FRAME_BYTES, SAMPLE_RATE_TELEPHONY, ulaw_to_pcm16
from gateway.sandbox.flow import TwilioFlow
from gateway.sandbox.script import CallScript, wav_to_mulaw

SILENCE = b"\xff" * MULAW_FRAME_BYTES
FRAME_S = 0.02


# websockets 15 and later connect through a proxy named in the environment; the simulated
# call goes to loopback, never through one. Older versions (13, which cartesia-line pins)
# know no proxies and refuse the argument.
NO_PROXY: dict[str, None] = {"proxy": None} if int(websockets_version.split(".")[0]) >= 15 else {}


def new_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


@dataclass
class _Mark:
    name: str


class SimulatedCall(TwilioFlow):
    def __init__(
        self,
        gateway_url: str,
        auth_token: str,
        *,
        account_sid: str = "AC" + "0" * 32,
        call_sid: str | None = None,
        from_: str = "+15551230001",
        to: str = "+15559870002",
        voice_query: str = "",
        extra_form: dict[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.ssl_context = ssl_context  # for an https/wss gateway whose certificate the system does not trust
        self.validator = RequestValidator(auth_token)
        self.account_sid = account_sid
        self.call_sid = call_sid or new_sid("CA")
        self.stream_sid = new_sid("MZ")
        self.from_, self.to = from_, to
        self.voice_query = voice_query
        self.extra_form = extra_form or {}
        self.stream_url = ""
        self.parameters: dict[str, str] = {}
        self.twiml = ""
        self.t0 = time.monotonic()
        self.timeline: list[tuple[float, str]] = []
        self.heard = bytearray()  # mu-law 8 kHz, one frame per 20 ms tick, silence included
        self.media_arrivals: list[tuple[float, int]] = []  # (monotonic time, bytes) per media frame
        self.received: list[dict[str, Any]] = []
        self.protocol_errors: list[str] = []
        self.clears = 0
        self.marks_echoed: list[str] = []
        self.marks_echoed_at: list[float] = []  # monotonic time of each echo, as marks_echoed
        self.first_audio_at: float | None = None
        self.last_audio_at: float | None = None  # monotonic time the last agent audio played
        self.clear_frames: list[int] = []  # index into `heard` (in frames) of each clear
        self.cleared_s: list[float] = []  # seconds of queued audio each clear dropped
        self.sent_audio = bytearray()  # every caller frame, as sent
        self.ended = asyncio.Event()
        self.end_reason = ""
        self._queue: deque[bytes | _Mark] = deque()
        self._ws: ClientConnection | None = None
        self._superseded: ClientConnection | None = None  # ended by a REST update: no TwiML after it
        self.said: list[str] = []  # what Twilio said to the caller (<Say>)
        self.carrier_live = lambda: True
        self.streams_opened = 0
        self.stream_lost = False  # the stream dropped and nothing has replaced it yet
        self._documents = 0
        self._seq = 0
        self._chunk = 0

    def log(self, what: str) -> None:
        self.timeline.append((time.monotonic() - self.t0, what))

    # Webhook

    def sign(self, url: str, params: dict[str, str]) -> str:
        return self.validator.compute_signature(url, params)

    def webhook_form(self) -> dict[str, str]:
        return {
            "CallSid": self.call_sid,
            "AccountSid": self.account_sid,
            "From": self.from_,
            "To": self.to,
            "CallStatus": "ringing",
            "Direction": "inbound",
            **self.extra_form,
        }

    async def dial(self, public_url: str | None = None, *, signature: str | None = None) -> int:
        """POST the voice webhook, as Twilio does when the number rings. Returns the status."""
        path = "/twilio/voice" + (f"?{self.voice_query}" if self.voice_query else "")
        form = self.webhook_form()
        signed_url = (public_url or self.gateway_url) + path
        sig = self.sign(signed_url, form) if signature is None else signature
        self.t0 = time.monotonic()
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl_context or True)) as http,
            http.post(self.gateway_url + path, data=form, headers={"X-Twilio-Signature": sig}) as resp,
        ):
            self.twiml = await resp.text()
            status = resp.status
        self.log(f"webhook answered {status}")
        if status == 200:
            twiml = self.twiml
            self.follow(twiml)
        return status

    async def post(self, path: str, form: dict[str, str]) -> tuple[int, str]:
        """POST a signed webhook to the gateway, as Twilio does (path may carry a query)."""
        return await self.post_url(self.gateway_url + path, form)

    async def post_url(self, url: str, form: dict[str, str]) -> tuple[int, str]:
        """POST a signed form to a URL a TwiML document named, as Twilio does."""
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl_context or True)) as http,
            http.post(url, data=form, headers={"X-Twilio-Signature": self.sign(url, form)}) as resp,
        ):
            return resp.status, await resp.text()

    def follow(self, twiml: str) -> bool:
        """Take the stream URL and parameters of a `<Connect><Stream>` TwiML; False if it has none."""
        match = re.search(r'<Stream url="([^"]+)"', twiml)
        if match is None:
            return False
        self.twiml = twiml
        self.stream_url = match.group(1)
        self.parameters = dict(re.findall(r'<Parameter name="([^"]+)" value="([^"]+)"', twiml))
        if self.ended.is_set():  # a new call on this object (tests reuse one); a resume is not
            self.ended = asyncio.Event()
            self.end_reason = ""
        self.stream_sid = new_sid("MZ")
        return True

    # Media

    async def open_stream(
        self,
        *,
        signature: str | None = None,
        parameters: dict[str, str] | None = None,
        stream_sid: str | None = None,
    ) -> None:
        """Open the Media Streams socket and send `connected` and `start`."""
        sig = self.sign(self.stream_url, {}) if signature is None else signature
        headers = {"X-Twilio-Signature": sig} if sig else {}
        self.stream_sid = stream_sid or self.stream_sid
        tls = {"ssl": self.ssl_context} if self.ssl_context and self.stream_url.startswith("wss:") else {}
        self._ws = await connect(
            self.stream_url, additional_headers=headers, compression=None, **NO_PROXY, **tls
        )
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self.send(
            {
                "event": "start",
                "sequenceNumber": self._next_seq(),
                "streamSid": self.stream_sid,
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": self.parameters if parameters is None else parameters,
                },
            }
        )
        self.log("stream started")

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        assert self._ws is not None
        data = frame if isinstance(frame, str | bytes) else orjson.dumps(frame).decode()
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(data)

    async def send_media(self, mulaw: bytes) -> None:
        self._chunk += 1
        self.sent_audio += mulaw
        await self.send(
            f'{{"event":"media","sequenceNumber":"{self._next_seq()}","streamSid":"{self.stream_sid}",'
            f'"media":{{"track":"inbound","chunk":"{self._chunk}","timestamp":"{self._chunk * 20}",'
            f'"payload":"{base64.b64encode(mulaw).decode()}"}}}}'
        )

    async def press(self, digit: str) -> None:
        self.log(f"caller pressed {digit}")
        await self.send(
            {
                "event": "dtmf",
                "sequenceNumber": self._next_seq(),
                "streamSid": self.stream_sid,
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    async def hang_up(self) -> None:
        """The caller hangs up: `stop`, then the socket closes."""
        if self.ended.is_set():
            return
        self.log("caller hung up")
        await self.send_stop()
        await self._close("caller hung up")

    async def send_stop(self) -> None:
        """Twilio's `stop`: the stream is over (a hang-up, or a REST update of the call)."""
        self._superseded = self._ws
        await self.send(
            {
                "event": "stop",
                "sequenceNumber": self._next_seq(),
                "streamSid": self.stream_sid,
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
            }
        )

    async def _close(self, reason: str) -> None:
        self.end_reason = self.end_reason or reason
        if self._ws is not None:
            await self._ws.close()
        self.ended.set()

    async def run(self, script: CallScript) -> None:
        """Stream in real time until the call ends (by either side) or `max_s` passes."""
        assert self._ws is not None
        if script.wav is not None:
            script = dataclasses.replace(script, audio=wav_to_mulaw(script.wav), wav=None)
        reader = asyncio.create_task(self._read())
        try:
            await self._tick(script)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _tick(self, script: CallScript) -> None:
        start = time.monotonic()
        dtmf = deque(sorted(script.dtmf))
        speak_from = int(script.speak_at / FRAME_S)
        tick = 0
        while not self.ended.is_set():
            now_s = tick * FRAME_S
            if script.hangup_at is not None and now_s >= script.hangup_at:
                await self.hang_up()
                break
            if now_s >= script.max_s:
                self.log("script time is up")
                await self.hang_up()
                break
            while dtmf and dtmf[0][0] <= now_s:
                await self.press(dtmf.popleft()[1])
            offset = (tick - speak_from) * MULAW_FRAME_BYTES
            frame = script.audio[offset : offset + MULAW_FRAME_BYTES] if offset >= 0 else b""
            await self.send_media(frame.ljust(MULAW_FRAME_BYTES, b"\xff"))
            await self._play_one_frame()
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * FRAME_S - time.monotonic()))

    async def _play_one_frame(self) -> None:
        out = bytearray()
        while self._queue and len(out) < MULAW_FRAME_BYTES:
            item = self._queue[0]
            if isinstance(item, _Mark):
                self._queue.popleft()
                await self._echo(item.name)
                continue
            need = MULAW_FRAME_BYTES - len(out)
            out += item[:need]
            if len(item) > need:
                self._queue[0] = item[need:]
            else:
                self._queue.popleft()
        while self._queue and isinstance(self._queue[0], _Mark):
            await self._echo(self._queue.popleft().name)  # type: ignore[union-attr]
        if out:
            self.last_audio_at = time.monotonic()
            if self.first_audio_at is None:
                self.first_audio_at = self.last_audio_at - self.t0
                self.log("caller hears the agent")
        self.heard += out.ljust(MULAW_FRAME_BYTES, b"\xff")

    async def _echo(self, name: str) -> None:
        self.marks_echoed.append(name)
        self.marks_echoed_at.append(time.monotonic())
        await self.send(
            {
                "event": "mark",
                "sequenceNumber": self._next_seq(),
                "streamSid": self.stream_sid,
                "mark": {"name": name},
            }
        )

    async def _read(self) -> None:
        """Read each of the call's streams in turn until the call ends."""
        while not self.ended.is_set():
            ws = self._ws
            assert ws is not None
            await self._read_socket(ws)
            if self.ended.is_set():
                return
            if self._superseded is not ws and self._ws is ws:
                await self.after_stream(ws)
            while self._ws is ws and not self.ended.is_set():  # noqa: ASYNC110 (a REST update replaces it)
                await asyncio.sleep(0.02)

    async def _read_socket(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                if isinstance(data, bytes):
                    self.protocol_errors.append("binary frame")
                    continue
                frame = orjson.loads(data)
                self.received.append(frame)
                event = frame.get("event")
                if frame.get("streamSid") != self.stream_sid:
                    self.protocol_errors.append(f"{event} with streamSid {frame.get('streamSid')!r}")
                if event == "media":
                    audio = base64.b64decode(frame["media"]["payload"])
                    self.media_arrivals.append((time.monotonic(), len(audio)))
                    self._queue.append(audio)
                elif event == "mark":
                    self._queue.append(_Mark(frame["mark"]["name"]))
                elif event == "clear":
                    self.clears += 1
                    self.clear_frames.append(len(self.heard) // MULAW_FRAME_BYTES)
                    self.log("gateway cleared playback (barge-in)")
                    marks = [i for i in self._queue if isinstance(i, _Mark)]
                    dropped = sum(len(i) for i in self._queue if not isinstance(i, _Mark))
                    self.cleared_s.append(dropped / SAMPLE_RATE_TELEPHONY)
                    self._queue.clear()
                    for mark in marks:
                        await self._echo(mark.name)
                else:
                    self.protocol_errors.append(f"unknown event {event!r}")
        except ConnectionClosed:
            pass

    def heard_pcm16(self) -> bytes:
        return ulaw_to_pcm16(bytes(self.heard))

    def write_wav(self, path: str | Path) -> Path:
        path = Path(path)
        with wave.open(str(path), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(8000)
            wav.writeframes(self.heard_pcm16())
        return path


def query(**params: str) -> str:
    return urlencode(params)
