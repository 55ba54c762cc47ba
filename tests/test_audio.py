"""Tests for gateway.audio (pure codec / resampling / DTMF helpers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import resample
from gateway.audio import (
    FRAME_MS,
    MULAW_FRAME_BYTES,
    OUTPUT_FORMATS,
    SAMPLE_RATE_TELEPHONY,
    AudioFormatError,
    DownlinkConverter,
    mulaw_duration_s,
    pcm16_to_ulaw,
    rms_dbfs,
    tone_pcm16,
    ulaw_to_pcm16,
)
from gateway.dtmf import (
    DTMF_FREQS,
    DTMF_GAP_MS,
    DTMF_PAUSE_MS,
    DTMF_TONE_MS,
    detect_dtmf,
    dtmf_mulaw,
    dtmf_pcm16,
)
from gateway.resample import kaiser_lowpass, lowpass_taps, minimum_phase

MULAW_MAX = 32124  # largest magnitude mu-law can represent in 16-bit scale
PCM_FORMATS = ["pcm_16000", "pcm_24000", "pcm_44100"]


def _ints(pcm16: bytes) -> np.ndarray:
    return np.frombuffer(pcm16, dtype="<i2").astype(np.int64)


def _pcm(samples: np.ndarray) -> bytes:
    return np.asarray(samples).astype("<i2").tobytes()


def _assert_mulaw_close(got: bytes, expected: bytes) -> None:
    """Equal up to one mu-law step per sample.

    soxr applies TPDF dither to int16 output, so streams that differ only in
    chunking or in having been clear()ed may differ by an LSB or two before
    mu-law, which can flip a sample to the neighbouring mu-law code.
    """
    assert len(got) == len(expected)
    a, b = _ints(ulaw_to_pcm16(got)), _ints(ulaw_to_pcm16(expected))
    step = np.maximum(np.abs(a), np.abs(b)) // 16 + 16
    assert np.all(np.abs(a - b) <= step), f"max diff {np.abs(a - b).max()}"


def _uneven_chunks(data: bytes, nominal: int, seed: int) -> list[bytes]:
    """Split into ~nominal-sized chunks of varying size, many of them odd."""
    rng = np.random.default_rng(seed)
    chunks, i = [], 0
    while i < len(data):
        n = int(rng.integers(1, 2 * nominal))
        if rng.random() < 0.5:
            n |= 1  # force plenty of odd byte counts
        chunks.append(data[i : i + n])
        i += n
    assert any(len(c) % 2 for c in chunks)
    return chunks


def _tone_quality(pcm16: bytes, rate: int, freq: float, skip_s: float) -> tuple[float, float]:
    """(peak frequency in Hz, SNR in dB) of the middle of a tone recording.

    ``skip_s`` is dropped at both ends: the resampler's start-up transient
    and the abrupt end of the source tone would otherwise count as noise.
    """
    x = _ints(pcm16).astype(np.float64)
    skip = round(skip_s * rate)
    x = x[skip : x.size - skip]
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size))) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / rate)
    band = np.abs(freqs - freq) <= 25  # Hann main lobe is +-2 bins (~4 Hz here)
    snr = 10 * math.log10(spectrum[band].sum() / spectrum[~band].sum())
    return float(freqs[np.argmax(spectrum)]), snr


# --------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------


def test_constants_are_consistent() -> None:
    assert MULAW_FRAME_BYTES == SAMPLE_RATE_TELEPHONY * FRAME_MS // 1000 == 160
    assert OUTPUT_FORMATS == {
        "mulaw_8000": ("mulaw", 8000),
        "pcm_16000": ("pcm", 16000),
        "pcm_24000": ("pcm", 24000),
        "pcm_44100": ("pcm", 44100),
    }
    assert issubclass(AudioFormatError, ValueError)
    assert mulaw_duration_s(MULAW_FRAME_BYTES) == pytest.approx(0.02)
    assert mulaw_duration_s(0) == 0.0
    with pytest.raises(AudioFormatError):
        mulaw_duration_s(-1)


# --------------------------------------------------------------------------
# mu-law codec
# --------------------------------------------------------------------------


def test_pcm_ulaw_pcm_within_quantisation_error_exhaustive() -> None:
    x = np.arange(-32768, 32768, dtype=np.int64)
    y = _ints(ulaw_to_pcm16(pcm16_to_ulaw(_pcm(x))))
    inside = np.abs(x) <= MULAW_MAX
    # Half a quantisation step: steps grow with level (8 .. 1024 in 16-bit scale).
    assert np.all(np.abs(y - x)[inside] <= np.abs(x)[inside] / 32 + 8)
    # Beyond the mu-law range the codec saturates.
    assert np.all(np.abs(y[~inside]) == MULAW_MAX)
    assert np.all(np.sign(y[~inside]) == np.sign(x[~inside]))


@given(st.binary(max_size=400).filter(lambda b: len(b) % 2 == 0))
def test_pcm_ulaw_pcm_is_stable_after_one_pass(data: bytes) -> None:
    once = ulaw_to_pcm16(pcm16_to_ulaw(data))
    assert len(once) == len(data)
    assert ulaw_to_pcm16(pcm16_to_ulaw(once)) == once


def test_ulaw_pcm_ulaw_exact_for_all_256_codes() -> None:
    codes = bytes(range(256))
    pcm = ulaw_to_pcm16(codes)
    assert len(pcm) == 512
    back = pcm16_to_ulaw(pcm)
    # 0x7F is mu-law "negative zero": it decodes to 0, which encodes as 0xFF.
    expected = bytearray(codes)
    expected[0x7F] = 0xFF
    assert back == bytes(expected)
    assert _ints(pcm)[0x7F] == _ints(pcm)[0xFF] == 0
    # Every other code is reproduced exactly.
    assert [i for i in range(256) if back[i] != i] == [0x7F]


def test_ulaw_decode_is_little_endian() -> None:
    # 0x80 is the most positive code (+32124 = 0x7D7C).
    assert ulaw_to_pcm16(b"\x80") == (32124).to_bytes(2, "little", signed=True)
    assert ulaw_to_pcm16(b"") == b""
    assert pcm16_to_ulaw(b"") == b""


@pytest.mark.parametrize("n", [1, 3, 161])
def test_odd_length_pcm_raises(n: int) -> None:
    with pytest.raises(AudioFormatError, match="even"):
        pcm16_to_ulaw(b"\x00" * n)


# --------------------------------------------------------------------------
# DownlinkConverter
# --------------------------------------------------------------------------


def _run_converter(fmt: str, source: bytes, nominal_chunk: int, seed: int) -> bytes:
    conv = DownlinkConverter(fmt)
    out = bytearray()
    for chunk in _uneven_chunks(source, nominal_chunk, seed):
        out += conv.convert(chunk)
    out += conv.flush()
    return bytes(out)


@pytest.mark.parametrize("fmt", PCM_FORMATS)
@pytest.mark.parametrize("seed", [1, 2])
def test_downlink_resamples_tone_cleanly(fmt: str, seed: int) -> None:
    _, rate = OUTPUT_FORMATS[fmt]
    seconds = 1.0
    source = tone_pcm16(1000, seconds, rate, amplitude=0.5)
    conv = DownlinkConverter(fmt)
    assert conv.passthrough is False

    frame_bytes = rate * FRAME_MS // 1000 * 2  # ~20 ms of source PCM
    mulaw = _run_converter(fmt, source, frame_bytes, seed)

    expected = seconds * SAMPLE_RATE_TELEPHONY
    assert abs(len(mulaw) - expected) <= 0.003 * SAMPLE_RATE_TELEPHONY  # +-3 ms
    peak, snr = _tone_quality(ulaw_to_pcm16(mulaw), SAMPLE_RATE_TELEPHONY, 1000, skip_s=0.05)
    assert abs(peak - 1000) <= 10
    assert snr >= 30, f"SNR {snr:.1f} dB"


@pytest.mark.parametrize("fmt", PCM_FORMATS)
def test_downlink_filters_instead_of_aliasing(fmt: str) -> None:
    """Content above 4 kHz must be removed, not folded into the voice band."""
    _, rate = OUTPUT_FORMATS[fmt]
    source = tone_pcm16(5000 if rate < 40000 else 6000, 0.5, rate, amplitude=0.5)
    out = ulaw_to_pcm16(_run_converter(fmt, source, rate // 25, seed=3))
    middle = out[800:-800]  # skip the onset/offset clicks of the abrupt tone
    assert rms_dbfs(middle) < -60


@pytest.mark.parametrize("fmt", PCM_FORMATS)
def test_downlink_chunking_barely_matters(fmt: str) -> None:
    _, rate = OUTPUT_FORMATS[fmt]
    source = tone_pcm16(1000, 0.3, rate)
    conv = DownlinkConverter(fmt)
    whole = conv.convert(source) + conv.flush()
    pieces = _run_converter(fmt, source, 37, seed=4)
    _assert_mulaw_close(pieces, whole)


def test_mulaw_passthrough_is_identity() -> None:
    conv = DownlinkConverter("mulaw_8000")
    assert conv.passthrough is True
    source = pcm16_to_ulaw(tone_pcm16(1000, 0.5, 8000))
    out = b"".join(conv.convert(c) for c in _uneven_chunks(source, 160, seed=5)) + conv.flush()
    assert out == source
    peak, snr = _tone_quality(ulaw_to_pcm16(out), 8000, 1000, skip_s=0.0)
    assert abs(peak - 1000) <= 10
    assert snr >= 30
    conv.reset()
    assert conv.convert(b"\x01\x02\x03") == b"\x01\x02\x03"


def test_odd_trailing_byte_is_carried() -> None:
    conv = DownlinkConverter("pcm_16000")
    source = tone_pcm16(1000, 0.2, 16000)
    ref_conv = DownlinkConverter("pcm_16000")
    ref = ref_conv.convert(source) + ref_conv.flush()
    # One byte at a time is the worst case for alignment.
    out = bytearray()
    for i in range(0, len(source), 1):
        out += conv.convert(source[i : i + 1])
    out += conv.flush()
    peak, snr = _tone_quality(ulaw_to_pcm16(bytes(out)), 8000, 1000, skip_s=0.03)
    assert len(out) == len(ref)
    assert abs(peak - 1000) <= 10 and snr >= 30


@pytest.mark.parametrize("fmt", PCM_FORMATS)
def test_reset_forgets_odd_byte_and_resampler_state(fmt: str) -> None:
    _, rate = OUTPUT_FORMATS[fmt]
    source = tone_pcm16(1000, 0.2, rate)
    fresh = DownlinkConverter(fmt)
    expected = fresh.convert(source) + fresh.flush()

    history = _pcm(np.random.default_rng(6).integers(-20000, 20000, rate // 10)) + b"\x7f"

    # Sanity: without reset, a stale odd byte misaligns every sample ...
    dirty = DownlinkConverter(fmt)
    dirty.convert(b"\x7f")
    with pytest.raises(AssertionError):
        _assert_mulaw_close(dirty.convert(source) + dirty.flush(), expected)
    # ... and stale filter history rings into the start of the next audio (it used to come
    # out as a delayed tail; the converter now holds nothing back, so it shows as ringing).
    dirty = DownlinkConverter(fmt)
    dirty.convert(history[:-1])
    with pytest.raises(AssertionError):
        _assert_mulaw_close(dirty.convert(source) + dirty.flush(), expected)

    conv = DownlinkConverter(fmt)
    conv.convert(history)
    conv.reset()
    got = conv.convert(source) + conv.flush()
    _assert_mulaw_close(got, expected)  # no stale byte, no stale filter history

    # Still usable after flush() too (flush starts a new stream).
    again = conv.convert(source) + conv.flush()
    _assert_mulaw_close(again, expected)


def test_convert_empty_and_single_byte() -> None:
    conv = DownlinkConverter("pcm_24000")
    assert conv.convert(b"") == b""
    assert conv.convert(b"\x00") == b""  # half a sample: held back
    assert conv.flush() == b""  # dangling half-sample dropped, nothing to drain


@pytest.mark.parametrize("bad", ["pcm_8000", "mp3", "", "PCM_16000"])
def test_unknown_format_names_known_ones(bad: str) -> None:
    with pytest.raises(AudioFormatError) as excinfo:
        DownlinkConverter(bad)
    message = str(excinfo.value)
    assert repr(bad) in message
    for name in OUTPUT_FORMATS:
        assert name in message


# Low delay and no hold-back (gateway.resample): every chunk comes out at once.

STOPBAND_HZ = [4500, 5000, 6000, 7500]  # fold to 3.5, 3, 2 and 0.5 kHz at 8 kHz
PASSBAND_HZ = [300, 500, 1000, 1500, 2000, 2500, 3000, 3400]
DELAY_HZ = [300, 500, 1000, 2000, 3000, 3400]


def _rate(fmt: str) -> int:
    return OUTPUT_FORMATS[fmt][1]


def _chunked(fmt: str, source: bytes, sizes: str) -> list[bytes]:
    """20, 40 or 100 ms chunks, or irregular ones (1 byte to ~40 ms, many odd)."""
    rate = _rate(fmt)
    if sizes == "irregular":
        return _uneven_chunks(source, rate // 25, seed=9)
    step = rate * {"20ms": 20, "40ms": 40, "100ms": 100}[sizes] // 1000 * 2
    return [source[i : i + step] for i in range(0, len(source), step)]


def _gain_db(fmt: str, freq: float) -> float:
    """Level out of the converter (no flush) minus level in, of a 0.3 s tone fed in 20 ms
    chunks, without the first 50 ms of output (the filter's onset)."""
    source = tone_pcm16(freq, 0.3, _rate(fmt), amplitude=0.5)
    conv = DownlinkConverter(fmt)
    out = ulaw_to_pcm16(b"".join(conv.convert(c) for c in _chunked(fmt, source, "20ms")))
    return rms_dbfs(out[800:]) - rms_dbfs(source)


@pytest.mark.parametrize("fmt", PCM_FORMATS)
def test_downlink_1khz_snr_without_flush(fmt: str) -> None:
    source = tone_pcm16(1000, 1.0, _rate(fmt), amplitude=0.5)
    conv = DownlinkConverter(fmt)
    out = b"".join(conv.convert(c) for c in _chunked(fmt, source, "20ms"))
    peak, snr = _tone_quality(ulaw_to_pcm16(out), SAMPLE_RATE_TELEPHONY, 1000, skip_s=0.01)
    assert abs(peak - 1000) <= 10
    assert snr >= 30, f"SNR {snr:.1f} dB"


@pytest.mark.parametrize("fmt", PCM_FORMATS)
def test_downlink_stopband_attenuated_40db(fmt: str) -> None:
    """Every tone that 8 kHz cannot carry is removed, not folded into the voice band."""
    freqs = [f for f in STOPBAND_HZ if f < _rate(fmt) / 2]
    assert 5000 in freqs
    gains = {f: round(_gain_db(fmt, f), 1) for f in freqs}
    assert all(g <= -40 for g in gains.values()), gains


@pytest.mark.parametrize("fmt", PCM_FORMATS)
def test_downlink_passband_flat_within_1db(fmt: str) -> None:
    gains = {f: round(_gain_db(fmt, f), 2) for f in PASSBAND_HZ}
    assert all(abs(g) <= 1.0 for g in gains.values()), gains


def _burst(freq: float, rate: int) -> tuple[bytes, float]:
    """A Gaussian-windowed tone burst (sigma 10 ms, centred at 0.1 s of 0.25 s), its centre."""
    centre = 0.1
    t = np.arange(round(0.25 * rate)) / rate - centre
    x = 0.5 * 32767 * np.exp(-0.5 * (t / 0.01) ** 2) * np.sin(2 * np.pi * freq * t)
    return _pcm(np.round(x)), centre


def _added_latency_s(fmt: str) -> tuple[float, float]:
    """(group delay, hold-back) in seconds; bench/micro.py measures the same way.

    Group delay: the energy centroid of each burst's output (sample k standing for input
    time k / 8000) minus the burst's centre, the largest over the voice band. Hold-back:
    input time fed minus output time emitted, the largest after any 20 ms chunk of a
    one-second tone.
    """
    rate = _rate(fmt)
    group = -math.inf
    for freq in DELAY_HZ:
        source, centre = _burst(freq, rate)
        conv = DownlinkConverter(fmt)
        out = b"".join(conv.convert(c) for c in _chunked(fmt, source, "20ms")) + conv.flush()
        energy = _ints(ulaw_to_pcm16(out)).astype(np.float64) ** 2
        group = max(group, float(np.dot(np.arange(energy.size) / 8000, energy) / energy.sum()) - centre)
    conv = DownlinkConverter(fmt)
    held, fed, emitted = -math.inf, 0, 0
    for chunk in _chunked(fmt, tone_pcm16(440, 1.0, rate), "20ms"):
        fed += len(chunk) // 2
        emitted += len(conv.convert(chunk))
        held = max(held, fed / rate - emitted / SAMPLE_RATE_TELEPHONY)
    return group, held


@pytest.mark.parametrize("fmt", PCM_FORMATS)
def test_downlink_adds_at_most_5_ms(fmt: str) -> None:
    group, held = _added_latency_s(fmt)
    assert group >= 0.0 and held <= 1 / SAMPLE_RATE_TELEPHONY, (group, held)
    assert group + held <= 0.005, f"{1000 * group:.2f} ms group delay + {1000 * held:.2f} ms held back"


@pytest.mark.parametrize("fmt", PCM_FORMATS)
@pytest.mark.parametrize("sizes", ["20ms", "40ms", "100ms", "irregular"])
def test_downlink_holds_nothing_back(fmt: str, sizes: str) -> None:
    """Each chunk yields at once all the output it can: a one-second utterance is out (about
    8000 bytes) when its last chunk has been converted, with no flush."""
    rate = _rate(fmt)
    chunks = _chunked(fmt, tone_pcm16(1000, 1.0, rate), sizes)
    if sizes == "irregular":
        assert any(len(c) % 2 for c in chunks)
    conv = DownlinkConverter(fmt)
    fed = emitted = 0
    for chunk in chunks:
        fed += len(chunk)
        emitted += len(conv.convert(chunk))
        due = (fed // 2) * SAMPLE_RATE_TELEPHONY // rate
        assert due - 1 <= emitted <= due + 1, (fed, emitted, due)
    assert 7950 <= emitted <= 8050


def test_minimum_phase_keeps_the_magnitude() -> None:
    # 1 - 2/z has its zero at 2, outside the unit circle; 2 - 1/z is its minimum-phase twin.
    assert np.allclose(minimum_phase(np.array([1.0, -2.0])), [2.0, -1.0], atol=1e-6)


@pytest.mark.parametrize("rate", [16000, 24000, 44100])
def test_lowpass_taps_are_the_prototype_made_minimum_phase(rate: int) -> None:
    taps = lowpass_taps(rate)
    prototype = kaiser_lowpass(rate, resample.CUTOFF_HZ, taps.size, resample.STOP_DB)
    spectrum = [np.abs(np.fft.rfft(h, 8192)) for h in (taps, prototype)]
    assert np.allclose(spectrum[0], spectrum[1], atol=1e-4)  # the same magnitude (to -80 dB) ...
    # ... with its energy as early as it can be: the defining property of minimum phase.
    early = [np.cumsum(h**2) for h in (taps, prototype)]
    assert np.all(early[0] >= early[1] - 1e-5 * early[1][-1])
    assert early[0][taps.size // 8] > 0.5 * early[0][-1]  # the prototype's half is at its middle


@pytest.mark.parametrize("fmt", PCM_FORMATS)
def test_reset_and_flush_leave_no_ringing(fmt: str) -> None:
    """After reset() (barge-in) or flush(), silence in is silence out: nothing of the audio
    before rings into the next utterance."""
    rate = _rate(fmt)
    loud = _pcm(np.random.default_rng(10).integers(-30000, 30000, rate // 10))
    silence = bytes(rate // 25)  # 20 ms
    silent_ulaw = pcm16_to_ulaw(bytes(2 * 160))
    conv = DownlinkConverter(fmt)
    conv.convert(loud)
    assert conv.convert(silence) != silent_ulaw  # sanity: without reset the filter rings
    conv.convert(loud)
    conv.reset()
    assert conv.convert(silence) == silent_ulaw
    conv.convert(loud + b"\x01")
    assert conv.flush() == b""
    assert conv.convert(silence) == silent_ulaw


# --------------------------------------------------------------------------
# DTMF
# --------------------------------------------------------------------------


def _roundtrip(digits: str) -> str:
    return detect_dtmf(ulaw_to_pcm16(dtmf_mulaw(digits)))


def test_dtmf_freqs_table() -> None:
    assert set(DTMF_FREQS) == set("0123456789*#ABCD")
    assert DTMF_FREQS["1"] == (697, 1209)
    assert DTMF_FREQS["5"] == (770, 1336)
    assert DTMF_FREQS["9"] == (852, 1477)
    assert DTMF_FREQS["0"] == (941, 1336)
    assert DTMF_FREQS["*"] == (941, 1209)
    assert DTMF_FREQS["#"] == (941, 1477)
    assert DTMF_FREQS["D"] == (941, 1633)


def test_dtmf_roundtrip_all_keys() -> None:
    assert _roundtrip("0123456789*#") == "0123456789*#"
    assert _roundtrip("ABCD") == "ABCD"


def test_dtmf_with_pauses() -> None:
    assert _roundtrip("12w3ww#") == "123#"
    assert _roundtrip("w") == ""
    assert _roundtrip("") == ""


def test_dtmf_repeated_digits_count_separately() -> None:
    assert _roundtrip("11") == "11"
    assert _roundtrip("000") == "000"


def test_dtmf_timing_and_level() -> None:
    pcm = dtmf_pcm16("1w2")
    tone, gap, pause = (round(8000 * ms / 1000) for ms in (DTMF_TONE_MS, DTMF_GAP_MS, DTMF_PAUSE_MS))
    assert len(pcm) == 2 * (2 * (tone + gap) + pause)
    x = _ints(pcm)
    assert np.abs(x).max() <= 0.35 * 32767 + 1  # each tone amplitude/2: no clipping
    assert abs(x[0]) < 50 and abs(x[tone - 1]) < 300  # ramped edges, no click
    assert not x[tone : tone + gap].any()  # silent gap
    loud = dtmf_pcm16("1", amplitude=1.0)
    assert np.abs(_ints(loud)).max() <= 32767
    assert dtmf_pcm16("") == b""


@pytest.mark.parametrize("bad", ["x", "12e", "1 2", "a", "W"])
def test_dtmf_invalid_char_raises(bad: str) -> None:
    offending = next(c for c in bad if c not in DTMF_FREQS)
    with pytest.raises(AudioFormatError, match=repr(offending).replace("*", r"\*")):
        dtmf_pcm16(bad)
    with pytest.raises(AudioFormatError):
        dtmf_mulaw(bad)


def test_dtmf_bad_parameters() -> None:
    with pytest.raises(AudioFormatError):
        dtmf_pcm16("1", amplitude=1.5)
    with pytest.raises(AudioFormatError):
        dtmf_pcm16("1", rate=2000)  # 1633 Hz would alias
    with pytest.raises(AudioFormatError):
        detect_dtmf(b"\x00")  # odd length


def test_detect_nothing_in_silence_or_plain_tone() -> None:
    assert detect_dtmf(bytes(16000)) == ""
    assert detect_dtmf(b"") == ""
    assert detect_dtmf(tone_pcm16(1000, 1.0, 8000)) == ""
    assert detect_dtmf(ulaw_to_pcm16(pcm16_to_ulaw(tone_pcm16(1000, 1.0, 8000)))) == ""
    # Single DTMF tones (one group only) are not digits either.
    assert detect_dtmf(tone_pcm16(697, 0.5, 8000)) == ""
    assert detect_dtmf(tone_pcm16(1336, 0.5, 8000)) == ""
    noise = np.random.default_rng(7).normal(0, 3000, 8000)
    assert detect_dtmf(_pcm(noise)) == ""


def test_detect_requires_two_blocks() -> None:
    # A 25 ms burst covers at most one full 20 ms block: debounced away.
    t = np.arange(200) / 8000
    burst = 5000 * (np.sin(2 * np.pi * 697 * t) + np.sin(2 * np.pi * 1209 * t))
    assert detect_dtmf(_pcm(np.concatenate([np.zeros(400), burst, np.zeros(400)]))) == ""


def test_detect_robust_to_offset_noise_and_rate() -> None:
    pcm = _ints(dtmf_pcm16("159#"))
    shifted = np.concatenate([np.zeros(37), pcm, np.zeros(300)])
    noisy = shifted + np.random.default_rng(8).normal(0, 300, shifted.size)  # ~20 dB SNR
    assert detect_dtmf(_pcm(noisy)) == "159#"
    assert detect_dtmf(dtmf_pcm16("2580", rate=16000), rate=16000) == "2580"
    # Twist within limits (-6 dB high group) still detects.
    t = np.arange(800) / 8000
    twisted = 8000 * np.sin(2 * np.pi * 852 * t) + 4000 * np.sin(2 * np.pi * 1477 * t)
    assert detect_dtmf(_pcm(twisted)) == "9"


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="0123456789*#ABCDw", max_size=8))
def test_dtmf_roundtrip_property(digits: str) -> None:
    assert _roundtrip(digits) == digits.replace("w", "")


# --------------------------------------------------------------------------
# levels and tones
# --------------------------------------------------------------------------


def test_rms_dbfs() -> None:
    full = tone_pcm16(1000, 1.0, 8000, amplitude=1.0)
    assert rms_dbfs(full) == pytest.approx(-3.01, abs=0.05)
    assert rms_dbfs(tone_pcm16(1000, 1.0, 8000, amplitude=0.5)) == pytest.approx(-9.03, abs=0.05)
    assert rms_dbfs(bytes(320)) == -math.inf
    assert rms_dbfs(b"") == -math.inf
    assert rms_dbfs(_pcm(np.full(160, -32768))) == 0.0
    with pytest.raises(AudioFormatError):
        rms_dbfs(b"\x00\x00\x00")


@given(st.binary(max_size=200).filter(lambda b: len(b) % 2 == 0))
def test_rms_dbfs_bounds(data: bytes) -> None:
    level = rms_dbfs(data)
    assert level == -math.inf or -100 < level <= 0.0


def test_tone_pcm16() -> None:
    pcm = tone_pcm16(440, 0.5, 16000, amplitude=0.25)
    assert len(pcm) == 2 * 8000
    assert np.abs(_ints(pcm)).max() == pytest.approx(0.25 * 32767, abs=2)
    assert tone_pcm16(440, 0.0, 8000) == b""
    for kwargs in (
        {"freq": 5000, "seconds": 1, "rate": 8000},
        {"freq": 440, "seconds": -1, "rate": 8000},
        {"freq": 440, "seconds": 1, "rate": 0},
        {"freq": 440, "seconds": 1, "rate": 8000, "amplitude": 2.0},
    ):
        with pytest.raises(AudioFormatError):
            tone_pcm16(**kwargs)
