"""`line-gateway probe URL`, run as users run it, against a sandbox gateway (the gateway on a free
port, the agent emulator, Twilio's REST fake)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import wave
from pathlib import Path

import numpy as np

from gateway.sandbox.agent import GREETING_HZ, AgentBehaviour
from gateway.sandbox.harness import ACCOUNT_SID, sandbox

REPO = Path(__file__).resolve().parent.parent


async def probe(token: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "CARTESIA_"))}
    env.update(TWILIO_AUTH_TOKEN=token, TWILIO_ACCOUNT_SID=ACCOUNT_SID)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "probe", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_tone_wav(path: Path, rate: int, freq: float, seconds: float, amplitude: float) -> Path:
    t = np.arange(round(rate * seconds)) / rate
    pcm = np.round(amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.tobytes())
    return path


def dominant_hz(path: Path) -> float:
    with wave.open(str(path), "rb") as wav:
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float64)
    frames = samples[: len(samples) // 160 * 160].reshape(-1, 160)  # 20 ms each
    loud = frames[np.sqrt((frames**2).mean(axis=1)) > 1000].reshape(-1)  # where the agent spoke
    spectrum = np.abs(np.fft.rfft(loud * np.hanning(len(loud))))
    return float(np.fft.rfftfreq(len(loud), 1 / 8000)[int(np.argmax(spectrum))])


async def test_probe_places_a_signed_call_and_reports_first_audio_and_round_trips(tmp_path):
    heard = tmp_path / "heard.wav"
    async with sandbox(AgentBehaviour(greeting_s=1.5)) as box:
        code, out, err = await probe(
            box.settings.twilio_auth_token, box.url, "--seconds", "3", "--output", str(heard)
        )
        agent_call = await box.agent.wait_for_call()
    assert code == 0, out + err
    assert re.search(r"webhook: 200 in \d+ ms; the TwiML streams to ws://127\.0\.0\.1:\d+/twilio/media", out)
    first = re.search(r"first audio (\d+) ms after the webhook \((\d+) ms after the stream opened\)", out)
    assert first is not None, out
    assert 0 <= int(first.group(2)) <= int(first.group(1)) < 2000
    assert re.search(r"control API round trip: \d+ ms \(GET /control/<random token> answered 404 as it", out)
    assert re.search(r"status callback round trip: \d+ ms \(signed CallStatus=completed, answered 204\)", out)
    assert f"what the caller heard: {heard}" in out
    assert abs(dominant_hz(heard) - GREETING_HZ) < 15  # the agent's greeting, as the caller heard it
    assert len(agent_call.audio_in) >= 8000 * 2  # the probe's caller audio reached the agent
    assert agent_call.metadata["from"] == "+15550100002" and agent_call.metadata["to"] == "+15550100001"


async def test_probe_plays_a_wav_and_names_an_agent(tmp_path):
    voice = write_tone_wav(tmp_path / "voice.wav", 16000, 1000.0, 1.0, amplitude=0.2)
    async with sandbox() as box:
        code, out, err = await probe(
            box.settings.twilio_auth_token, box.url, "--wav", str(voice), "--seconds", "2.5",
            "--agent", "agent_other", "--output", str(tmp_path / "heard.wav"),
        )  # fmt: skip
        agent_call = await box.agent.wait_for_call()
    assert code == 0, out + err
    assert agent_call.path == "/agents/stream/agent_other"
    caller = np.frombuffer(bytes(agent_call.audio_in), dtype=np.uint8)
    assert (caller != 0xFF).sum() > 6000  # about a second of the WAV, as mu-law


async def test_probe_with_the_wrong_auth_token_says_so(tmp_path):
    async with sandbox() as box:
        code, _, err = await probe("0" * 32, box.url, "--seconds", "1", "--output", str(tmp_path / "x.wav"))
    assert code == 1
    assert "the gateway refused the webhook's signature (403)" in err
    assert "Traceback" not in err
    code, _, err = await probe("0" * 32, "http://127.0.0.1:9", "--seconds", "1")
    assert code == 1 and "cannot reach http://127.0.0.1:9/twilio/voice" in err
