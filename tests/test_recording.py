"""CallRecorder: caller left, agent right, aligned by timestamps and playback queueing."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from gateway.audio import MULAW_FRAME_BYTES, pcm16_to_ulaw, rms_dbfs, tone_pcm16, ulaw_to_pcm16
from gateway.recording import CallRecorder, recording_path

RATE = 8000
CALLER_HZ = 300.0
AGENT_HZ = 1000.0


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 100.0) -> None:
        self.t = start  # not 0: only time since construction may matter

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def tone_mulaw(freq: float, seconds: float) -> bytes:
    return pcm16_to_ulaw(tone_pcm16(freq, seconds, RATE, 0.5))


def frames(mulaw: bytes) -> list[bytes]:
    return [mulaw[i : i + MULAW_FRAME_BYTES] for i in range(0, len(mulaw), MULAW_FRAME_BYTES)]


def channels(recorder: CallRecorder) -> tuple[np.ndarray, np.ndarray]:
    data, rate = recorder.stereo_pcm16()
    assert rate == RATE
    stereo = np.frombuffer(data, dtype="<i2").reshape(-1, 2)
    return stereo[:, 0], stereo[:, 1]


def span(samples: np.ndarray, start_s: float, end_s: float) -> np.ndarray:
    return samples[round(start_s * RATE) : round(end_s * RATE)]


def is_silent(samples: np.ndarray) -> bool:
    return samples.size > 0 and not samples.any()


def level(samples: np.ndarray) -> float:
    return rms_dbfs(samples.astype("<i2").tobytes())


def pcm(mulaw: bytes) -> np.ndarray:
    """What a mu-law chunk decodes to in the recording."""
    return np.frombuffer(ulaw_to_pcm16(mulaw), dtype="<i2")


def dominant_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    return float(np.fft.rfftfreq(samples.size, 1 / RATE)[spectrum.argmax()])


def band_power(samples: np.ndarray, hz: float, width_hz: float = 20.0) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(samples.size, 1 / RATE)
    return float(spectrum[np.abs(freqs - hz) <= width_hz].sum())


# ----------------------------------------------------------------------
# Caller track
# ----------------------------------------------------------------------


def test_caller_frames_land_at_their_twilio_timestamps() -> None:
    clock = FakeClock()
    recorder = CallRecorder(clock=clock)
    tone = tone_mulaw(CALLER_HZ, 0.5)
    clock.advance(1.6)  # frames arrive late and in a burst: only their timestamps count
    for i, frame in enumerate(frames(tone)):
        timestamp_ms = str(1000 + 20 * i)  # Twilio sends media.timestamp as a string of ms
        recorder.caller(frame, int(timestamp_ms) / 1000)

    left, right = channels(recorder)
    assert recorder.duration_s == pytest.approx(1.5)
    assert is_silent(span(left, 0.0, 1.0))
    np.testing.assert_array_equal(span(left, 1.0, 1.5), pcm(tone))
    assert level(span(left, 1.0, 1.5)) > -12.0
    assert is_silent(right)


def test_caller_frames_out_of_order_still_land_in_place() -> None:
    recorder = CallRecorder(clock=FakeClock())
    tone = tone_mulaw(CALLER_HZ, 0.2)
    numbered = list(enumerate(frames(tone)))
    for i, frame in reversed(numbered):
        recorder.caller(frame, (200 + 20 * i) / 1000)

    left, _ = channels(recorder)
    assert is_silent(span(left, 0.0, 0.2))
    np.testing.assert_array_equal(span(left, 0.2, 0.4), pcm(tone))


def test_caller_frames_without_timestamp_follow_on_and_keep_real_gaps() -> None:
    clock = FakeClock()
    recorder = CallRecorder(clock=clock)
    first, second, third = frames(tone_mulaw(CALLER_HZ, 0.06))

    clock.advance(0.5)
    recorder.caller(first)  # nothing before it: starts at now
    clock.advance(0.02 + 0.05)  # 50 ms of jitter: within tolerance, stays contiguous
    recorder.caller(second)
    clock.advance(0.5)  # frames went missing: this one starts at now
    recorder.caller(third)

    left, _ = channels(recorder)
    assert is_silent(span(left, 0.0, 0.5))
    np.testing.assert_array_equal(span(left, 0.5, 0.54), pcm(first + second))
    assert is_silent(span(left, 0.54, 1.07))
    np.testing.assert_array_equal(span(left, 1.07, 1.09), pcm(third))


def test_later_caller_audio_overwrites_the_same_region() -> None:
    recorder = CallRecorder(clock=FakeClock())
    recorder.caller(tone_mulaw(CALLER_HZ, 0.1), 0.0)
    recorder.caller(b"\xff" * 400, 0.02)

    left, _ = channels(recorder)
    assert level(span(left, 0.0, 0.02)) > -12.0
    assert is_silent(span(left, 0.02, 0.07))
    assert level(span(left, 0.07, 0.1)) > -12.0


# ----------------------------------------------------------------------
# Agent track
# ----------------------------------------------------------------------


def test_agent_burst_plays_from_when_it_was_sent() -> None:
    clock = FakeClock()
    recorder = CallRecorder(clock=clock)
    burst = tone_mulaw(AGENT_HZ, 1.0)
    clock.advance(0.5)
    for frame in frames(burst):  # sent far faster than real time
        recorder.agent(frame)

    left, right = channels(recorder)
    assert recorder.duration_s == pytest.approx(1.5)
    assert is_silent(span(right, 0.0, 0.5))
    np.testing.assert_array_equal(span(right, 0.5, 1.5), pcm(burst))
    assert is_silent(left)


def test_second_agent_burst_queues_behind_the_first() -> None:
    clock = FakeClock()
    recorder = CallRecorder(clock=clock)
    first, second = tone_mulaw(AGENT_HZ, 1.0), tone_mulaw(AGENT_HZ / 2, 0.5)
    clock.advance(0.5)
    recorder.agent(first)
    clock.advance(0.2)  # t=0.7: the first burst still has 0.8 s to play
    recorder.agent(second)

    _, right = channels(recorder)
    assert recorder.duration_s == pytest.approx(2.0)
    np.testing.assert_array_equal(span(right, 0.5, 1.5), pcm(first))
    np.testing.assert_array_equal(span(right, 1.5, 2.0), pcm(second))


def test_agent_after_its_queue_drained_starts_at_now() -> None:
    clock = FakeClock()
    recorder = CallRecorder(clock=clock)
    recorder.agent(tone_mulaw(AGENT_HZ, 0.2))
    clock.advance(1.0)
    recorder.agent(tone_mulaw(AGENT_HZ, 0.2))

    _, right = channels(recorder)
    assert is_silent(span(right, 0.2, 1.0))
    assert level(span(right, 1.0, 1.2)) > -12.0


def test_agent_cleared_truncates_unplayed_audio_and_restarts_at_now() -> None:
    clock = FakeClock()
    recorder = CallRecorder(clock=clock)
    burst, reply = tone_mulaw(AGENT_HZ, 1.0), tone_mulaw(AGENT_HZ / 2, 0.3)
    clock.advance(0.5)
    recorder.agent(burst)
    clock.advance(0.5)  # t=1.0: the caller barges in, half the burst is unplayed
    recorder.agent_cleared()
    assert recorder.duration_s == pytest.approx(1.0)

    clock.advance(0.2)
    recorder.agent(reply)  # t=1.2: the queue is empty, plays at once

    _, right = channels(recorder)
    np.testing.assert_array_equal(span(right, 0.5, 1.0), pcm(burst)[: round(0.5 * RATE)])
    assert is_silent(span(right, 1.0, 1.2))
    np.testing.assert_array_equal(span(right, 1.2, 1.5), pcm(reply))
    assert recorder.duration_s == pytest.approx(1.5)


def test_agent_cleared_with_nothing_queued_keeps_what_was_played() -> None:
    clock = FakeClock()
    recorder = CallRecorder(clock=clock)
    recorder.agent(tone_mulaw(AGENT_HZ, 0.2))
    clock.advance(0.5)
    recorder.agent_cleared()

    _, right = channels(recorder)
    assert recorder.duration_s == pytest.approx(0.2)
    assert level(span(right, 0.0, 0.2)) > -12.0


# ----------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------


def test_stereo_pads_the_shorter_track_with_silence() -> None:
    clock = FakeClock()
    recorder = CallRecorder(clock=clock)
    recorder.caller(tone_mulaw(CALLER_HZ, 0.3), 0.0)
    recorder.agent(tone_mulaw(AGENT_HZ, 0.1))

    data, _ = recorder.stereo_pcm16()
    left, right = channels(recorder)
    assert len(data) == round(0.3 * RATE) * 2 * 2
    assert is_silent(span(right, 0.1, 0.3))
    assert level(span(left, 0.1, 0.3)) > -12.0


def test_wav_holds_caller_left_and_agent_right_without_bleed(tmp_path: Path) -> None:
    clock = FakeClock()
    recorder = CallRecorder(clock=clock)
    clock.advance(0.5)
    recorder.agent(tone_mulaw(AGENT_HZ, 1.0))  # plays 0.5..1.5
    for i, frame in enumerate(frames(tone_mulaw(CALLER_HZ, 1.0))):  # spoken 1.0..2.0, overlapping
        recorder.caller(frame, (1000 + 20 * i) / 1000)

    target = tmp_path / "calls" / "2024" / "CA123.wav"
    assert recorder.write_wav(target) == target

    with wave.open(str(target), "rb") as wav:
        assert (wav.getnchannels(), wav.getframerate(), wav.getsampwidth()) == (2, RATE, 2)
        assert wav.getnframes() == round(2.0 * RATE)
        data = wav.readframes(wav.getnframes())
    assert data == recorder.stereo_pcm16()[0]

    stereo = np.frombuffer(data, dtype="<i2").reshape(-1, 2)
    left, right = stereo[:, 0], stereo[:, 1]
    assert dominant_hz(left) == pytest.approx(CALLER_HZ, abs=2)
    assert dominant_hz(right) == pytest.approx(AGENT_HZ, abs=2)
    # mu-law distortion leaves harmonics ~30+ dB down; the other party's tone must be absent.
    assert band_power(left, AGENT_HZ) < 1e-4 * band_power(left, CALLER_HZ)
    assert band_power(right, CALLER_HZ) < 1e-4 * band_power(right, AGENT_HZ)
    assert is_silent(span(left, 0.0, 1.0))
    assert is_silent(span(right, 0.0, 0.5))
    assert is_silent(span(right, 1.5, 2.0))


def test_empty_recording_writes_an_empty_wav(tmp_path: Path) -> None:
    recorder = CallRecorder(clock=FakeClock())
    assert recorder.stereo_pcm16() == (b"", RATE)
    path = recorder.write_wav(tmp_path / "empty.wav")
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getnframes()) == (2, 0)


# ----------------------------------------------------------------------
# Bounds and names
# ----------------------------------------------------------------------


def test_recording_stops_at_max_s_and_logs_once() -> None:
    clock = FakeClock()
    recorder = CallRecorder(max_s=1.0, clock=clock)
    with capture_logs() as logs:
        for i, frame in enumerate(frames(tone_mulaw(CALLER_HZ, 1.5))):
            recorder.caller(frame, 0.02 * i)
        clock.advance(0.9)
        recorder.agent(tone_mulaw(AGENT_HZ, 0.5))
        recorder.caller(b"\x00" * 160, 3600.0)  # an absurd timestamp allocates nothing

    left, right = channels(recorder)
    assert recorder.duration_s == pytest.approx(1.0)
    assert level(span(left, 0.9, 1.0)) > -12.0
    assert level(span(right, 0.9, 1.0)) > -12.0
    assert [entry["event"] for entry in logs] == ["recording_limit_reached"]
    assert logs[0]["max_s"] == 1.0


@pytest.mark.parametrize("max_s", [0, -1.0, float("inf"), float("nan")])
def test_max_s_must_be_positive_and_finite(max_s: float) -> None:
    with pytest.raises(ValueError, match="max_s"):
        CallRecorder(max_s=max_s, clock=FakeClock())


def test_recording_path_is_the_call_sid_in_the_directory(tmp_path: Path) -> None:
    assert recording_path(tmp_path, "CA0123abcdef") == tmp_path / "CA0123abcdef.wav"
    assert recording_path(str(tmp_path), "CA1") == tmp_path / "CA1.wav"


@pytest.mark.parametrize("call_sid", ["../x", "a/b", "CA1.wav", "", "CA 1", "CA\u00e91", "CA\u00b2"])
def test_recording_path_rejects_sids_that_are_not_plain_alphanumerics(call_sid: str) -> None:
    with pytest.raises(ValueError, match="call_sid"):
        recording_path("/tmp/recordings", call_sid)
