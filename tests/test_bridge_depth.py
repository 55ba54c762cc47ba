"""The bridge in depth, over real sockets through the sandbox: marks gating the hang-up, barge-in
with a PCM agent, hang-ups of calls Twilio already ended, agent junk, keepalive pings, the call's
log lines, the caller streaming a WAV, and `line-gateway simulate` as users run it."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import orjson
import pytest
from aiohttp import WSMsgType, web
from test_call import dominant_hz, frames, loud

from gateway.audio import pcm16_to_ulaw, tone_pcm16
from gateway.dtmf import detect_dtmf
from gateway.sandbox.agent import GOODBYE_HZ, GREETING_HZ, AgentBehaviour
from gateway.sandbox.harness import sandbox
from gateway.sandbox.script import CallScript
from gateway.sandbox.servers import free_port

REPO = Path(__file__).resolve().parent.parent


async def wait_until(predicate, within_s: float = 5.0) -> None:
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110 (polls state owned by the server)
            await asyncio.sleep(0.005)


def log_lines(captured, since: int) -> list[dict]:
    """The JSON log lines written to the session's capture since position `since`."""
    return [json.loads(line) for line in captured.getvalue()[since:].splitlines() if line.strip()]


async def ended_cleanly(box, call) -> None:
    gateway = box.app.state.gateway
    await wait_until(lambda: call.call_sid not in gateway.sessions)
    assert await gateway.registry.get(call.call_sid) is None


# 1. Marks gate the hang-up


async def test_agent_hang_up_waits_for_the_mark_of_its_last_words_and_no_longer():
    # A drain budget far above the tolerance: a hang-up that waited for it instead of the mark
    # comes seconds late.
    behaviour = AgentBehaviour(greeting_s=0.2, goodbye_s=0.8, pace=8.0)
    async with sandbox(behaviour, end_call_drain_s=2.0) as box:
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(0.4, "#")], max_s=8))
        hangups = box.rest.hangups(call.call_sid)
        await ended_cleanly(box, call)
    assert len(hangups) == 1
    goodbye = [f for f in frames(bytes(call.heard)) if loud(f)]
    assert len(goodbye) >= 40  # the whole 0.8 s goodbye played before the hang-up
    assert abs(dominant_hz(b"".join(goodbye[-30:])) - GOODBYE_HZ) < 15
    assert call.marks_echoed, "the caller echoed no mark"
    # After the last audio played and after the caller's last mark echo, but not much after.
    assert hangups[0].at >= call.last_audio_at - 0.05
    assert hangups[0].at >= call.marks_echoed_at[-1]
    assert hangups[0].at - call.last_audio_at < 0.5, "hang-up waited for the drain timeout, not the mark"
    assert call.end_reason == "hung up via REST"


# 2. Barge-in with a PCM agent


async def test_barge_in_with_a_pcm_agent_voids_playback_and_silences_the_old_utterance():
    voice = pcm16_to_ulaw(tone_pcm16(300, 0.4, 8000, amplitude=0.5))
    async with sandbox(AgentBehaviour(output_format="pcm_24000", greeting_s=3.0)) as box:
        gateway = box.app.state.gateway
        call = await box.connect_call()
        runner = asyncio.create_task(call.run(CallScript(audio=voice, speak_at=0.6, hangup_at=2.0)))
        await wait_until(lambda: call.call_sid in gateway.sessions)
        session = gateway.sessions[call.call_sid]
        sent_before = 0.0
        async with asyncio.timeout(3):
            while call.clears == 0:
                sent_before = max(sent_before, session.playout.playback.sent_s)
                await asyncio.sleep(0.005)
        sent_after = session.playout.playback.sent_s  # the caller has just seen the clear
        await runner
        agent_call = await box.agent.wait_for_call()
    assert agent_call.clears_sent == 1
    assert call.clears == 1
    assert sent_before > 0.3  # the greeting was well under way ...
    assert call.cleared_s[0] > 0.3  # ... with plenty of it still queued at Twilio
    assert sent_after < 0.05, f"playback not void after the clear: sent_s={sent_after:.3f}"
    # The gateway sent at most ~60 ms of agent audio after its clear (frames in flight) ...
    clear_index = next(i for i, f in enumerate(call.received) if f["event"] == "clear")
    media_after = [f for f in call.received[clear_index:] if f["event"] == "media"]
    assert sum(len(f["media"]["payload"]) * 3 // 4 for f in media_after) <= 480
    # ... and from the clear on (allowing ~60 ms in flight) the caller hears nothing loud.
    heard = frames(bytes(call.heard))
    clear_at = call.clear_frames[0]
    assert any(loud(f) for f in heard[:clear_at])
    assert abs(dominant_hz(b"".join(f for f in heard[:clear_at] if loud(f))) - GREETING_HZ) < 15
    assert len(heard) > clear_at + 40  # the call went on for a while after the clear
    assert [i for i, f in enumerate(heard[clear_at + 3 :]) if loud(f)] == []


# 3. Hanging up a call Twilio has already ended


@pytest.mark.parametrize("gone", ["unknown_20404", "completed_21220"])
async def test_hanging_up_a_call_twilio_already_ended_still_ends_it_cleanly(gone, captured_logs):
    since = captured_logs.tell()
    async with sandbox(AgentBehaviour(greeting_s=0.2, goodbye_s=0.3, pace=8.0)) as box:
        call = await box.connect_call()
        if gone == "unknown_20404":
            box.rest.forget_call(call.call_sid)
        else:
            box.rest.complete_call(call.call_sid)
        await call.run(CallScript(dtmf=[(0.4, "#")], max_s=5))
        agent_call = await box.agent.wait_for_call()
        await asyncio.wait_for(agent_call.closed.wait(), 3)
        await ended_cleanly(box, call)
        hangups = box.rest.hangups(call.call_sid)
    assert [(h.answered, h.code) for h in hangups] == (
        [(404, 20404)] if gone == "unknown_20404" else [(400, 21220)]
    )
    assert call.end_reason == "gateway closed the stream"
    assert agent_call.close_code == 1000
    errors = [line for line in log_lines(captured_logs, since) if line.get("level") in ("error", "critical")]
    assert errors == []


# 4. Agent junk mid-call


UNKNOWN_EVENT = ('{"event":"surprise_event","stream_id":"x","data":{"n":1}}',)
MALFORMED = (
    "this is {not json",
    b"\x00\x01 binary junk",
    "[1, 2, 3]",
    '{"event": 5}',
    '{"event":"media_output","media":{"payload":"!!! not base64"}}',
    '{"event":"dtmf","dtmf":""}',
)


@pytest.mark.parametrize(
    ("junk", "logged"),
    [(UNKNOWN_EVENT, "agent_event_ignored"), (MALFORMED, "agent_frame_dropped")],
    ids=["unknown_event", "malformed_frames"],
)
async def test_agent_junk_mid_call_leaves_the_call_running(junk, logged, captured_logs):
    since = captured_logs.tell()
    behaviour = AgentBehaviour(greeting_s=0.6, dtmf_replies={"*": "147"}, extra_frames=junk)
    async with sandbox(behaviour) as box:
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(1.0, "*")], hangup_at=2.2))
        agent_call = await box.agent.wait_for_call()
        await asyncio.wait_for(agent_call.closed.wait(), 3)
        await ended_cleanly(box, call)
    lines = [line for line in log_lines(captured_logs, since) if line.get("call_sid") == call.call_sid]
    failures = [line.get("error") for line in lines if line.get("level") == "error"]
    assert failures == [], "the agent's junk broke the call"
    # The junk came after the ack and before the greeting; the greeting and DTMF both ways after it.
    greeting = [f for f in frames(bytes(call.heard)) if loud(f) and abs(dominant_hz(f) - GREETING_HZ) < 60]
    assert len(greeting) >= 25
    assert agent_call.dtmf_in == ["*"]
    assert detect_dtmf(call.heard_pcm16()) == "147"
    assert call.end_reason == "caller hung up"
    assert agent_call.close_code == 1000  # closed by the gateway when the caller left, not before
    assert sum(line["event"] == logged for line in lines) == len(junk)


async def test_an_agent_event_before_the_ack_is_ignored_not_fatal():
    custom = orjson.dumps({"event": "custom", "stream_id": "x", "metadata": {"early": True}}).decode()
    async with sandbox(AgentBehaviour(greeting_s=0.4, frames_before_ack=(custom,))) as box:
        call = await box.connect_call()
        await call.run(CallScript(hangup_at=1.2))
        await ended_cleanly(box, call)
    assert len([f for f in frames(bytes(call.heard)) if loud(f)]) >= 15  # the greeting played
    assert box.rest.hangups() == []
    assert call.end_reason == "caller hung up"


# 5. Keepalive pings


class SilentPingAgent:
    """A Calls API agent (start/ack) that then says nothing, and notes the WebSocket pings it
    gets. aiohttp with autoping off hands PING frames to the handler; websockets would not."""

    def __init__(self) -> None:
        self.pings: list[float] = []
        self.acked_at: float | None = None
        self.media_frames = 0
        self.close_code: int | None = None
        self.closed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        try:
            first = await ws.receive()
            start = orjson.loads(first.data)
            assert start["event"] == "start"
            ack = {"event": "ack", "stream_id": start.get("stream_id", ""), "config": start.get("config", {})}
            await ws.send_str(orjson.dumps(ack).decode())
            self.acked_at = time.monotonic()
            while True:
                msg = await ws.receive()
                if msg.type is WSMsgType.PING:
                    self.pings.append(time.monotonic())
                    await ws.pong(msg.data)
                elif msg.type is WSMsgType.TEXT:
                    self.media_frames += orjson.loads(msg.data).get("event") == "media_input"
                elif msg.type is WSMsgType.CLOSE:
                    self.close_code = msg.data
                    await ws.close()
                    break
                else:
                    break
        finally:
            self.closed.set()
        return ws


async def test_the_gateway_pings_a_silent_agent(monkeypatch):
    monkeypatch.setattr("gateway.agents.cartesia.PING_INTERVAL_S", 0.3)
    # Pings go out from the session's watchdog, which looks once a second; look more often so
    # that the 0.3 s interval shows.
    monkeypatch.setattr("gateway.call.watchdog.WATCH_EVERY_S", 0.1)
    agent = SilentPingAgent()
    app = web.Application()
    app.router.add_get("/agents/stream/{agent_id}", agent.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with sandbox(cartesia_url=f"ws://127.0.0.1:{port}") as box:
            call = await box.connect_call()
            await call.run(CallScript(hangup_at=1.6))
            await asyncio.wait_for(agent.closed.wait(), 3)
            await ended_cleanly(box, call)
    finally:
        await runner.cleanup()
    assert agent.acked_at is not None and agent.media_frames > 40  # the caller's audio flowed
    # ~0.3 s of silence from the agent, then a ping; answered, so another 0.3 s later.
    assert len(agent.pings) >= 3, f"pings at {[round(p - agent.acked_at, 2) for p in agent.pings]}"
    gaps = np.diff([agent.acked_at, *agent.pings])
    assert max(gaps) < 0.6
    assert agent.close_code == 1000  # pongs kept it up until the caller hung up
    assert call.end_reason == "caller hung up"


# 6. The call's log lines


# uvicorn's own lines for the media socket: written when the socket is accepted (or closed), in
# uvicorn's protocol task, before the `start` frame says which call it is. Not the gateway's.
TRANSPORT_LINES = re.compile(r'^(connection (open|closed)|.*"WebSocket /twilio/media/CA\w+" \[accepted\])$')


async def test_every_log_line_of_a_call_names_it_and_states_go_in_order(captured_logs):
    behaviour = AgentBehaviour(greeting_s=0.3, goodbye_s=0.3, pace=8.0)
    async with sandbox(behaviour) as box:
        since = captured_logs.tell()  # after the sandbox's start-up lines
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(0.3, "5"), (0.6, "#")], max_s=5))
        await ended_cleanly(box, call)
        lines = log_lines(captured_logs, since)
    # Every line logged during the call concerns it. If this fails, the message names the events
    # logged without call_sid (structlog.contextvars binding in gateway/app.py and the session's
    # bound logger are what add it): report them rather than loosening the check.
    unbound = sorted(
        {
            str(line.get("event"))
            for line in lines
            if line.get("call_sid") != call.call_sid and not TRANSPORT_LINES.match(str(line.get("event")))
        }
    )
    assert unbound == [], f"log lines of the call without its call_sid: {unbound}"
    states = [line["state"] for line in lines if line.get("event") == "call_state"]
    assert states == ["ringing", "connecting", "live", "ending", "ended"]
    events = {line.get("event") for line in lines}
    assert {"caller_dtmf", "agent_ended_call", "call_closed"} <= events


# 7. The caller streams a WAV


def write_tone_wav(
    path: Path, rate: int, channels: int, width: int, freq: float, seconds: float, amplitude: float = 0.5
) -> Path:
    """A sine as a PCM WAV of the given rate, channel count and sample width (1 to 4 bytes)."""
    t = np.arange(round(rate * seconds)) / rate
    x = amplitude * np.sin(2 * np.pi * freq * t)
    if width == 1:  # 8-bit WAV is unsigned
        data = np.round(x * 127 + 128).astype(np.uint8)
    else:
        data = np.round(x * (2 ** (8 * width - 1) - 1)).astype("<i4")
    interleaved = np.repeat(data[:, None], channels, axis=1).reshape(-1)
    if width == 3:
        raw = interleaved.astype("<i4").tobytes()
        payload = b"".join(raw[i : i + 3] for i in range(0, len(raw), 4))
    else:
        payload = interleaved.astype({1: np.uint8, 2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(payload)
    return path


@pytest.mark.parametrize(
    ("rate", "channels", "width"), [(44100, 2, 2), (16000, 1, 1), (48000, 1, 3)], ids=str
)
async def test_a_wav_streamed_by_the_caller_reaches_the_agent_as_mulaw_at_the_same_pitch(
    tmp_path, rate, channels, width
):
    path = write_tone_wav(tmp_path / "tone.wav", rate, channels, width, 1000.0, 0.6)
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        call = await box.connect_call()
        await call.run(CallScript(wav=path, speak_at=0.2, hangup_at=1.2))
        agent_call = await box.agent.wait_for_call()
        await asyncio.wait_for(agent_call.closed.wait(), 3)
    assert bytes(agent_call.audio_in) == bytes(call.sent_audio)
    spoken = [f for f in frames(bytes(agent_call.audio_in)) if loud(f)]
    assert 28 <= len(spoken) <= 31  # 0.6 s: 30 frames, the rate converted, not reinterpreted
    assert abs(dominant_hz(b"".join(spoken)) - 1000.0) < 15


# 8. `line-gateway simulate` as users run it


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # What the `line-gateway` console script runs: sys.exit(main()). (`-c "...; main()"` alone
    # would exit 0 whatever main returned.)
    command = [sys.executable, "-c", "import sys; from gateway.cli import main; sys.exit(main())", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def assert_wav_written(out: Path, stdout: str) -> None:
    assert f"recording of what the caller heard: {out}" in stdout
    with wave.open(str(out), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels()) == (8000, 1)
        assert wav.getnframes() > 8000 * 3  # a few seconds of call


def test_simulate_runs_a_whole_call_and_names_the_wav_it_wrote(tmp_path):
    out = tmp_path / "heard.wav"
    done = run_cli("simulate", "--output", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_wav_written(out, done.stdout)
    assert "Twilio REST hang-ups recorded: 1" in done.stdout
    assert "DTMF the caller heard from the agent: 147" in done.stdout
    assert "clears 1" in done.stdout  # the built-in caller talks over the greeting


def test_simulate_plays_the_callers_own_wav(tmp_path):
    # Quieter than the emulator's speech threshold: unlike the built-in caller, no barge-in.
    voice = write_tone_wav(tmp_path / "voice.wav", 22050, 2, 2, 1000.0, 1.0, amplitude=0.02)
    out = tmp_path / "heard.wav"
    done = run_cli("simulate", "--caller-wav", str(voice), "--output", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"caller audio: {voice} (1.00 s)" in done.stdout
    assert "clears 0" in done.stdout
    assert_wav_written(out, done.stdout)
    received = re.search(r"agent received (\d+) bytes of caller audio", done.stdout)
    assert received is not None and int(received.group(1)) >= 8000  # the whole second and more
    bad = run_cli("simulate", "--caller-wav", str(tmp_path / "missing.wav"))
    assert bad.returncode == 2
    assert "cannot play --caller-wav" in bad.stderr


async def test_an_agent_url_that_redirects_is_refused_and_the_api_key_stays_home():
    """aiohttp would follow a redirect to any host with X-API-Key on it; the gateway refuses
    to follow, and the call ends as with an unavailable agent."""
    elsewhere_headers: list[dict[str, str]] = []

    async def elsewhere(request: web.Request) -> web.Response:
        elsewhere_headers.append(dict(request.headers))
        return web.Response(status=404)

    async def redirecting(request: web.Request) -> web.Response:
        raise web.HTTPFound(location=f"http://127.0.0.1:{elsewhere_port}/agents/stream/x")

    runners = []
    ports = []
    for handler in (elsewhere, redirecting):
        app = web.Application()
        app.router.add_get("/agents/stream/{agent_id}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        ports.append(port)
    elsewhere_port, redirect_port = ports
    try:
        async with sandbox(cartesia_url=f"ws://127.0.0.1:{redirect_port}") as box:
            call = await box.connect_call()
            await call.run(CallScript(max_s=5))
            assert call.said  # the caller is not left in silence: AGENT_FALLBACK's message
        assert elsewhere_headers == []
    finally:
        for runner in runners:
            await runner.cleanup()
