"""DTMF (touch-tone) generation and detection, pure like :mod:`gateway.audio`.

Bytes in, bytes out, same conventions as :mod:`gateway.audio` (PCM16 LE
mono; 8 kHz mu-law for Twilio).  Bad digits, rates or amplitudes raise
:class:`gateway.audio.AudioFormatError`.  This module builds on the codec and
level helpers of :mod:`gateway.audio`; that module does not import this one.
"""

from __future__ import annotations

import functools

import numpy as np

from gateway.audio import (
    _DBFS_REF,
    _FULL_SCALE,
    SAMPLE_RATE_TELEPHONY,
    AudioFormatError,
    _check_amplitude,
    _check_rate,
    _samples,
    pcm16_to_ulaw,
)

__all__ = [
    "DTMF_FREQS",
    "DTMF_GAP_MS",
    "DTMF_PAUSE_MS",
    "DTMF_TONE_MS",
    "detect_dtmf",
    "dtmf_mulaw",
    "dtmf_pcm16",
]

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
