"""Everything the caller hears on one call, and what they have heard so far.

`Playout.send` is the one way audio reaches the caller: the agent's speech (converted to
mu-law 8 kHz when the agent speaks PCM), the resampler's tail when the agent stops, and DTMF
tones. Each send is recorded (the agent's side of a local recording), counted, and marked when
a mark is due, so what was sent and what has been heard cannot drift apart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections import deque
from typing import Any

from gateway.agents.calls_api import decode_payload
from gateway.audio import OUTPUT_FORMATS, DownlinkConverter, mulaw_duration_s
from gateway.call.legs import CarrierLeg
from gateway.dtmf import dtmf_mulaw
from gateway.format_sniff import SNIFF_BYTES, looks_like
from gateway.recording import CallRecorder

# A mark every second of agent audio tells the session what the caller has heard. Each mark is
# a frame out and its echo a frame in, as costly as an audio frame: once a second adds 2 % to
# a call's 50 frames a second each way (twice a second was 4 %). While the call is leaving
# (the drain before a hang-up or transfer) every send is marked, so how soon the end is known
# does not depend on this.
# Outstanding marks are capped: Twilio buffers at most ~10 min of audio, which is 600 marks;
# past the cap no new marks are sent until echoes come back (a forced mark is always sent).
MARK_EVERY_S = 1.0
MAX_OUTSTANDING_MARKS = 600
# The agent's first audio is checked against the format the gateway expects, in windows of
# SNIFF_BYTES, until one tells (silence does not) or this many have not.
MAX_SNIFF_WINDOWS = 25
ENCODING_NAMES = {"mulaw": "mu-law 8 kHz", "pcm": "16-bit PCM"}


class Playback:
    """What the caller has heard, from the carrier's mark echoes. Pure bookkeeping, no I/O."""

    def __init__(self) -> None:
        self._marks: deque[tuple[str, float]] = deque()
        self._serial = 0
        self.sent_s = 0.0  # agent audio sent since the last clear, in seconds
        self.heard_s = 0.0  # of which the caller has heard at least this much
        self.marked_s = 0.0  # audio covered by the newest mark
        self.played_out = asyncio.Event()
        self.played_out.set()

    @property
    def unplayed_s(self) -> float:
        return self.sent_s - self.heard_s

    def sent(self, seconds: float) -> None:
        self.sent_s += seconds
        self.played_out.clear()

    def next_mark(self, *, force: bool = False) -> str | None:
        """Name of a mark to send now, or None if none is due."""
        due = self.sent_s - self.marked_s
        if due <= 0 or (not force and (due < MARK_EVERY_S or len(self._marks) >= MAX_OUTSTANDING_MARKS)):
            return None
        self._serial += 1
        name = f"m{self._serial}"
        self._marks.append((name, self.sent_s))
        self.marked_s = self.sent_s
        return name

    def echoed(self, name: str) -> None:
        if not any(mark == name for mark, _ in self._marks):
            return  # a void mark (sent before a clear) or one we never sent
        while self._marks:  # marks echo in order: every earlier one has played too
            mark, at = self._marks.popleft()
            self.heard_s = max(self.heard_s, at)
            if mark == name:
                break
        if not self._marks and self.marked_s >= self.sent_s:
            self.played_out.set()

    def void(self) -> None:
        """After a clear: nothing is queued any more, and outstanding marks prove nothing."""
        self._marks.clear()
        self.sent_s = self.heard_s = self.marked_s = 0.0
        self.played_out.set()


class Playout:
    """One call's audio to the caller: conversion, sending, marks, barge-in, the agent's side
    of the recording. Knows nothing of call states: the session says when the call is leaving
    (`leaving`), from which point every send carries a mark."""

    def __init__(self, output_format: str, log: Any, recorder: CallRecorder | None = None) -> None:
        self.playback = Playback()
        self.carrier: CarrierLeg | None = None
        self.leaving = False
        self._converter = DownlinkConverter(output_format)
        self._recorder = recorder
        self._log = log
        self.agent_spoke_at = 0.0  # when the agent's latest audio arrived (monotonic)
        self.first_audio_at = 0.0  # when its first did (for the time-to-first-audio metric)
        self._sniffed = bytearray()  # the agent's first audio, until its encoding is told
        self._sniff_windows = MAX_SNIFF_WINDOWS

    def agent_format(self, output_format: str) -> None:
        """The agent's `ack` named its output format: convert from that, and trust it."""
        expected = self._converter.source_format
        if output_format not in OUTPUT_FORMATS:
            self._log.error("agent_output_format_unknown", agent_format=output_format, expected=expected)
            return
        if output_format != expected:
            self._log.warning(
                "agent_output_format_differs",
                agent_format=output_format,
                expected=expected,
                hint="the agent's ack names its own output format; it wins over CARTESIA_OUTPUT_FORMAT",
            )
            self._converter = DownlinkConverter(output_format)
        self._sniff_windows = 0

    async def agent_audio(self, payload_b64: str) -> None:
        """A frame of the agent's speech, in its output format."""
        self.agent_spoke_at = now = time.monotonic()
        if not self.first_audio_at:
            self.first_audio_at = now
        if self.carrier is None:
            return
        try:
            audio = decode_payload(payload_b64)
            if self._sniff_windows:
                self._sniff(audio)
            # mu-law 8 kHz goes to the caller as it came, without re-encoding
            mulaw = audio if self._converter.passthrough else self._converter.convert(audio)
        except ValueError as exc:  # ProtocolError (base64) or AudioFormatError
            self._log.warning("agent_frame_dropped", error=str(exc))
            return
        if mulaw:  # empty for a chunk too short to make an 8 kHz sample
            await self.send(mulaw, payload_b64 if mulaw is audio else None)

    def _sniff(self, audio: bytes) -> None:
        """Log one clear error when the agent's audio is not in the encoding the gateway
        converts from: the caller would hear noise, and an operator would hunt it on the line."""
        self._sniffed += audio
        if len(self._sniffed) < SNIFF_BYTES:
            return
        heard = looks_like(bytes(self._sniffed))
        self._sniffed.clear()
        self._sniff_windows = 0 if heard else self._sniff_windows - 1
        expected = self._converter.encoding
        if heard and heard != expected:
            self._log.error(
                "agent_output_format_mismatch",
                expected=self._converter.source_format,
                heard=ENCODING_NAMES[heard],
                hint=f"the agent sends {ENCODING_NAMES[heard]}, not {self._converter.source_format}: "
                "set CARTESIA_OUTPUT_FORMAT to the agent's configured output format",
            )

    async def send(self, mulaw: bytes, payload_b64: str | None = None, *, mark: bool = False) -> None:
        """Send mu-law 8 kHz to the caller (`payload_b64`: the same bytes, already base64),
        record and count it, and mark it when a mark is due, the call is leaving, or `mark`."""
        carrier = self.carrier
        if carrier is None:
            return
        await carrier.send_audio(payload_b64 or base64.b64encode(mulaw).decode())
        if self._recorder is not None:
            self._recorder.agent(mulaw)
        playback = self.playback
        playback.sent(mulaw_duration_s(len(mulaw)))
        name = playback.next_mark(force=mark or self.leaving)
        if name is not None:
            await carrier.send_mark(name)

    async def agent_stopped(self) -> None:
        """The agent has gone: whatever the converter still holds of its last words goes out
        (nothing, with the minimum-phase filter of gateway.resample; kept for converters that
        hold audio back)."""
        if not self._converter.passthrough:
            tail = self._converter.flush()
            if tail:
                await self.send(tail)

    async def dtmf(self, digits: str) -> bool:
        """Play DTMF tones to the caller; False (and logged) when `digits` are not DTMF."""
        try:
            tones = dtmf_mulaw(digits)
        except ValueError as exc:
            self._log.warning("dtmf_refused", error=str(exc))
            return False
        await self.send(tones, mark=True)
        return True

    async def barge_in(self) -> None:
        """The agent cleared its speech: the caller's queue, the resampler and the outstanding
        marks are all void."""
        self._log.info("agent_clear", unplayed_s=round(self.playback.unplayed_s, 3))
        if self.carrier is not None:
            await self.carrier.send_clear()
        self._converter.reset()
        self.playback.void()
        if self._recorder is not None:
            self._recorder.agent_cleared()

    async def played_out(self, extra_s: float) -> bool:
        """Wait until the caller has heard everything sent, at most the unplayed audio plus
        `extra_s`; False if that ran out."""
        budget = self.playback.unplayed_s + extra_s
        try:
            async with asyncio.timeout(budget):
                name = self.playback.next_mark(force=True)
                if name is not None and self.carrier is not None:
                    await self.carrier.send_mark(name)
                await self.playback.played_out.wait()
        except TimeoutError:
            self._log.warning("drain_timed_out", waited_s=round(budget, 2))
            return False
        return True

    async def agent_quiet(self, quiet_s: float, within_s: float, agent_left: asyncio.Event) -> None:
        """Wait until no agent audio has arrived for `quiet_s` from now on, or the agent has
        left, at most `within_s`."""
        started = time.monotonic()
        deadline = started + within_s
        while not agent_left.is_set():
            wait = min(max(self.agent_spoke_at, started) + quiet_s, deadline) - time.monotonic()
            if wait <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await agent_left.wait()

    def replace_carrier(self, carrier: CarrierLeg) -> None:
        """A newer stream for the call: what the old one queued is gone with it."""
        self.carrier = carrier
        self.playback.void()
