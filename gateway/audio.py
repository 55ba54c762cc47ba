"""Pure audio helpers for the Twilio <-> Cartesia gateway.

Everything here is bytes in, bytes out: no I/O, no globals that change, no
event loop.  Conventions used throughout:

* "PCM" means 16-bit signed little-endian mono samples ("pcm16").
* "mu-law" means G.711 mu-law, one byte per sample; Twilio media streams are
  always mu-law at 8 kHz in 20 ms frames of 160 bytes.
* Malformed input (odd-length PCM, unknown format names, out-of-range
  parameters) raises :class:`AudioFormatError`, a ``ValueError``.

Hot paths (run every 20 ms for every call) avoid Python loops over samples:
they use ``audioop`` (C) and numpy; the downlink's resampling filter is
:mod:`gateway.resample`.

DTMF generation and detection live in :mod:`gateway.dtmf`, which builds on
the helpers here (this module must not import it).
"""

from __future__ import annotations

import functools
import math
import sys
import warnings

import numpy as np

from gateway.resample import MAX_GAIN, Decimator

with warnings.catch_warnings():
    # audioop is deprecated in 3.11/3.12 (removed in 3.13, where the
    # `audioop-lts` package provides the same module); it is still the
    # fastest G.711 codec available, so silence the import-time warning.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = [
    "FRAME_MS",
    "MULAW_FRAME_BYTES",
    "OUTPUT_FORMATS",
    "SAMPLE_RATE_TELEPHONY",
    "AudioFormatError",
    "DownlinkConverter",
    "mulaw_duration_s",
    "pcm16_to_ulaw",
    "rms_dbfs",
    "tone_pcm16",
    "ulaw_to_pcm16",
]

SAMPLE_RATE_TELEPHONY = 8000
FRAME_MS = 20
MULAW_FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law (1 byte per sample)

# Agent (Cartesia) output format name -> (encoding, sample rate).
OUTPUT_FORMATS: dict[str, tuple[str, int]] = {
    "mulaw_8000": ("mulaw", 8000),
    "pcm_16000": ("pcm", 16000),
    "pcm_24000": ("pcm", 24000),
    "pcm_44100": ("pcm", 44100),
}

_FULL_SCALE = 32767.0  # peak of a positive int16 sample
_DBFS_REF = 32768.0  # rms of an all -32768 signal -> exactly 0 dBFS
# audioop works in native byte order; our wire format is little-endian.
_NATIVE_BIG_ENDIAN = sys.byteorder == "big"


class AudioFormatError(ValueError):
    """Audio data or an audio parameter is malformed or unsupported."""


# --------------------------------------------------------------------------
# G.711 mu-law
# --------------------------------------------------------------------------


def _require_even(data: bytes, what: str = "PCM16 data") -> None:
    if len(data) % 2:
        raise AudioFormatError(f"{what} must have an even number of bytes (2 per sample), got {len(data)}")


def ulaw_to_pcm16(data: bytes) -> bytes:
    """Decode mu-law bytes (any length) to 16-bit little-endian PCM (2x length).

    Decoded values lie in [-32124, 32124] (the mu-law range).
    """
    pcm = audioop.ulaw2lin(data, 2)
    return audioop.byteswap(pcm, 2) if _NATIVE_BIG_ENDIAN else pcm


def pcm16_to_ulaw(data: bytes) -> bytes:
    """Encode 16-bit little-endian PCM to mu-law (half the length).

    Raises AudioFormatError on odd length.  Magnitudes above 32124 saturate.
    Note: mu-law has two zeros (0x7F and 0xFF); both decode to 0, which
    re-encodes as 0xFF, so ulaw->pcm->ulaw is exact except 0x7F -> 0xFF.
    """
    _require_even(data)
    if _NATIVE_BIG_ENDIAN:
        data = audioop.byteswap(data, 2)
    return audioop.lin2ulaw(data, 2)


def mulaw_duration_s(nbytes: int) -> float:
    """Seconds of audio in ``nbytes`` of 8 kHz mu-law (nbytes >= 0)."""
    if nbytes < 0:
        raise AudioFormatError(f"byte count must be >= 0, got {nbytes}")
    return nbytes / SAMPLE_RATE_TELEPHONY


# --------------------------------------------------------------------------
# Downlink: agent audio -> Twilio mu-law 8 kHz
# --------------------------------------------------------------------------


def _lookup_format(name: str) -> tuple[str, int]:
    try:
        return OUTPUT_FORMATS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(OUTPUT_FORMATS))
        raise AudioFormatError(f"unknown audio output format {name!r}; known formats: {known}") from None


# The filter may overshoot full scale, by less than MAX_GAIN times: the
# mu-law of round(x), clipped, for every float x within that range, is
# _ulaw_table()[int(x + _ULAW_BIAS)].
_ULAW_BIAS = np.float32(MAX_GAIN * 32768 + 0.5)
_PCM16 = np.dtype("<i2")


@functools.cache
def _ulaw_table() -> np.ndarray:
    pcm = np.clip(np.arange(-MAX_GAIN * 32768, MAX_GAIN * 32768), -32768, 32767)
    return np.frombuffer(pcm16_to_ulaw(pcm.astype("<i2").tobytes()), dtype=np.uint8)


class DownlinkConverter:
    """Streams agent audio in one of OUTPUT_FORMATS to mu-law 8 kHz.

    One instance per call (it holds resampler state).  Chunks may be any
    size, including odd byte counts for PCM: a trailing odd byte is kept and
    prefixed to the next chunk so samples never lose alignment.

    PCM above 8 kHz goes through :class:`gateway.resample.Decimator`, a
    minimum-phase anti-alias filter: it adds well under 1 ms of delay and holds
    nothing back, so each chunk comes out whole at once (soxr HQ, used before,
    held back 21-73 ms of every utterance until the next audio or flush()).
    """

    def __init__(self, source_format: str) -> None:
        encoding, rate = _lookup_format(source_format)
        self.source_format = source_format
        self.encoding = encoding
        self.in_rate = rate
        # Twilio already speaks mu-law 8 kHz: callers may skip decode entirely.
        self.passthrough: bool = (encoding, rate) == ("mulaw", SAMPLE_RATE_TELEPHONY)
        self._pending = b""  # odd trailing PCM byte carried to the next call
        self._resampler: Decimator | None = None
        if encoding == "pcm" and rate != SAMPLE_RATE_TELEPHONY:
            # Anti-alias filtering: naive decimation would fold everything
            # above 4 kHz back into the voice band.
            self._resampler = Decimator(rate)
            self._ulaw = _ulaw_table()

    def convert(self, chunk: bytes) -> bytes:
        """Convert one chunk; returns mu-law 8 kHz bytes (possibly empty).

        All the output the chunk makes comes out at once: after n input
        samples in all, ceil(n * 8000 / in_rate) mu-law bytes (empty only for
        a chunk too short to complete an output sample).
        """
        if self.passthrough:
            return bytes(chunk)
        data = self._pending + bytes(chunk) if self._pending else bytes(chunk)
        even = len(data) & ~1
        self._pending = data[even:]
        if even == 0:
            return b""
        if self._resampler is None:  # PCM already at 8 kHz
            return pcm16_to_ulaw(data[:even])
        out = self._resampler.process(np.frombuffer(data, _PCM16, even // 2))
        if out.size == 0:
            return b""
        out += _ULAW_BIAS  # round, clip and encode: one table look-up
        return self._ulaw.take(out.astype(np.intp)).tobytes()

    def flush(self) -> bytes:
        """End of an utterance: the converter is ready for a fresh stream.

        Nothing is held back, so there is nothing to drain: returns b"".  A
        dangling odd byte (half a sample) cannot be decoded and is dropped,
        and the filter's history is forgotten (the next utterance does not
        open with the ringing of this one's last samples).
        """
        self.reset()
        return b""

    def reset(self) -> None:
        """Forget all buffered state (barge-in 'clear'); output restarts clean."""
        self._pending = b""
        if self._resampler is not None:
            self._resampler.reset()


# --------------------------------------------------------------------------
# Levels and test tones
# --------------------------------------------------------------------------


def _samples(pcm16: bytes) -> np.ndarray:
    """PCM16 LE bytes -> float64 array (validates even length)."""
    _require_even(pcm16)
    return np.frombuffer(pcm16, dtype="<i2").astype(np.float64)


def rms_dbfs(pcm16: bytes) -> float:
    """RMS level in dBFS, range [-inf, 0.0]; empty or all-zero -> -inf.

    Reference is 32768, so a full-scale sine reads about -3.01 dBFS.
    """
    x = _samples(pcm16)
    if x.size == 0:
        return -math.inf
    ms = float(np.dot(x, x)) / x.size
    if ms <= 0.0:
        return -math.inf
    return min(0.0, 10.0 * math.log10(ms / (_DBFS_REF * _DBFS_REF)))


def _check_rate(rate: int) -> None:
    if not isinstance(rate, int) or rate <= 0:
        raise AudioFormatError(f"sample rate must be a positive int, got {rate!r}")


def _check_amplitude(amplitude: float) -> None:
    if not 0.0 <= amplitude <= 1.0:
        raise AudioFormatError(f"amplitude must be within [0, 1], got {amplitude!r}")


def tone_pcm16(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> bytes:
    """A sine of ``freq`` Hz (0 <= freq < rate/2) as PCM16 LE.

    ``amplitude`` is the peak as a fraction of full scale (0..1);
    length is round(seconds * rate) samples (seconds >= 0).
    """
    _check_rate(rate)
    _check_amplitude(amplitude)
    if not 0.0 <= freq < rate / 2:
        raise AudioFormatError(f"freq must be within [0, {rate / 2}) Hz, got {freq!r}")
    if not 0 <= seconds < math.inf:  # NaN and infinity too: round() would raise otherwise
        raise AudioFormatError(f"seconds must be finite and >= 0, got {seconds!r}")
    n = round(seconds * rate)
    x = amplitude * _FULL_SCALE * np.sin(2.0 * np.pi * freq * np.arange(n) / rate)
    return np.round(x).astype("<i2").tobytes()
