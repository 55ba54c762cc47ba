"""Micro-benchmarks: the gateway's per-frame codec against pipecat's Twilio serializer, and the
downlink resampler (gateway.audio.DownlinkConverter) against soxr HQ (streaming) and
audioop.ratecv, for cost, quality and added latency.

    python -m bench.run --micro          # (or after the load runs, by default)
    python -m bench.micro                # the same, without the load benchmark's report

pipecat is installed only in the bench environment (`pip install '.[bench]'`, or the isolated
venv bench/README.md describes, since pipecat pins versions the gateway does not). When it is
not importable here, the codec comparison runs in bench/.venv/bin/python if that exists.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import subprocess
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

VENV_PYTHON = Path(__file__).resolve().parent / ".venv" / "bin" / "python"
STREAM_SID = "MZ" + "0123456789abcdef" * 2
CALL_SID = "CA" + "fedcba9876543210" * 2


def _ulaw_frame() -> bytes:
    return bytes((i * 37) & 0xFF for i in range(160))


def twilio_media_text(payload: bytes) -> str:
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": "4242",
            "streamSid": STREAM_SID,
            "media": {
                "track": "inbound",
                "chunk": "4240",
                "timestamp": "84800",
                "payload": base64.b64encode(payload).decode(),
            },
        },
        separators=(",", ":"),
    )


def agent_media_text(payload: bytes) -> str:
    return json.dumps(
        {
            "event": "media_output",
            "stream_id": CALL_SID,
            "media": {"payload": base64.b64encode(payload).decode()},
        },
        separators=(",", ":"),
    )


def per_call_us(fn: Callable[[], Any], number: int, repeat: int = 5) -> float:
    """Best of `repeat` runs of `number` calls, in microseconds per call."""
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter_ns()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter_ns() - t) / number / 1000)
    return round(best, 3)


def per_await_us(make: Callable[[], Any], number: int, repeat: int = 5) -> float:
    async def loop() -> float:
        best = math.inf
        for _ in range(repeat):
            t = time.perf_counter_ns()
            for _ in range(number):
                await make()
            best = min(best, (time.perf_counter_ns() - t) / number / 1000)
        return best

    return round(asyncio.run(loop()), 3)


# Codec: gateway vs pipecat


def gateway_codec(number: int) -> dict[str, Any]:
    from gateway.agents import calls_api
    from gateway.audio import DownlinkConverter
    from gateway.carriers.twilio import codec

    up_text = twilio_media_text(_ulaw_frame())
    down_text = agent_media_text(_ulaw_frame())
    pcm16k = (np.sin(np.arange(320) * 2 * np.pi * 1000 / 16000) * 8000).astype("<i2").tobytes()
    down_pcm_text = agent_media_text(pcm16k)

    def uplink() -> str:
        event = codec.parse_frame(up_text)
        return calls_api.media_input_frame(CALL_SID, event.payload)  # type: ignore[union-attr]

    def downlink() -> str:
        event = calls_api.parse_frame(down_text)
        return codec.media_frame(STREAM_SID, event.payload)  # type: ignore[union-attr]

    converter = DownlinkConverter("pcm_16000")

    def downlink_pcm16k() -> str:
        # what the gateway does per frame for an agent speaking pcm_16000 (session._play)
        event = calls_api.parse_frame(down_pcm_text)
        mulaw = converter.convert(calls_api.decode_payload(event.payload))  # type: ignore[union-attr]
        return codec.media_frame(STREAM_SID, base64.b64encode(mulaw).decode())

    assert '"media_input"' in uplink() and '"media"' in downlink()
    return {
        "uplink_us": per_call_us(uplink, number),
        "downlink_us": per_call_us(downlink, number),
        "downlink_pcm16k_us": per_call_us(downlink_pcm16k, number),
    }


def pipecat_codec(number: int) -> dict[str, Any]:
    """pipecat's TwilioFrameSerializer: deserialize (Twilio media -> InputAudioRawFrame) and
    serialize (OutputAudioRawFrame -> Twilio media), at pipeline rates 8 kHz and 16 kHz."""
    try:
        import pipecat
        from pipecat.frames.frames import OutputAudioRawFrame
        from pipecat.serializers.twilio import TwilioFrameSerializer
    except ImportError as exc:
        return {"error": f"pipecat is not importable: {exc}"}
    try:
        from loguru import logger

        logger.remove()
    except ImportError:
        pass
    version = getattr(pipecat, "__version__", "")
    if not version:
        import importlib.metadata

        version = importlib.metadata.version("pipecat-ai")
    up_text = twilio_media_text(_ulaw_frame())
    out: dict[str, Any] = {"version": version}
    for rate in (8000, 16000):
        params = TwilioFrameSerializer.InputParams(sample_rate=rate, auto_hang_up=False)
        ser = TwilioFrameSerializer(STREAM_SID, params=params)
        asyncio.run(ser.setup(types.SimpleNamespace(audio_in_sample_rate=rate)))  # type: ignore[arg-type]
        n = rate // 50
        pcm = (np.sin(np.arange(n) * 2 * np.pi * 1000 / rate) * 8000).astype("<i2").tobytes()
        frame = OutputAudioRawFrame(audio=pcm, sample_rate=rate, num_channels=1)
        out[f"deserialize_{rate}_us"] = per_await_us(lambda ser=ser: ser.deserialize(up_text), number)
        out[f"serialize_{rate}_us"] = per_await_us(lambda ser=ser, frame=frame: ser.serialize(frame), number)
    return out


def codec(number: int) -> dict[str, Any]:
    """The gateway's codec in this interpreter; pipecat here if importable, else in the bench venv
    (the same Python build, with pipecat's pinned dependencies)."""
    result: dict[str, Any] = {"frames": number, "gateway": gateway_codec(number)}
    try:
        import pipecat  # noqa: F401

        result["pipecat"] = pipecat_codec(number)
        return result
    except ImportError:
        pass
    if not VENV_PYTHON.exists():
        result["pipecat"] = {
            "error": "pipecat is not installed; install it with: python -m venv --system-site-packages "
            "bench/.venv && bench/.venv/bin/pip install pipecat-ai"
        }
        return result
    try:
        done = subprocess.run(
            [str(VENV_PYTHON), "-m", "bench.micro", "--pipecat-json", "--frames", str(number)],
            capture_output=True,
            timeout=300,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        result["pipecat"] = json.loads(done.stdout.decode().strip().splitlines()[-1])
        result["pipecat"]["interpreter"] = str(VENV_PYTHON)
    except (subprocess.SubprocessError, json.JSONDecodeError, IndexError) as exc:
        result["pipecat"] = {"error": f"pipecat could not be run in bench/.venv: {exc}"}
    return result


# Resampler: the gateway's DownlinkConverter vs soxr HQ streaming (the converter before it was
# replaced by a minimum-phase FIR) vs audioop.ratecv


def _tone(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return np.round(amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def _chunks(pcm: bytes, rate: int) -> list[bytes]:
    step = rate // 50 * 2  # 20 ms
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


class _Gateway:
    name = "gateway.audio.DownlinkConverter"

    def __init__(self, rate: int) -> None:
        from gateway.audio import DownlinkConverter
        from gateway.resample import Decimator

        self.conv = DownlinkConverter(f"pcm_{rate}")
        self.pcm = Decimator(rate)  # before mu-law: the same filter, rounded to int16

    def mulaw(self, chunk: bytes) -> bytes:
        return self.conv.convert(chunk)

    def flush(self) -> bytes:
        return self.conv.flush()

    def pcm8k(self, chunk: bytes) -> bytes:
        out = self.pcm.process(np.frombuffer(chunk, dtype="<i2"))
        return np.clip(np.rint(out), -32768, 32767).astype("<i2").tobytes()


class _Soxr:
    name = "soxr HQ streaming + lin2ulaw"

    def __init__(self, rate: int) -> None:
        import soxr

        self.stream = soxr.ResampleStream(rate, 8000, 1, dtype="int16", quality="HQ")
        self.pcm = soxr.ResampleStream(rate, 8000, 1, dtype="int16", quality="HQ")

    def mulaw(self, chunk: bytes) -> bytes:
        return audioop.lin2ulaw(self.stream.resample_chunk(np.frombuffer(chunk, dtype="<i2")).tobytes(), 2)

    def flush(self) -> bytes:
        return audioop.lin2ulaw(
            self.stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True).tobytes(), 2
        )

    def pcm8k(self, chunk: bytes) -> bytes:
        return self.pcm.resample_chunk(np.frombuffer(chunk, dtype="<i2")).tobytes()


class _Ratecv:
    name = "audioop.ratecv + lin2ulaw"

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.state: Any = None
        self.pcm_state: Any = None

    def mulaw(self, chunk: bytes) -> bytes:
        out, self.state = audioop.ratecv(chunk, 2, 1, self.rate, 8000, self.state)
        return audioop.lin2ulaw(out, 2)

    def flush(self) -> bytes:
        return b""

    def pcm8k(self, chunk: bytes) -> bytes:
        out, self.pcm_state = audioop.ratecv(chunk, 2, 1, self.rate, 8000, self.pcm_state)
        return out


def _snr_db(x: np.ndarray, freq: float, rate: int = 8000) -> float:
    """SNR of a pure tone: least-squares fit of the tone (+ DC), the rest is noise."""
    t = np.arange(x.size) / rate
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t), np.ones_like(t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, x, rcond=None)
    fit = basis[:, :2] @ coef[:2]
    noise = x - basis @ coef
    return round(10 * math.log10(float(np.mean(fit**2)) / max(float(np.mean(noise**2)), 1e-12)), 1)


def _level_db(x: np.ndarray, reference_rms: float) -> float:
    rms = math.sqrt(float(np.mean(x.astype(np.float64) ** 2)))
    return round(20 * math.log10(max(rms, 1e-9) / reference_rms), 1)


# Added latency, measured the same way as tests/test_audio.py (test_downlink_adds_at_most_5_ms):
# the group delay, from Gaussian tone bursts across the voice band (energy centroid of the
# output, sample k of which stands for input time k / 8000, against the burst's centre), plus
# the hold-back (input time fed minus output time emitted, its maximum over the chunks of a
# one-second tone fed in 20 ms chunks). "flush" is what flush() returns after that second.
DELAY_FREQS_HZ = (300.0, 500.0, 1000.0, 2000.0, 3000.0, 3400.0)


def _burst(freq: float, rate: int) -> tuple[bytes, float]:
    """A Gaussian-windowed tone burst (sigma 10 ms, centred at 0.1 s of 0.25 s) and its centre."""
    centre = 0.1
    t = np.arange(round(0.25 * rate)) / rate - centre
    x = 0.5 * 32767 * np.exp(-0.5 * (t / 0.01) ** 2) * np.sin(2 * np.pi * freq * t)
    return np.round(x).astype("<i2").tobytes(), centre


def _centroid_s(mulaw: bytes) -> float:
    y = np.frombuffer(audioop.ulaw2lin(mulaw, 2), dtype="<i2").astype(np.float64) ** 2
    return float(np.dot(np.arange(y.size) / 8000, y) / y.sum())


def latency_ms(kind: type, rate: int) -> dict[str, float]:
    group = -math.inf
    for freq in DELAY_FREQS_HZ:
        burst, centre = _burst(freq, rate)
        conv = kind(rate)
        out = b"".join(conv.mulaw(c) for c in _chunks(burst, rate)) + conv.flush()
        group = max(group, _centroid_s(out) - centre)
    conv = kind(rate)
    held, fed, emitted = -math.inf, 0, 0
    for c in _chunks(_tone(440.0, rate, 1.0), rate):
        fed += len(c) // 2
        emitted += len(conv.mulaw(c))
        held = max(held, fed / rate - emitted / 8000)
    flushed = len(conv.flush()) / 8000
    return {
        "latency_ms": round(1000 * (group + held), 2),
        "group_delay_ms": round(1000 * group, 2),
        "held_ms": round(1000 * held, 2),
        "flush_ms": round(1000 * flushed, 2),
    }


def _run(kind: type, rate: int, pcm: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Stream `pcm` through a fresh converter in 20 ms chunks -> (mu-law decoded, pcm 8 kHz)."""
    conv = kind(rate)
    mulaw = b"".join(conv.mulaw(c) for c in _chunks(pcm, rate))
    pcm8k = b"".join(conv.pcm8k(c) for c in _chunks(pcm, rate))
    skip = 800  # the first 100 ms: filter delay and start-up
    dec = np.frombuffer(audioop.ulaw2lin(mulaw, 2), dtype="<i2").astype(np.float64)[skip:]
    lin = np.frombuffer(pcm8k, dtype="<i2").astype(np.float64)[skip:]
    return dec, lin


def resampler(quick: bool) -> dict[str, Any]:
    seconds = 1.0
    reps = 3 if quick else 10
    ref_rms = 0.5 * 32767 / math.sqrt(2)
    out: dict[str, Any] = {}
    for rate in (16000, 24000, 44100):
        speech = _tone(440.0, rate, 2.0, 0.3)
        chunks = _chunks(speech, rate)
        row: dict[str, Any] = {}
        for kind in (_Gateway, _Soxr, _Ratecv):
            best = math.inf
            for _ in range(reps):
                conv = kind(rate)
                t = time.perf_counter_ns()
                for c in chunks:
                    conv.mulaw(c)
                best = min(best, (time.perf_counter_ns() - t) / len(chunks) / 1000)
            one_k, one_k_pcm = _run(kind, rate, _tone(1000.0, rate, seconds))
            a39, a39_pcm = _run(kind, rate, _tone(3900.0, rate, seconds))
            a5, a5_pcm = _run(kind, rate, _tone(5000.0, rate, seconds))
            key = {_Gateway: "gateway", _Soxr: "soxr_hq", _Ratecv: "audioop_ratecv"}[kind]
            row[key] = {
                "name": kind.name,
                "us_per_frame": round(best, 2),
                "snr_1khz_db": _snr_db(one_k, 1000.0),
                "snr_1khz_pcm_db": _snr_db(one_k_pcm, 1000.0),
                "level_3900hz_db": _level_db(a39, ref_rms),
                "level_5000hz_db": _level_db(a5, ref_rms),
                "level_3900hz_pcm_db": _level_db(a39_pcm, ref_rms),
                "level_5000hz_pcm_db": _level_db(a5_pcm, ref_rms),
                **latency_ms(kind, rate),
            }
        out[f"pcm_{rate}"] = row
    return out


def run_micro(quick: bool = False) -> dict[str, Any]:
    number = 2000 if quick else 20000
    return {"codec": codec(number), "resampler": resampler(quick)}


def print_micro(micro: dict[str, Any]) -> None:
    c = micro.get("codec", {})
    g, p = c.get("gateway", {}), c.get("pipecat", {})
    print(f"\nPer-frame codec, µs per 20 ms frame (best of 5 x {c.get('frames')} frames)")
    print(f"  {'':44}{'gateway':>10}{'pipecat ' + str(p.get('version', '')):>18}")
    print(
        f"  {'uplink: Twilio media JSON -> agent frame':44}{g.get('uplink_us', '-'):>10}"
        f"{_pp(p, 'deserialize_8000_us')} (8 kHz pipeline; 16 kHz: {_pp(p, 'deserialize_16000_us').strip()})"
    )
    print(
        f"  {'downlink: agent mu-law 8k -> Twilio media':44}{g.get('downlink_us', '-'):>10}"
        f"{_pp(p, 'serialize_8000_us')} (PCM 8 kHz in)"
    )
    print(
        f"  {'downlink: agent PCM 16k -> Twilio media':44}{g.get('downlink_pcm16k_us', '-'):>10}"
        f"{_pp(p, 'serialize_16000_us')} (PCM 16 kHz in)"
    )
    if "error" in p:
        print(f"  pipecat: {p['error']}")
    r = micro.get("resampler", {})
    if r:
        print(
            "\nDownlink resampler, per 20 ms frame -> mu-law 8 kHz (levels in dB relative to the input tone;"
            "\n  latency = group delay in 300-3400 Hz + the most held back after a 20 ms chunk, in ms;"
            "\n  flush = ms returned by flush() after a one-second tone)"
        )
        print(
            f"  {'':10}{'':28}{'µs/frame':>10}{'SNR 1k':>9}{'(pcm)':>8}{'3.9 kHz':>9}{'(pcm)':>8}"
            f"{'5 kHz':>8}{'(pcm)':>8}{'latency':>9}{'(group':>8}{'held)':>7}{'flush':>7}"
        )
        for fmt, row in r.items():
            for v in row.values():
                print(
                    f"  {fmt:10}{v['name'][:27]:28}{v['us_per_frame']:>10}{v['snr_1khz_db']:>9}"
                    f"{v['snr_1khz_pcm_db']:>8}{v['level_3900hz_db']:>9}{v['level_3900hz_pcm_db']:>8}"
                    f"{v['level_5000hz_db']:>8}{v['level_5000hz_pcm_db']:>8}{v['latency_ms']:>9}"
                    f"{v['group_delay_ms']:>8}{v['held_ms']:>7}{v['flush_ms']:>7}"
                )


def _pp(p: dict[str, Any], key: str) -> str:
    v = p.get(key)
    return f"{'-' if v is None else v:>18}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--pipecat-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pipecat_json:
        print(json.dumps(pipecat_codec(args.frames)))
        return 0
    print_micro(run_micro(args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
