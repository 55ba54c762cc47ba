"""What a simulated caller says and does: the call script and its audio.

:class:`CallScript` is the input to :meth:`gateway.sandbox.caller.SimulatedCall.run`;
:func:`wav_to_mulaw` turns a WAV file into the 8 kHz mono mu-law a Twilio caller sends.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soxr

from gateway.audio import SAMPLE_RATE_TELEPHONY, pcm16_to_ulaw

__all__ = ["CallScript", "wav_to_mulaw"]


def wav_to_mulaw(path: str | Path) -> bytes:
    """A WAV file of any rate, channel count and sample width as 8 kHz mono mu-law, the way
    a Twilio caller's audio arrives. Channels are mixed down; the rate is converted with soxr
    (anti-aliased), not by dropping samples."""
    with warnings.catch_warnings():
        # pydub warns at import when ffmpeg is missing; reading WAV does not need it.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from pydub import AudioSegment
        from pydub.exceptions import CouldntDecodeError

    data = Path(path).read_bytes()
    try:
        segment = AudioSegment(data)  # parses the WAV itself: no ffmpeg
    except (CouldntDecodeError, struct.error, IndexError) as exc:
        raise ValueError(f"not a PCM WAV file ({exc or type(exc).__name__})") from None
    segment = segment.set_channels(1).set_sample_width(2)
    samples = np.frombuffer(segment.raw_data, dtype="<i2")
    if segment.frame_rate != SAMPLE_RATE_TELEPHONY and samples.size:
        resampled = soxr.resample(samples, segment.frame_rate, SAMPLE_RATE_TELEPHONY, quality="HQ")
        samples = np.clip(np.round(resampled), -32768, 32767).astype("<i2")
    return pcm16_to_ulaw(samples.astype("<i2", copy=False).tobytes())


@dataclass
class CallScript:
    """What the caller does: speaks `audio` (mu-law 8 kHz) from `speak_at`, presses keys.

    `wav` names a WAV file (any rate, channels, width) to speak instead of `audio`; it is
    converted to 8 kHz mono mu-law when the call runs.
    """

    audio: bytes = b""
    speak_at: float = 0.0
    wav: str | Path | None = None
    dtmf: list[tuple[float, str]] = field(default_factory=list)
    hangup_at: float | None = None
    max_s: float = 30.0
