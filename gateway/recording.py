"""Local stereo recording of a call: caller on the left channel, agent on the right.

Both parties' audio is kept as 8 kHz mu-law (what Twilio carries, one byte per
sample) in two bytearrays indexed by sample offset from the start of the media
stream, so the two tracks stay aligned in time however the audio arrives:

* caller audio is placed at its Twilio ``media.timestamp`` (ms since the stream
  started), so a late or reordered frame still lands where it was spoken;
* agent audio is sent to Twilio *ahead* of playback and queued there, so it is
  placed where it will actually be heard: at ``max(now, end of the queued
  agent audio)``; a barge-in ``clear`` drops what was queued beyond now.

Gaps are mu-law silence; a later write over the same region wins.  Everything
is pure bytes bookkeeping (no sockets, no event loop, no per-sample Python
loops) except :meth:`CallRecorder.write_wav`, which writes the file at the end
of the call.
"""

from __future__ import annotations

import asyncio
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from gateway.audio import SAMPLE_RATE_TELEPHONY, ulaw_to_pcm16

with warnings.catch_warnings():
    # pydub warns at import when ffmpeg is missing; WAV export does not need it.
    # It also imports the deprecated audioop (see gateway.audio).
    warnings.simplefilter("ignore", RuntimeWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    from pydub import AudioSegment

__all__ = ["GAP_TOLERANCE_S", "MAX_RECORDING_S", "CallRecorder", "recording_path", "save_recording"]

log = structlog.get_logger(__name__)

# Longest call we record; audio beyond it is dropped (logged once per call).
# It bounds memory: each track holds 8000 B/s of mu-law, so 4 h is
# 4 * 3600 s * 8000 B/s = 115.2 MB per track, 230.4 MB for the two.  A typical
# 10 min call holds 9.6 MB.  write_wav and stereo_pcm16 briefly need about 6x
# the tracks' size again (16-bit PCM per channel plus an interleaved copy;
# measured): ~58 MB for 10 min, ~1.4 GB at the cap.
MAX_RECORDING_S = 4 * 3600

# Caller audio without a timestamp is appended to the previous caller audio
# unless the clock is more than this past its end: then frames were really
# missing and the gap is filled with silence.  60 ms = 3 Twilio frames of
# arrival jitter; smaller would shift audio on ordinary jitter, larger would
# silently shorten real gaps.
GAP_TOLERANCE_S = 0.060

_RATE = SAMPLE_RATE_TELEPHONY  # samples per second == bytes per second of mu-law
_GAP_TOLERANCE_SAMPLES = round(GAP_TOLERANCE_S * _RATE)
_MULAW_SILENCE = b"\xff"  # mu-law zero (0x7F is the other one; 0xFF is what encoders emit)


class CallRecorder:
    """Two time-aligned mu-law tracks of one call; t=0 is construction time.

    ``clock`` returns seconds on any monotonic scale (only differences matter);
    tests pass a fake they advance by hand.  ``max_s`` caps the recording
    (see MAX_RECORDING_S).
    """

    def __init__(
        self, *, max_s: float = MAX_RECORDING_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (math.isfinite(max_s) and max_s > 0):
            raise ValueError(f"max_s must be a positive number of seconds, got {max_s!r}")
        self._clock = clock
        self._t0 = clock()  # the media stream's start
        self._max_s = max_s
        self._max_samples = round(max_s * _RATE)
        self._caller = bytearray()
        self._agent = bytearray()
        self._caller_end = 0  # sample just past the previous caller audio
        # Sample just past the agent audio queued for playback; may run ahead of "now".
        self._agent_end = 0
        self._limit_logged = False

    # ------------------------------------------------------------------
    # Feeding audio
    # ------------------------------------------------------------------

    def caller(self, mulaw: bytes, at_s: float | None = None) -> None:
        """Caller audio (8 kHz mu-law) that started ``at_s`` seconds after t=0.

        Pass Twilio's ``media.timestamp / 1000``.  Without a timestamp (or a
        non-finite one) the audio follows the previous caller audio, or starts
        at the clock's now if that is more than GAP_TOLERANCE_S later (frames
        went missing: the gap stays silent).  A negative ``at_s`` counts as 0.
        """
        if at_s is not None and math.isfinite(at_s):
            offset = max(0, round(at_s * _RATE))
        else:
            now = self._now_samples()
            # Ordinary jitter keeps the audio contiguous; a real gap keeps wall-clock time.
            offset = now if now - self._caller_end > _GAP_TOLERANCE_SAMPLES else self._caller_end
        self._place(self._caller, offset, mulaw)
        self._caller_end = offset + len(mulaw)

    def agent(self, mulaw: bytes) -> None:
        """Agent audio (8 kHz mu-law) as just sent to the caller.

        It is sent ahead of playback and queued behind what was sent before,
        so it is heard (and placed) at max(now, end of the queued agent audio).
        """
        offset = max(self._now_samples(), self._agent_end)
        self._place(self._agent, offset, mulaw)
        self._agent_end = offset + len(mulaw)

    def agent_cleared(self) -> None:
        """Barge-in: the caller's playback buffer was dropped.

        Agent audio placed beyond now was never heard: truncate the agent
        track to now; the next agent audio starts at now.
        """
        now = self._now_samples()
        if len(self._agent) > now:
            del self._agent[now:]
        self._agent_end = min(self._agent_end, now)

    # ------------------------------------------------------------------
    # Output
    # ------------------------------------------------------------------

    @property
    def duration_s(self) -> float:
        """Length of the recording so far: the longer of the two tracks."""
        return max(len(self._caller), len(self._agent)) / _RATE

    def stereo_pcm16(self) -> tuple[bytes, int]:
        """(interleaved 16-bit LE stereo PCM, frame rate): caller left, agent right.

        The shorter track is padded with silence to the longer one's length.
        """
        left, right = self._pcm16_tracks()
        stereo = np.empty((len(left) // 2, 2), dtype="<i2")
        stereo[:, 0] = np.frombuffer(left, dtype="<i2")
        stereo[:, 1] = np.frombuffer(right, dtype="<i2")
        return stereo.tobytes(), _RATE

    def write_wav(self, path: str | Path) -> Path:
        """Write the recording as a 16-bit 8 kHz stereo WAV; creates parent dirs."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        left, right = (
            AudioSegment(data=pcm, sample_width=2, frame_rate=_RATE, channels=1)
            for pcm in self._pcm16_tracks()
        )
        handle = AudioSegment.from_mono_audiosegments(left, right).export(str(path), format="wav")
        handle.close()  # pydub returns the file it opened and leaves closing it to us
        return path

    # ------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------

    def _now_samples(self) -> int:
        return max(0, round((self._clock() - self._t0) * _RATE))

    def _place(self, track: bytearray, offset: int, mulaw: bytes) -> None:
        """Write ``mulaw`` at ``offset``: silence-fill up to it, overwrite what is there."""
        if offset + len(mulaw) > self._max_samples:
            self._limit_reached()
            mulaw = mulaw[: max(0, self._max_samples - offset)]
            if not mulaw:
                return
        if offset > len(track):
            track.extend(_MULAW_SILENCE * (offset - len(track)))
        track[offset : offset + len(mulaw)] = mulaw

    def _limit_reached(self) -> None:
        if not self._limit_logged:  # once per call: every later frame would hit it too
            self._limit_logged = True
            log.warning("recording_limit_reached", max_s=self._max_s)

    def _pcm16_tracks(self) -> tuple[bytes, bytes]:
        """Both tracks padded with silence to the same length, decoded to PCM16 LE."""
        n = max(len(self._caller), len(self._agent))
        left = ulaw_to_pcm16(bytes(self._caller) + _MULAW_SILENCE * (n - len(self._caller)))
        right = ulaw_to_pcm16(bytes(self._agent) + _MULAW_SILENCE * (n - len(self._agent)))
        return left, right


def recording_path(directory: str | Path, call_sid: str) -> Path:
    """``<directory>/<call_sid>.wav``; the call SID must be ASCII letters and digits.

    The SID comes from the carrier and goes into a filename: anything else
    (``../x``, ``a/b``, empty) raises ValueError rather than escape ``directory``.
    """
    if not (call_sid.isascii() and call_sid.isalnum()):
        raise ValueError(f"call_sid must be ASCII letters and digits, got {call_sid!r}")
    return Path(directory) / f"{call_sid}.wav"


async def save_recording(recorder: CallRecorder, directory: str | Path, call_sid: str, log: Any) -> None:
    """Write the call's WAV to ``<directory>/<call_sid>.wav``, or ``<call_sid>-2.wav`` and on
    when a later agent session of the same call (after a transfer) already wrote one; log where
    it went, or why it did not."""
    try:
        path = recording_path(directory, call_sid)
        serial = 1
        while path.exists():
            serial += 1
            path = path.with_name(f"{call_sid}-{serial}.wav")
        # pydub writes synchronously; a long call's WAV must not stall other calls.
        await asyncio.to_thread(recorder.write_wav, path)
    except Exception as exc:
        log.error("recording_not_saved", error=str(exc))
        return
    log.info("recording_saved", path=str(path), duration_s=round(recorder.duration_s, 2))
