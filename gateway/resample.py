"""Low-delay streaming decimation of 16-bit PCM to 8 kHz (the downlink's resampler).

Pure numpy: no I/O, no state outside :class:`Decimator` instances; the filters are designed on
first use for each input rate and cached.

Why a minimum-phase FIR: soxr HQ, used before, aligns its linear-phase filter by holding its
delay back (66 / 21 / 73 ms at 16 / 24 / 44.1 kHz, measured), so every agent response reached
the caller that late and opened with the stale tail of the previous one. A short linear-phase
FIR would still hold back half its length (1.5 ms here) until the next audio or a flush. A
minimum-phase filter with the same magnitude puts its energy at the start of its impulse
response: through DownlinkConverter the measured group delay in 300-3400 Hz is at most
0.50 / 0.57 / 0.62 ms, nothing is held back (each chunk yields at once all the 8 kHz output it
can), and all that is left at the end of an utterance is the filter's decaying ringing.

The filter: a Kaiser-windowed sinc at the input rate (cutoff 3950 Hz, designed for 55 dB,
passband to 3400 Hz, stopband from 4500 Hz, which folds to 3500 Hz) made minimum-phase by the
cepstral method on its full magnitude (log|H|, not log|H| / 2, which would give sqrt|H|; the
minimum-phase twin of an N-tap FIR has N taps): 49 / 73 / 133 taps. Measured on the taps:
passband ripple within +-0.03 dB, >= 54.6 dB down from 4.5 kHz; through DownlinkConverter
(mu-law): 4.5 kHz -56 dB, 5 kHz -64 dB, 300-3400 Hz within -0.17 / +0.14 dB. It is evaluated
only at the output positions: exact picks for 16 and 24 kHz (ratios 2 and 3); for 44.1 kHz
linear interpolation between two adjacent filtered samples, which is accurate because the
signal is band-limited far below 44.1 kHz (before mu-law, SNR 62 / 43 / 41 dB for 1 / 3 /
3.4 kHz tones; mu-law itself allows ~38). Cost: ~5 µs per 20 ms frame at 16 and 24 kHz, like
soxr HQ; ~11 µs at 44.1 kHz (soxr ~6), where the windows have to be gathered.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["MAX_GAIN", "OUT_RATE", "Decimator", "kaiser_lowpass", "lowpass_taps", "minimum_phase"]

OUT_RATE = 8000
PASS_HZ = 3400.0  # top of the telephone voice band
STOP_HZ = 4500.0  # from here up, attenuated by at least STOP_DB (folds to <= 3.5 kHz)
CUTOFF_HZ = 3950.0
STOP_DB = 55.0
# The filters overshoot full scale by at most sum(|taps|) (~2.4): DownlinkConverter's mu-law
# table covers this many times full scale.
MAX_GAIN = 4

_F32 = np.float32
_F32_SIZE = np.dtype(_F32).itemsize


def _kaiser_beta(atten_db: float) -> float:
    if atten_db > 50:
        return 0.1102 * (atten_db - 8.7)
    if atten_db > 21:
        return 0.5842 * (atten_db - 21) ** 0.4 + 0.07886 * (atten_db - 21)
    return 0.0


def kaiser_lowpass(rate: int, cutoff_hz: float, ntaps: int, atten_db: float) -> np.ndarray:
    """Linear-phase windowed-sinc low-pass, unity gain at DC."""
    n = np.arange(ntaps) - (ntaps - 1) / 2
    h = np.sinc(2 * cutoff_hz / rate * n) * np.kaiser(ntaps, _kaiser_beta(atten_db))
    return h / h.sum()


def minimum_phase(h: np.ndarray) -> np.ndarray:
    """The minimum-phase FIR with the same length and magnitude response as ``h``.

    Homomorphic: fold the real cepstrum of log|H| onto positive quefrencies. The log of
    |H| itself is used (dividing it by two would give sqrt|H|, as some implementations do);
    stopband zeros are floored at -200 dB.
    """
    nfft = 1 << max(14, math.ceil(math.log2(32 * h.size)))
    log_mag = np.log(np.maximum(np.abs(np.fft.fft(h, nfft)), 1e-10))
    cepstrum = np.fft.ifft(log_mag).real
    fold = np.zeros(nfft)
    fold[0] = 1.0
    fold[1 : nfft // 2] = 2.0
    fold[nfft // 2] = 1.0
    return np.fft.ifft(np.exp(np.fft.fft(cepstrum * fold))).real[: h.size]


@functools.cache
def lowpass_taps(rate: int) -> np.ndarray:
    """The causal minimum-phase anti-alias low-pass for ``rate`` -> 8 kHz (float64, read-only)."""
    transition = 2 * math.pi * (STOP_HZ - PASS_HZ) / rate
    ntaps = math.ceil((STOP_DB - 7.95) / (2.285 * transition)) + 1  # Kaiser's length estimate
    taps = minimum_phase(kaiser_lowpass(rate, CUTOFF_HZ, ntaps, STOP_DB))
    taps /= taps.sum()  # unity gain at DC
    if np.abs(taps).sum() >= MAX_GAIN:
        raise RuntimeError(f"the {rate} Hz filter can overshoot more than MAX_GAIN")
    taps.flags.writeable = False
    return taps


_BLOCK = 16  # outputs per row of the block matrix product (integer ratios)


@functools.cache
def _weights(in_rate: int) -> np.ndarray:
    """The matrix Decimator multiplies windows of input by (float32, read-only, shared)."""
    taps = lowpass_taps(in_rate)
    g = math.gcd(in_rate, OUT_RATE)
    step, den = in_rate // g, OUT_RATE // g
    rev = taps[::-1]  # a window of input, oldest first, dot rev = the filtered newest sample
    if den == 1:
        # One row of input, buf[s : s + span], times this matrix is y at the window starts
        # s, s + step, ... s + step * (BLOCK - 1): a block of outputs per row, one BLAS call for
        # the chunk, without copying every window.
        weights = np.zeros((step * (_BLOCK - 1) + taps.size, _BLOCK))
        for u in range(_BLOCK):
            weights[u * step : u * step + taps.size, u] = rev
    else:
        # Rows: y[i - 1] and (y[i] - y[i - 1]) / den from one window of ntaps + 1 samples.
        weights = np.zeros((2, taps.size + 1))
        weights[0, :-1] = rev
        weights[1, 1:] = rev
        weights[1, :-1] -= rev
        weights[1] /= den
    weights = weights.astype(_F32)
    weights.flags.writeable = False
    return weights


class Decimator:
    """Streams int16 PCM at ``in_rate`` (> 8 kHz) to 8 kHz, with no look-ahead.

    Output sample k is the low-passed input at input position k * in_rate / 8000 for integer
    ratios; for the others at k * in_rate / 8000 - 1 (one input sample later, 23 µs at 44.1 kHz),
    linearly interpolated between the filtered samples either side, so that it never waits for
    input that has not arrived. After n input samples in all, ceil(n * 8000 / in_rate) output
    samples have come out, however the input was chunked.
    """

    _ROOM = 2048  # the longest chunk processed at once (longer ones go in pieces)

    def __init__(self, in_rate: int) -> None:
        if in_rate <= OUT_RATE:
            raise ValueError(f"input rate must exceed {OUT_RATE} Hz, got {in_rate}")
        g = math.gcd(in_rate, OUT_RATE)
        # Output k sits at input position k * step / den: integer arithmetic, no drift.
        self._step, self._den = in_rate // g, OUT_RATE // g
        self._ntaps = lowpass_taps(in_rate).size
        self._weights = _weights(in_rate)
        # The block rows of the last chunk read (and ignore) up to this far past its end.
        self._slack = self._step * _BLOCK + self._weights.shape[0] if self._den == 1 else 0
        # (phase, count) -> each output's window start and interpolation fraction; with steady
        # chunk sizes the phase repeats (20 ms is twice 441 samples at 44.1 kHz): computed once.
        self._plan: tuple[int, int, np.ndarray, np.ndarray] = (-1, 0, np.zeros(0, np.intp), np.zeros(0, _F32))
        # buf[start : start + ntaps] is the history (the last ntaps input samples) and the
        # chunk goes after it; the history moves back to the start when the next would not fit.
        self._buf = np.zeros(self._ntaps + 3 * self._ROOM + self._slack, dtype=_F32)
        self.reset()

    def reset(self) -> None:
        """Forget the filter history: the next input starts a fresh stream."""
        self._buf[: self._ntaps] = 0.0
        self._start = 0
        self._phase = 0  # next output's position past the history, in 1/den input samples

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Filter and decimate int16 samples; returns the float32 samples at 8 kHz (maybe none)."""
        n = samples.size
        if n > self._ROOM:  # a long chunk: in pieces, to bound the buffer and the temporaries
            pieces = [self.process(samples[i : i + self._ROOM]) for i in range(0, n, self._ROOM)]
            return np.concatenate(pieces)
        step, den, ntaps = self._step, self._den, self._ntaps
        buf, start = self._buf, self._start
        if start + ntaps + n + self._slack > buf.size:  # move the history back to the start
            buf[:ntaps] = buf[start : start + ntaps]
            start = 0
        buf[start + ntaps : start + ntaps + n] = samples
        self._start = start + n
        phase, limit = self._phase, n * den
        count = (limit - phase + step - 1) // step if limit > phase else 0
        self._phase = phase + count * step - limit
        if count == 0:
            return np.zeros(0, dtype=_F32)
        weights = self._weights
        if den == 1:
            # Output m is y at chunk sample i = phase + step * m, the filter over the window
            # buf[start + i + 1 : start + i + 1 + ntaps]; BLOCK of them per row.
            rows = -(-count // _BLOCK)
            offset, stride = (start + phase + 1) * _F32_SIZE, step * _BLOCK * _F32_SIZE
            windows = np.ndarray((rows, weights.shape[0]), _F32, buf, offset, (stride, _F32_SIZE))
            return np.dot(windows, weights).ravel()[:count]
        plan_phase, plan_count, where, frac = self._plan
        if plan_phase != phase or plan_count != count:
            where, rest = np.divmod(np.arange(phase, phase + count * step, step, dtype=np.intp), den)
            frac = rest.astype(_F32)
            self._plan = (phase, count, where, frac)
        # Output at chunk position where - 1 + frac / den, from y[where - 1] and y[where]: the
        # filter over buf[start + where :][:ntaps] and buf[start + where + 1 :][:ntaps].
        windows = np.ndarray((n, ntaps + 1), _F32, buf, start * _F32_SIZE, (_F32_SIZE, _F32_SIZE))
        pair = np.dot(weights, windows[where].T)
        out = frac * pair[1]
        out += pair[0]
        return out
