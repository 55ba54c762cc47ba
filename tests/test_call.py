"""Whole calls over real sockets: simulated Twilio -> gateway on a free port -> sandbox agent."""

import asyncio
import gc
import os
import weakref

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.audio import pcm16_to_ulaw, rms_dbfs, tone_pcm16, ulaw_to_pcm16
from gateway.dtmf import detect_dtmf
from gateway.sandbox.agent import GOODBYE_HZ, GREETING_HZ, AgentBehaviour
from gateway.sandbox.caller import NO_PROXY
from gateway.sandbox.harness import sandbox
from gateway.sandbox.script import CallScript
from gateway.settings import DEFAULT_FALLBACK_TEXT

FRAME = 160


def frames(mulaw: bytes) -> list[bytes]:
    return [mulaw[i : i + FRAME] for i in range(0, len(mulaw), FRAME)]


def loud(frame: bytes) -> bool:
    return rms_dbfs(ulaw_to_pcm16(frame)) > -40


def dominant_hz(mulaw: bytes) -> float:
    import numpy as np

    pcm = np.frombuffer(ulaw_to_pcm16(mulaw), dtype="<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / 8000)[int(np.argmax(spectrum))])


def gateway_of(box):
    return box.app.state.gateway


async def wait_until(predicate, within_s: float = 5.0) -> None:
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110 (polls state owned by the server)
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("output_format", ["mulaw_8000", "pcm_16000", "pcm_24000", "pcm_44100"])
async def test_greeting_reaches_the_caller_in_every_output_format(output_format):
    async with sandbox(AgentBehaviour(output_format=output_format, greeting_s=0.6)) as box:
        call = await box.connect_call()
        await call.run(CallScript(hangup_at=1.2))
    heard = [f for f in frames(bytes(call.heard)) if loud(f)]
    assert len(heard) >= 25  # 0.6 s of greeting, at least 0.5 s of it intact
    assert abs(dominant_hz(b"".join(heard)) - GREETING_HZ) < 15
    assert call.protocol_errors == []


async def test_caller_audio_reaches_the_agent_byte_for_byte():
    voice = os.urandom(FRAME * 40)  # 0.8 s of noise; any bytes are valid mu-law
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        call = await box.connect_call()
        await call.run(CallScript(audio=voice, hangup_at=1.2))
        agent_call = await box.agent.wait_for_call()
        await asyncio.wait_for(agent_call.closed.wait(), 5)
    assert bytes(agent_call.audio_in) == bytes(call.sent_audio)
    assert voice in bytes(agent_call.audio_in)
    config = agent_call.start["config"]
    assert config["input_format"] == "mulaw_8000"


async def test_caller_frames_before_the_ack_are_held_and_sent_in_order():
    voice = os.urandom(FRAME * 30)
    async with sandbox(AgentBehaviour(greeting_s=0.2, ack_delay_s=0.4)) as box:
        call = await box.connect_call()
        await call.run(CallScript(audio=voice, hangup_at=1.0))
        agent_call = await box.agent.wait_for_call()
        await asyncio.wait_for(agent_call.closed.wait(), 5)
    assert bytes(agent_call.audio_in) == bytes(call.sent_audio)


async def test_barge_in_clear_reaches_twilio_and_playback_stops():
    voice = pcm16_to_ulaw(tone_pcm16(300, 0.4, 8000, amplitude=0.5))
    async with sandbox(AgentBehaviour(greeting_s=3.0)) as box:
        call = await box.connect_call()
        await call.run(CallScript(audio=voice, speak_at=0.6, hangup_at=2.5))
        agent_call = await box.agent.wait_for_call()
    assert agent_call.clears_sent == 1
    assert call.clears == 1
    clear_at = call.clear_frames[0]
    heard = frames(bytes(call.heard))
    assert any(loud(f) for f in heard[:clear_at])
    # Without the clear the greeting would go on for seconds; after it the caller hears silence.
    assert not any(loud(f) for f in heard[clear_at + 1 : clear_at + 60])


async def test_dtmf_goes_both_ways():
    behaviour = AgentBehaviour(greeting_s=0.2, dtmf_replies={"*": "147"})
    async with sandbox(behaviour) as box:
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(0.5, "5"), (0.7, "*")], hangup_at=2.5))
        agent_call = await box.agent.wait_for_call()
        await asyncio.wait_for(agent_call.closed.wait(), 5)
    assert agent_call.dtmf_in == ["5", "*"]
    assert detect_dtmf(call.heard_pcm16()) == "147"


async def test_agent_ending_the_call_hangs_up_after_its_last_words_played():
    behaviour = AgentBehaviour(greeting_s=0.2, goodbye_s=0.8, pace=8.0)
    async with sandbox(behaviour) as box:
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(0.5, "#")], max_s=10))
        hangups = box.rest.hangups(call.call_sid)
        assert len(hangups) == 1
        assert hangups[0].authorised
        gateway = gateway_of(box)
        await wait_until(lambda: not gateway.sessions)
        assert await gateway.registry.get(call.call_sid) is None
    goodbye = [f for f in frames(bytes(call.heard)) if loud(f)]
    assert abs(dominant_hz(b"".join(goodbye[-30:])) - GOODBYE_HZ) < 15
    # The whole goodbye played (0.8 s = 40 frames) and the hang-up came after its end.
    assert len(goodbye) >= 40 + 9
    assert hangups[0].at >= call.last_audio_at - 0.05
    assert call.end_reason == "hung up via REST"


async def test_caller_hanging_up_closes_the_agent_socket_and_removes_the_session():
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        call = await box.connect_call()
        await call.run(CallScript(hangup_at=0.5))
        agent_call = await box.agent.wait_for_call()
        await asyncio.wait_for(agent_call.closed.wait(), 5)
        gateway = gateway_of(box)
        await wait_until(lambda: not gateway.sessions)
        assert await gateway.registry.get(call.call_sid) is None
        assert box.rest.hangups() == []
    assert agent_call.close_code == 1000


async def test_an_ended_call_is_freed_at_once_not_left_to_the_garbage_collector():
    # Under load thousands of calls end between two full collections; a call kept alive by a
    # reference cycle would hold its memory until then.
    gc.collect()
    gc.disable()
    try:
        async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
            call = await box.connect_call()
            gateway = gateway_of(box)
            await wait_until(lambda: getattr(gateway.sessions.get(call.call_sid), "state", "") == "live")
            live = gateway.sessions[call.call_sid]
            refs = [weakref.ref(obj) for obj in (live, live.carrier, live.agent_socket, live.playout)]
            del live
            await call.run(CallScript(hangup_at=0.5))
            await wait_until(lambda: not gateway.sessions)
            await wait_until(lambda: all(ref() is None for ref in refs))
    finally:
        gc.enable()


async def test_forged_or_missing_webhook_signature_is_refused():
    async with sandbox() as box:
        call = box.new_call()
        assert await call.dial(signature="Zm9yZ2Vk") == 403
        assert await call.dial(signature="") == 403
        tampered = box.new_call()
        tampered.extra_form = {"From": "+19998887777"}  # signed, then changed on the way
        sig = tampered.sign(box.url + "/twilio/voice", {**tampered.webhook_form(), "From": "+1555"})
        assert await tampered.dial(signature=sig) == 403
        assert await box.new_call().dial() == 200
        assert box.agent.calls == []


async def test_forged_or_missing_upgrade_signature_is_refused_before_accept():
    async with sandbox() as box:
        call = box.new_call()
        assert await call.dial() == 200
        for signature in ("", "Zm9yZ2Vk"):
            headers = {"X-Twilio-Signature": signature} if signature else {}
            with pytest.raises(InvalidStatus) as refused:
                await connect(call.stream_url, additional_headers=headers, **NO_PROXY)
            assert refused.value.response.status_code == 403
        assert box.agent.calls == []
        # The real call is still usable.
        await call.open_stream()
        await call.run(CallScript(hangup_at=0.5))
        assert call.first_audio_at is not None


async def test_wrong_session_parameter_is_refused_and_the_real_session_survives():
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        call = box.new_call()
        assert await call.dial() == 200
        await call.open_stream(parameters={"session": "not-the-token"})
        await call.run(CallScript(max_s=2))
        assert call._ws.protocol.close_code == 1008  # (websockets 13 has it only there)
        assert box.agent.calls == []
        call.ended.clear()
        await call.open_stream()
        await call.run(CallScript(hangup_at=0.5))
        assert call.first_audio_at is not None
        assert len(box.agent.calls) == 1


async def test_malformed_frames_leave_that_call_and_a_concurrent_call_running():
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        bad = await box.connect_call()
        good = await box.connect_call()
        for junk in [
            "not json",
            "[]",
            '{"event":"media"}',
            '{"event":"media","media":{"payload":"!!!not base64"}}',
            '{"event":"dtmf","dtmf":{"digit":"x"}}',
            '{"event":"mark","mark":{}}',
            '{"event":"surprise"}',
            b"\x00\x01binary",
        ]:
            await bad.send(junk)
        voice = os.urandom(FRAME * 25)
        await asyncio.gather(
            bad.run(CallScript(audio=voice, hangup_at=1.0)),
            good.run(CallScript(audio=voice, hangup_at=1.0)),
        )
        await asyncio.sleep(0.2)
        audio_by_call = {c.metadata["call_sid"]: bytes(c.audio_in) for c in box.agent.calls}
    assert audio_by_call[bad.call_sid] == bytes(bad.sent_audio)
    assert audio_by_call[good.call_sid] == bytes(good.sent_audio)
    assert bad.end_reason == good.end_reason == "caller hung up"


def silence_before(call, event: str) -> float:
    """Seconds from the stream's start to the first timeline entry starting with `event`."""
    started = next(t for t, what in call.timeline if what == "stream started")
    return next(t for t, what in call.timeline if what.startswith(event)) - started


@pytest.mark.parametrize(
    ("behaviour", "most_silence_s"),
    [(AgentBehaviour(refuse_status=429), 3.0), (AgentBehaviour(never_ack=True), 6.0)],
    ids=["refused", "no-ack"],
)
async def test_an_agent_that_cannot_be_had_gets_the_caller_the_fallback(behaviour, most_silence_s):
    async with sandbox(behaviour) as box:
        call = await box.connect_call()
        await call.run(CallScript(max_s=9))
        agent_sockets = len(box.agent.calls) if not behaviour.refuse_status else None
    assert call.said == [DEFAULT_FALLBACK_TEXT]
    assert call.end_reason == "hung up by TwiML"  # the <Hangup/> after the <Say>
    assert silence_before(call, "call redirected via REST") <= most_silence_s
    assert box.rest.hangups(call.call_sid) == []
    if agent_sockets is not None:
        assert agent_sockets == 1  # an agent that never acks is not asked again: the fallback


async def test_a_refused_agent_is_retried_within_the_budget(monkeypatch):
    behaviour = AgentBehaviour(greeting_s=0.3, refuse_first=2)  # 429 twice, then it answers
    async with sandbox(behaviour) as box:
        call = await box.connect_call()
        await call.run(CallScript(max_s=2))
    assert call.said == []
    assert call.first_audio_at is not None and box.agent.refused == 2
    assert silence_before(call, "caller hears the agent") < 1.5


@pytest.mark.parametrize(
    ("fallback", "said", "hangups"),
    [(("hangup", ""), [], 1), (("say", "We are closed."), ["We are closed."], 0)],
    ids=["hangup", "say"],
)
async def test_unreachable_agent_gets_the_chosen_fallback(fallback, said, hangups):
    from gateway.sandbox.servers import free_port

    async with sandbox(cartesia_url=f"ws://127.0.0.1:{free_port()}", agent_fallback=fallback) as box:
        call = await box.connect_call()
        await call.run(CallScript(max_s=5))
    assert call.said == said
    assert len(box.rest.hangups(call.call_sid)) == hangups
    assert silence_before(call, "call") <= 3.0  # "call hung up/redirected via REST"


async def test_a_refused_key_is_not_retried_and_dials_the_fallback_number():
    async with sandbox(AgentBehaviour(refuse_status=401), agent_fallback=("dial", "+15550009999")) as box:
        call = await box.connect_call()
        await call.run(CallScript(max_s=3))
        assert box.agent.refused == 1
        (update,) = box.rest.redirects(call.call_sid)
    assert "<Number>+15550009999</Number>" in update.form["Twiml"]
    assert call.end_reason == "redirected via REST"


async def test_a_replayed_media_socket_cannot_join_the_call():
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        first = await box.connect_call()
        runner = asyncio.create_task(first.run(CallScript(max_s=2.5)))
        await box.agent.wait_for_call()
        await asyncio.sleep(0.3)
        # The same signed upgrade and the same `start` (session reference) again.
        replay = box.new_call(call_sid=first.call_sid)
        replay.stream_url, replay.parameters = first.stream_url, first.parameters
        await replay.open_stream(stream_sid="MZ" + "b" * 32)
        async with asyncio.timeout(5):
            await replay._ws.wait_closed()
        await runner
    closed = replay._ws.protocol  # (websockets 13 has the close code only there)
    assert closed.close_code == 1008 and closed.close_reason == "stream already used"
    assert replay.media_arrivals == []
    assert len(box.agent.calls) == 1
    assert first.end_reason == "caller hung up"  # the first stream went on to the end


async def test_final_status_callback_ends_and_removes_the_session():
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        call = await box.connect_call()
        runner = asyncio.create_task(call.run(CallScript(max_s=5)))
        await box.agent.wait_for_call()
        import aiohttp

        form = {"CallSid": call.call_sid, "CallStatus": "completed", "AccountSid": call.account_sid}
        async with aiohttp.ClientSession() as http:
            forged = await http.post(
                box.url + "/twilio/status", data=form, headers={"X-Twilio-Signature": "x"}
            )
            assert forged.status == 403
            sig = call.sign(box.url + "/twilio/status", form)
            ok = await http.post(box.url + "/twilio/status", data=form, headers={"X-Twilio-Signature": sig})
            assert ok.status == 204
        await asyncio.wait_for(runner, 5)
        gateway = gateway_of(box)
        await wait_until(lambda: not gateway.sessions)
        assert await gateway.registry.get(call.call_sid) is None
        assert box.rest.hangups() == []


@pytest.mark.parametrize("how", ["caller_hangs_up", "status_callback"])
async def test_call_ending_before_the_ack_closes_the_agent_socket(how):
    behaviour = AgentBehaviour(greeting_s=0.2, ack_delay_s=1.5)
    async with sandbox(behaviour) as box:
        call = await box.connect_call()
        runner = asyncio.create_task(call.run(CallScript(max_s=10)))
        agent_call = await box.agent.wait_for_call()  # `start` received, no ack yet
        if how == "caller_hangs_up":
            await call.hang_up()
        else:
            form = {"CallSid": call.call_sid, "CallStatus": "completed", "AccountSid": call.account_sid}
            assert (await call.post("/twilio/status", form))[0] == 204
        await asyncio.wait_for(runner, 5)
        await asyncio.wait_for(agent_call.closed.wait(), 3)  # not left open holding a slot
        assert agent_call.close_code == 1000
        gateway = gateway_of(box)
        await wait_until(lambda: not gateway.sessions)


async def test_caller_dtmf_before_the_ack_reaches_the_agent_in_order():
    async with sandbox(AgentBehaviour(greeting_s=0.2, ack_delay_s=0.6, dtmf_replies={})) as box:
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(0.1, "4"), (0.2, "2")], hangup_at=1.2))
        agent_call = await box.agent.wait_for_call()
        await asyncio.wait_for(agent_call.closed.wait(), 5)
    assert agent_call.dtmf_in == ["4", "2"]


async def test_an_oversized_unsigned_webhook_is_refused_without_buffering_it():
    async def body():
        for _ in range(64):
            yield b"x=" + b"a" * 4096 + b"&"

    async with sandbox() as box:
        import aiohttp

        async with aiohttp.ClientSession() as http:
            resp = await http.post(
                box.url + "/twilio/voice",
                data=body(),  # chunked: no Content-Length to refuse it by
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            assert resp.status == 413
        assert box.agent.calls == []


async def test_a_silent_twilio_socket_ends_the_call(monkeypatch):
    from gateway.carriers.twilio.media_leg import TwilioMediaLeg

    monkeypatch.setattr(TwilioMediaLeg, "silent_after_s", 0.5)
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        call = await box.connect_call()  # `start`, then nothing: a half-open connection
        agent_call = await box.agent.wait_for_call()
        await asyncio.wait_for(agent_call.closed.wait(), 5)
        gateway = gateway_of(box)
        await wait_until(lambda: not gateway.sessions)
        await call._close("test over")


async def test_agent_dtmf_strings_past_the_bound_are_dropped_not_played():
    from gateway.agents import calls_api
    from gateway.events import ProtocolError

    with pytest.raises(ProtocolError, match="1 to 64"):
        calls_api.parse_frame('{"event":"dtmf","dtmf":"' + "w" * 65 + '"}')


async def test_max_calls_gives_new_calls_the_fallback_not_a_degraded_bridge():
    async with sandbox(AgentBehaviour(greeting_s=0.3), max_calls=1) as box:
        first = await box.connect_call()
        running = asyncio.create_task(first.run(CallScript(max_s=2)))
        await box.agent.wait_for_call()
        second = box.new_call()
        assert await second.dial() == 200
        assert "<Say>" in second.twiml and "<Stream" not in second.twiml
        await running
    assert len(box.agent.calls) == 1
    assert first.end_reason == "caller hung up"


@pytest.mark.parametrize(
    ("code", "reason", "why"),
    [(1011, "internal error", "agent_dropped"), (1000, "connection idle timeout", "agent_idle_timeout")],
    ids=["1011", "idle-timeout"],
)
async def test_a_dropped_agent_is_reopened_and_resumed(code, reason, why):
    async with sandbox(AgentBehaviour(continuous=True)) as box:
        call = await box.connect_call()
        running = asyncio.create_task(call.run(CallScript(max_s=3)))
        first = await box.agent.wait_for_call()
        await asyncio.sleep(0.8)
        box.agent.drop(first, code, reason)
        second = await box.agent.wait_for_call(1)
        await running
    assert second.metadata["resumed"] is True and second.metadata["resume_reason"] == why
    assert second.metadata["control_url"] == first.metadata["control_url"]
    assert call.end_reason == "caller hung up" and call.said == []


async def test_agent_reconnects_are_bounded_then_the_fallback():
    async with sandbox(AgentBehaviour(continuous=True), agent_reconnects=1) as box:
        call = await box.connect_call()
        running = asyncio.create_task(call.run(CallScript(max_s=6)))
        for index in range(2):
            agent_call = await box.agent.wait_for_call(index)
            await asyncio.sleep(0.3)
            box.agent.drop(agent_call)
        await running
    assert len(box.agent.calls) == 2  # one reconnect, then no more
    assert call.said == [DEFAULT_FALLBACK_TEXT]


async def test_the_agent_ending_the_call_is_never_retried():
    async with sandbox(AgentBehaviour(greeting_s=0.3)) as box:
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(0.5, "#")], max_s=5))
    assert len(box.agent.calls) == 1
    assert call.end_reason == "hung up via REST" and call.said == []


async def test_a_number_can_have_its_own_fallback():
    routes = {
        "+15559870002": {"agent": "agent_sandbox", "metadata": {}, "fallback": ("dial", "+15550001234")}
    }
    async with sandbox(AgentBehaviour(refuse_status=503), agent_routes=routes) as box:
        call = await box.connect_call()  # to +15559870002
        other = await box.connect_call(to="+15559870003")
        await asyncio.gather(call.run(CallScript(max_s=5)), other.run(CallScript(max_s=5)))
        (update,) = box.rest.redirects(call.call_sid)
    assert "<Number>+15550001234</Number>" in update.form["Twiml"]
    assert other.said == [DEFAULT_FALLBACK_TEXT]  # the others get AGENT_FALLBACK
