"""Pure audio helpers for the Twilio <-> Cartesia gateway.

Everything here is bytes in, bytes out: no I/O, no globals that change, no
event loop.  Conventions used throughout:

* "PCM" means 16-bit signed little-endian mono samples ("pcm16").
* "mu-law" means G.711 mu-law, one byte per sample; Twilio media streams are
  always mu-law at 8 kHz in 20 ms frames of 160 bytes.
* Malformed input (odd-length PCM, unknown format names, out-of-range
  parameters) raises :class:`AudioFormatError`, a ``ValueError``.

Hot paths (run every 20 ms for every call) avoid Python loops over samples:
they use ``audioop`` (C), numpy and soxr.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings

import numpy as np
import soxr

with warnings.catch_warnings():
    # audioop is deprecated in 3.11/3.12 (removed in 3.13, where the
    # `audioop-lts` package provides the same module); it is still the
    # fastest G.711 codec available, so silence the import-time warning.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = [
    "DTMF_FREQS",
    "DTMF_GAP_MS",
    "DTMF_PAUSE_MS",
    "DTMF_TONE_MS",
    "FRAME_MS",
    "MULAW_FRAME_BYTES",
    "OUTPUT_FORMATS",
    "SAMPLE_RATE_TELEPHONY",
    "AudioFormatError",
    "DownlinkConverter",
    "detect_dtmf",
    "dtmf_mulaw",
    "dtmf_pcm16",
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


class DownlinkConverter:
    """Streams agent audio in one of OUTPUT_FORMATS to mu-law 8 kHz.

    One instance per call (it holds resampler state).  Chunks may be any
    size, including odd byte counts for PCM: a trailing odd byte is kept and
    prefixed to the next chunk so samples never lose alignment.
    """

    def __init__(self, source_format: str) -> None:
        encoding, rate = _lookup_format(source_format)
        self.source_format = source_format
        self.encoding = encoding
        self.in_rate = rate
        # Twilio already speaks mu-law 8 kHz: callers may skip decode entirely.
        self.passthrough: bool = (encoding, rate) == ("mulaw", SAMPLE_RATE_TELEPHONY)
        self._pending = b""  # odd trailing PCM byte carried to the next call
        self._resampler: soxr.ResampleStream | None = None
        if encoding == "pcm" and rate != SAMPLE_RATE_TELEPHONY:
            # HQ = proper anti-alias filtering (naive decimation would fold
            # everything above 4 kHz back into the voice band) at modest CPU.
            self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE_TELEPHONY, 1, dtype="int16", quality="HQ")

    def convert(self, chunk: bytes) -> bytes:
        """Convert one chunk; returns mu-law 8 kHz bytes (possibly empty).

        Output can be empty/short at first while the resampler fills its
        filter (a few ms of delay); flush() returns what is held back.
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
        samples = np.frombuffer(data, dtype="<i2", count=even // 2)
        out = self._resampler.resample_chunk(samples.astype(np.int16, copy=False))
        return self._encode(out)

    def flush(self) -> bytes:
        """End of an utterance: drain the resampler tail as mu-law.

        A dangling odd byte (half a sample) cannot be decoded and is dropped.
        The converter is ready for a fresh stream afterwards.
        """
        self._pending = b""
        if self._resampler is None:
            return b""
        out = self._resampler.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
        # soxr must not be fed after last=True; start a clean stream.
        self._resampler.clear()
        return self._encode(out)

    def reset(self) -> None:
        """Forget all buffered state (barge-in 'clear'); output restarts clean."""
        self._pending = b""
        if self._resampler is not None:
            self._resampler.clear()

    @staticmethod
    def _encode(samples: np.ndarray) -> bytes:
        if samples.size == 0:
            return b""
        return pcm16_to_ulaw(samples.astype("<i2", copy=False).tobytes())


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
    if seconds < 0:
        raise AudioFormatError(f"seconds must be >= 0, got {seconds!r}")
    n = round(seconds * rate)
    x = amplitude * _FULL_SCALE * np.sin(2.0 * np.pi * freq * np.arange(n) / rate)
    return np.round(x).astype("<i2").tobytes()


# --------------------------------------------------------------------------
# DTMF generation and detection
# --------------------------------------------------------------------------

_DTMF_LOW = (697, 770, 852, 941)
_DTMF_HIGH = (1209, 1336, 1477, 1633)
_DTMF_GRID = ("123A", "456B", "789C", "*0#D")  # rows: low tone, cols: high tone

DTMF_FREQS: dict[str, tuple[int, int]] = {
    key: (low, high)
    for low, row in zip(_DTMF_LOW, _DTMF_GRID, strict=True)
    for high, key in zip(_DTMF_HIGH, row, strict=True)
}

DTMF_TONE_MS = 100
DTMF_GAP_MS = 60
DTMF_PAUSE_MS = 500  # what a 'w' in a digit string produces
_DTMF_PAUSE_CHAR = "w"
_DTMF_RAMP_MS = 4  # raised-cosine edges: avoids clicks / spectral splatter
_DTMF_MIN_RATE = 2 * max(_DTMF_HIGH) + 1  # Nyquist for the top tone


def _check_dtmf_digits(digits: str) -> None:
    for pos, ch in enumerate(digits):
        if ch not in DTMF_FREQS and ch != _DTMF_PAUSE_CHAR:
            allowed = "".join(DTMF_FREQS) + _DTMF_PAUSE_CHAR
            raise AudioFormatError(f"invalid DTMF character {ch!r} at position {pos}; allowed: {allowed}")


def _check_dtmf_rate(rate: int) -> None:
    _check_rate(rate)
    if rate < _DTMF_MIN_RATE:
        raise AudioFormatError(f"DTMF needs a sample rate >= {_DTMF_MIN_RATE} Hz, got {rate}")


def dtmf_pcm16(digits: str, rate: int = 8000, amplitude: float = 0.35) -> bytes:
    """Render a DTMF digit string as PCM16 LE.

    Each digit is a DTMF_TONE_MS two-tone burst followed by DTMF_GAP_MS of
    silence; 'w' is DTMF_PAUSE_MS of silence.  Each sine has peak
    ``amplitude/2`` of full scale, so the sum never exceeds ``amplitude``
    (0..1) and never clips.  Raises AudioFormatError naming any bad char.
    """
    _check_dtmf_digits(digits)
    _check_dtmf_rate(rate)
    _check_amplitude(amplitude)
    tone_n = round(rate * DTMF_TONE_MS / 1000)
    gap = np.zeros(round(rate * DTMF_GAP_MS / 1000))
    pause = np.zeros(round(rate * DTMF_PAUSE_MS / 1000))

    ramp_n = min(round(rate * _DTMF_RAMP_MS / 1000), tone_n // 2)
    envelope = np.ones(tone_n)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp_n) / ramp_n)  # 0 -> ~1
    envelope[:ramp_n] = ramp
    envelope[tone_n - ramp_n :] = ramp[::-1]
    phase = 2.0 * np.pi * np.arange(tone_n) / rate
    peak = amplitude / 2 * _FULL_SCALE

    parts: list[np.ndarray] = []
    for ch in digits:  # per digit, not per sample
        if ch == _DTMF_PAUSE_CHAR:
            parts.append(pause)
            continue
        low, high = DTMF_FREQS[ch]
        parts.append(peak * envelope * (np.sin(low * phase) + np.sin(high * phase)))
        parts.append(gap)
    if not parts:
        return b""
    return np.round(np.concatenate(parts)).astype("<i2").tobytes()


def dtmf_mulaw(digits: str) -> bytes:
    """DTMF digits as 8 kHz mu-law, ready to send to Twilio."""
    return pcm16_to_ulaw(dtmf_pcm16(digits, SAMPLE_RATE_TELEPHONY))


# Detector tuning (documented bounds):
_DETECT_BLOCK_MS = 20  # 50 Hz resolution; a 100 ms tone spans >= 4 full blocks
_DETECT_MIN_BLOCKS = 2  # debounce: a digit needs >= 2 consecutive blocks (>= 40 ms)
_DETECT_MIN_DBFS = -45.0  # quieter blocks are treated as silence
_DETECT_MIN_PAIR_SHARE = 0.7  # the two tones must hold >= 70% of block energy
_DETECT_MIN_TONE_SHARE = 0.1  # ... and each tone >= 10% (-10 dB)
_DETECT_MAX_TWIST_DB = 8.0  # |high - low| tone level difference allowed
_DETECT_MIN_GROUP_MARGIN_DB = 6.0  # winner vs runner-up within a group


@functools.lru_cache(maxsize=8)
def _dtmf_basis(n: int, rate: int) -> np.ndarray:
    """(n, 8) complex DFT basis at the 8 DTMF frequencies (low then high).

    ``blocks @ basis`` yields, for every block at once, exactly the power a
    Goertzel filter computes per frequency, without a per-sample Python loop.
    """
    freqs = np.array(_DTMF_LOW + _DTMF_HIGH, dtype=np.float64)
    basis = np.exp(-2j * np.pi * np.outer(np.arange(n), freqs) / rate)
    basis.flags.writeable = False
    return basis


def _block_digits(x: np.ndarray, rate: int) -> list[str | None]:
    """Per-block classification (one digit or None per ~20 ms block)."""
    n = round(rate * _DETECT_BLOCK_MS / 1000)
    nblocks = x.size // n
    if nblocks == 0:
        return []
    blocks = x[: nblocks * n].reshape(nblocks, n)
    energy = np.einsum("ij,ij->i", blocks, blocks)  # sum of squares per block
    power = np.abs(blocks @ _dtmf_basis(n, rate)) ** 2
    # Share of block energy at each frequency: a pure sine filling the block
    # scores ~1.0, so the numbers are independent of level and block size.
    share = 2.0 * power / (n * np.maximum(energy, 1e-12)[:, None])
    low, high = share[:, :4], share[:, 4:]
    lo_idx, hi_idx = low.argmax(axis=1), high.argmax(axis=1)
    rows = np.arange(nblocks)
    lo_best, hi_best = low[rows, lo_idx], high[rows, hi_idx]
    lo_second = np.sort(low, axis=1)[:, -2]
    hi_second = np.sort(high, axis=1)[:, -2]

    min_energy = n * (_DBFS_REF * 10 ** (_DETECT_MIN_DBFS / 20)) ** 2
    twist = 10 ** (_DETECT_MAX_TWIST_DB / 10)
    margin = 10 ** (_DETECT_MIN_GROUP_MARGIN_DB / 10)
    ok = (
        (energy >= min_energy)
        & (lo_best >= _DETECT_MIN_TONE_SHARE)
        & (hi_best >= _DETECT_MIN_TONE_SHARE)
        & (lo_best + hi_best >= _DETECT_MIN_PAIR_SHARE)
        & (hi_best <= lo_best * twist)
        & (lo_best <= hi_best * twist)
        & (lo_best >= lo_second * margin)
        & (hi_best >= hi_second * margin)
    )
    return [
        _DTMF_GRID[lo][hi] if good else None
        for good, lo, hi in zip(ok.tolist(), lo_idx.tolist(), hi_idx.tolist(), strict=True)
    ]


def detect_dtmf(pcm16: bytes, rate: int = 8000) -> str:
    """Detect DTMF digits in PCM16 LE audio; returns them in order.

    Goertzel-style detection on non-overlapping ~20 ms blocks: the strongest
    low- and high-group tones must together dominate the block energy, each
    be loud enough, be within the twist limit of each other and clearly beat
    their group's runner-up.  A digit is reported once per contiguous run of
    >= 2 blocks, so "11" needs a gap between the tones (>= 1 block, i.e. the
    standard 40+ ms inter-digit gap).  Trailing partial blocks are ignored.
    """
    _check_dtmf_rate(rate)
    x = _samples(pcm16)
    out: list[str] = []
    prev: str | None = None
    run = 0
    for digit in _block_digits(x, rate):  # ~50 iterations per second of audio
        run = run + 1 if digit is not None and digit == prev else 1
        if digit is not None and run == _DETECT_MIN_BLOCKS:
            out.append(digit)
        prev = digit
    return "".join(out)
