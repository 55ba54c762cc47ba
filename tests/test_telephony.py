"""SIP calls, transfer outcomes, warm transfer, routing by number, recordings and call events."""

import asyncio
import contextlib
import re
import wave

import aiohttp
import numpy as np
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.audio import pcm16_to_ulaw, tone_pcm16
from gateway.call_events import SIGNATURE_HEADER, verify
from gateway.sandbox.agent import GREETING_HZ, AgentBehaviour
from gateway.sandbox.harness import sandbox
from gateway.sandbox.script import CallScript
from gateway.sandbox.servers import serve
from gateway.settings import Settings

ALLOW = ("+1555*", "sip:*@pbx.example.com")


async def post_json(url: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def agent_for(box, call_sid: str, nth: int = 0):
    async with asyncio.timeout(10):
        while True:
            mine = [a for a in box.agent.calls if a.metadata.get("call_sid") == call_sid and a.start]
            if len(mine) > nth:
                return mine[nth]
            await asyncio.sleep(0.02)


async def live_call(box, **kwargs):
    call = await box.connect_call(**kwargs)
    runner = asyncio.create_task(call.run(CallScript(max_s=20)))
    agent_call = await agent_for(box, call.call_sid)
    return call, agent_call, runner, agent_call.metadata["control_url"]


@contextlib.asynccontextmanager
async def event_receiver():
    received: list[tuple[dict, bytes]] = []

    async def collect(request: Request) -> Response:
        received.append((dict(request.headers), await request.body()))
        return Response(status_code=204)

    async with serve(Starlette(routes=[Route("/events", collect, methods=["POST"])])) as url:
        yield url + "/events", received


def events_of(received, secret: str) -> list[dict]:
    out = []
    for headers, body in received:
        assert verify(secret, body, headers[SIGNATURE_HEADER.lower()])
        out.append(orjson.loads(body))
    return out


# SIP


async def test_sip_domain_call_reaches_the_agent_with_its_headers():
    form = {
        "SipDomain": "acme.sip.twilio.com",
        "SipCallId": "abc@10.0.0.1",
        "SipHeader_X-Customer-Id": "C-991",
        "SipHeader_X-Queue": "billing",
    }
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        call, agent_call, runner, _ = await live_call(
            box, from_="sip:alice@example.com", to="sip:support@acme.sip.twilio.com", extra_form=form
        )
        meta = agent_call.metadata
        assert meta["from"] == "sip:alice@example.com"
        assert meta["to"] == "sip:support@acme.sip.twilio.com"
        assert meta["sip_headers"] == {"X-Customer-Id": "C-991", "X-Queue": "billing"}
        await call.hang_up()
        await runner


async def test_sip_transfer_sends_credentials_for_hosts_that_need_them():
    creds = (("pbx.example.com", "gateway", "s3cret-pass"),)
    async with sandbox(
        AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW, transfer_sip_credentials=creds
    ) as box:
        call, _, runner, url = await live_call(box)
        body = {"action": "transfer", "to": "sip:desk@pbx.example.com", "headers": {"X-Ticket": "7"}}
        assert (await post_json(url, body))[0] == 200
        await asyncio.wait_for(runner, 10)
        twiml = box.rest.redirects(call.call_sid)[0].form["Twiml"]
        assert (
            '<Sip password="s3cret-pass" username="gateway">sip:desk@pbx.example.com?X-Ticket=7</Sip>'
            in twiml
        )


# Blind transfer outcomes


async def blind_transfer(box, **call_kwargs):
    call, agent_call, runner, url = await live_call(box, **call_kwargs)
    assert (await post_json(url, {"action": "call_transfer", "to": "+15551234567"}))[0] == 200
    await asyncio.wait_for(runner, 10)
    (redirect,) = box.rest.redirects(call.call_sid)
    action = re.search(r'action="([^"]+)"', redirect.form["Twiml"]).group(1).replace("&amp;", "&")
    assert action.startswith(box.url + "/twilio/dial-action?")
    return call, agent_call, action[len(box.url) :]


def dial_outcome(call, status: str) -> dict[str, str]:
    return {
        **call.webhook_form(),
        "CallStatus": "in-progress",
        "DialCallStatus": status,
        "DialCallSid": "CA" + "d" * 32,
    }


async def test_answered_blind_transfer_bridges_the_caller_and_ends_after():
    async with event_receiver() as (events_url, received):
        async with sandbox(
            AgentBehaviour(greeting_s=0.2),
            transfer_allow=ALLOW,
            call_events_url=events_url,
            call_events_secret="whsec_1",
        ) as box:
            call, _, action = await blind_transfer(box)
            status, twiml = await call.post(action, dial_outcome(call, "completed"))
            assert status == 200
            assert "<Hangup />" in twiml and "<Stream" not in twiml
            assert len(box.agent.calls) == 1  # nobody was brought back
            await asyncio.sleep(0.3)
        kinds = [e["type"] for e in events_of(received, "whsec_1")]
    assert "transfer.started" in kinds and "transfer.completed" in kinds


@pytest.mark.parametrize("outcome", ["busy", "no-answer", "failed"])
async def test_blind_transfer_not_taken_returns_the_caller_to_an_agent_that_knows_why(outcome):
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        call, first_agent, action = await blind_transfer(box)
        status, twiml = await call.post(action, dial_outcome(call, outcome))
        assert status == 200 and call.follow(twiml)
        await call.open_stream()
        runner = asyncio.create_task(call.run(CallScript(max_s=10)))
        second_agent = await agent_for(box, call.call_sid, nth=1)
        assert second_agent.metadata["transfer_failed"] == {"status": outcome, "destination": "+15551234567"}
        # The call keeps its control URL (it was dead while the transfer was under way).
        assert second_agent.metadata["control_url"] == first_agent.metadata["control_url"]
        await asyncio.sleep(0.5)
        assert call.first_audio_at is not None
        status, _ = await post_json(second_agent.metadata["control_url"], {"action": "end_call"})
        assert status == 200
        await asyncio.wait_for(runner, 10)
        assert len(box.rest.hangups(call.call_sid)) == 1


async def test_blind_transfer_not_taken_with_hangup_fallback_says_goodbye():
    async with sandbox(
        AgentBehaviour(greeting_s=0.2),
        transfer_allow=ALLOW,
        transfer_fallback="hangup",
        transfer_fallback_message="Nobody is free, goodbye.",
    ) as box:
        call, _, action = await blind_transfer(box)
        status, twiml = await call.post(action, dial_outcome(call, "no-answer"))
        assert status == 200
        assert "<Say>Nobody is free, goodbye.</Say><Hangup />" in twiml
        assert "<Stream" not in twiml


async def test_dial_action_needs_a_valid_signature():
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        call, _, action = await blind_transfer(box)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                box.url + action, data=dial_outcome(call, "busy"), headers={"X-Twilio-Signature": "bad"}
            ) as resp,
        ):
            assert resp.status == 403


# Warm transfer


async def warm_transfer(box):
    call, agent_call, runner, url = await live_call(box)
    body = {"action": "call_transfer", "to": "+15551234567", "mode": "warm", "summary": "Wants a refund"}
    assert (await post_json(url, body))[0] == 200
    await asyncio.wait_for(runner, 10)
    (hold,) = box.rest.redirects(call.call_sid)
    (human,) = box.rest.created
    return call, agent_call, hold.form["Twiml"], human


def path_of(box, url: str) -> str:
    return url[len(box.url) :]


async def test_warm_transfer_holds_the_caller_and_whispers_only_to_the_human():
    async with event_receiver() as (events_url, received):
        async with sandbox(
            AgentBehaviour(greeting_s=0.2),
            transfer_allow=ALLOW,
            transfer_hold_url="https://cdn.example.com/hold.mp3",
            call_events_url=events_url,
            call_events_secret="whsec_2",
        ) as box:
            call, _, hold, human = await warm_transfer(box)
            room = f"warm-{call.call_sid}"
            assert re.search(
                rf'<Conference [^>]*startConferenceOnEnter="false"[^>]*>{room}</Conference>', hold
            )
            assert 'waitMethod="GET"' in hold and 'waitUrl="https://cdn.example.com/hold.mp3"' in hold
            assert "<Say>" not in hold  # the caller never hears the whisper
            assert (human.form["To"], human.form["From"]) == ("+15551234567", call.to)
            twiml = human.form["Twiml"]
            assert twiml.index("<Say>Wants a refund</Say>") < twiml.index("<Conference")
            assert re.search(
                rf'<Conference [^>]*startConferenceOnEnter="true"[^>]*>{room}</Conference>', twiml
            )
            # The human answers, hears the whisper, joins: the caller is bridged where they are.
            human_sid = human.call_sid
            leg = path_of(box, human.form["StatusCallback"])
            assert (await call.post(leg, {"CallSid": human_sid, "CallStatus": "in-progress"}))[0] == 204
            # Both participants carry the conference's callback (Twilio may keep the first
            # one's, and the caller joins first); only the human's joining completes it.
            callbacks = {re.search(r'statusCallback="([^"]+)"', t).group(1) for t in (twiml, hold)}
            assert len(callbacks) == 1
            conference = path_of(box, callbacks.pop().replace("&amp;", "&"))
            caller_join = {"CallSid": call.call_sid, "StatusCallbackEvent": "participant-join"}
            assert (await call.post(conference, {**caller_join, "FriendlyName": room}))[0] == 204
            join = {"CallSid": human_sid, "StatusCallbackEvent": "participant-join", "FriendlyName": room}
            assert (await call.post(conference, join))[0] == 204
            assert (await call.post(leg, {"CallSid": human_sid, "CallStatus": "completed"}))[0] == 204
            assert len(box.rest.redirects(call.call_sid)) == 1  # nobody moved the caller again
            assert len(box.agent.calls) == 1
            assert box.rest.hangups() == []
            await asyncio.sleep(0.3)
        kinds = [e["type"] for e in events_of(received, "whsec_2")]
    assert kinds.count("transfer.completed") == 1 and "transfer.failed" not in kinds


async def back_with_agent(box, call, outcome: str):
    back = box.rest.redirects(call.call_sid)[-1].form["Twiml"]
    assert "<Stream" in back
    async with asyncio.timeout(5):  # Twilio runs the update's TwiML: a new stream, to the gateway
        while call.streams_opened == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    runner = asyncio.create_task(call.run(CallScript(hangup_at=0.8)))
    second = await agent_for(box, call.call_sid, nth=1)
    assert second.metadata["transfer_failed"] == {"status": outcome, "destination": "+15551234567"}
    await runner


@pytest.mark.parametrize("outcome", ["busy", "no-answer"])
async def test_warm_transfer_not_taken_returns_the_caller_to_an_agent(outcome):
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        call, _, _, human = await warm_transfer(box)
        leg = path_of(box, human.form["StatusCallback"])
        assert (await call.post(leg, {"CallSid": human.call_sid, "CallStatus": outcome}))[0] == 204
        await back_with_agent(box, call, outcome)


async def test_warm_transfer_the_human_hangs_up_during_the_whisper_returns_the_caller():
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        call, _, _, human = await warm_transfer(box)
        leg = path_of(box, human.form["StatusCallback"])
        for status in ("in-progress", "completed"):  # answered, never joined
            assert (await call.post(leg, {"CallSid": human.call_sid, "CallStatus": status}))[0] == 204
        await back_with_agent(box, call, "completed")


async def test_warm_transfer_the_caller_hanging_up_on_hold_hangs_up_the_human():
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        call, _, _, human = await warm_transfer(box)
        box.rest.calls[human.call_sid] = "in-progress"  # ringing or hearing the whisper
        form = {"CallSid": call.call_sid, "CallStatus": "completed", "AccountSid": call.account_sid}
        assert (await call.post("/twilio/status", form))[0] == 204
        assert [r.call_sid for r in box.rest.hangups()] == [human.call_sid]


async def test_warm_transfer_whose_dial_twilio_refuses_keeps_the_caller_with_the_agent():
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        box.rest.refuse_creates = True
        call, agent_call, runner, url = await live_call(box)
        body = {"action": "call_transfer", "to": "+15551234567", "mode": "warm"}
        assert (await post_json(url, body))[0] == 200
        await asyncio.sleep(1.5)  # the agent's quiet moment (AGENT_QUIET_S), then the refusal
        assert box.rest.redirects() == []  # never put on hold
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert (await resp.json())["state"] == "live"
        assert not agent_call.closed.is_set()
        await call.hang_up()
        await runner


async def test_a_dial_outcome_racing_the_old_sessions_cleanup_still_reconnects():
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        call, _agent_call, runner, url = await live_call(box)
        outcome: dict[str, str] = {}
        forward = box.rest.on_update

        async def dial_fails_at_once(call_sid, form):
            await forward(call_sid, form)
            action = re.search(r'action="([^"]+)"', form["Twiml"]).group(1).replace("&amp;", "&")
            outcome["twiml"] = (await call.post(path_of(box, action), dial_outcome(call, "busy")))[1]

        box.rest.on_update = dial_fails_at_once
        assert (await post_json(url, {"action": "call_transfer", "to": "+15551234567"}))[0] == 200
        await asyncio.wait_for(runner, 10)
        await asyncio.sleep(0.5)  # the old session's cleanup has run by now
        assert call.follow(outcome["twiml"])
        await call.open_stream()
        runner = asyncio.create_task(call.run(CallScript(hangup_at=0.8)))
        second = await agent_for(box, call.call_sid, nth=1)
        assert second.metadata["transfer_failed"]["status"] == "busy"
        await runner


async def test_a_dial_outcome_after_the_caller_hung_up_brings_nobody_back():
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        call, _, action = await blind_transfer(box)
        form = {**dial_outcome(call, "no-answer"), "CallStatus": "completed"}
        status, twiml = await call.post(action, form)
        assert status == 200 and "<Stream" not in twiml and "<Hangup />" in twiml


async def test_a_new_call_is_answered_while_redis_is_down(redis_server):
    from gateway.registry.redis import RedisRegistry
    from tests.redis_server import RedisServer

    server = RedisServer().start()
    try:
        async with sandbox(AgentBehaviour(greeting_s=0.2), registry=RedisRegistry(server.url)) as box:
            server.stop()
            call = await box.connect_call()
            await call.run(CallScript(hangup_at=0.8))
            assert call.first_audio_at is not None
    finally:
        server.stop()


# Routing, recordings, events


async def test_agent_routes_pick_the_agent_and_metadata_by_called_number():
    raw = {
        "+15559870002": {"agent": "agent_sales", "metadata": {"team": "sales"}},
        "sip:help@acme.sip.twilio.com": "agent_help",
    }
    routes = Settings.from_env({"AGENT_ROUTES": orjson.dumps(raw).decode()}).agent_routes
    async with sandbox(AgentBehaviour(greeting_s=0.2), agent_routes=routes) as box:
        a, agent_a, run_a, _ = await live_call(box, to="+15559870002")
        b, agent_b, run_b, _ = await live_call(box, to="sip:help@acme.sip.twilio.com;transport=tls")
        c, agent_c, run_c, _ = await live_call(box, to="+15550000000")
        assert agent_a.path.endswith("/agent_sales") and agent_a.metadata["team"] == "sales"
        assert agent_b.path.endswith("/agent_help")
        assert agent_c.path.endswith("/agent_sandbox")  # CARTESIA_AGENT_ID
        for call, runner in ((a, run_a), (b, run_b), (c, run_c)):
            await call.hang_up()
            await runner


def channel_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / 8000)[int(np.argmax(spectrum))])


async def test_recorded_call_yields_a_stereo_wav_caller_left_agent_right(tmp_path):
    voice = pcm16_to_ulaw(tone_pcm16(300, 0.8, 8000, amplitude=0.4))
    behaviour = AgentBehaviour(greeting_s=0.6, speech_dbfs=0.0)  # no barge-in: both must be heard
    async with sandbox(behaviour, recordings_dir=str(tmp_path), record_calls=True) as box:
        call = await box.connect_call()
        await call.run(CallScript(audio=voice, speak_at=1.0, hangup_at=2.2))
        gateway = box.app.state.gateway
        async with asyncio.timeout(5):
            while gateway.sessions or not (tmp_path / f"{call.call_sid}.wav").exists():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        (start,) = [r for r in box.rest.requests if r.path.endswith("/Recordings.json")]
        assert start.call_sid == call.call_sid and start.form["RecordingChannels"] == "dual"
    with wave.open(str(tmp_path / f"{call.call_sid}.wav")) as wav:
        assert (wav.getnchannels(), wav.getframerate(), wav.getsampwidth()) == (2, 8000, 2)
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2).astype(float)
    left, right = frames[:, 0], frames[:, 1]
    greeting, speech = slice(int(0.1 * 8000), int(0.6 * 8000)), slice(int(1.1 * 8000), int(1.7 * 8000))
    assert abs(channel_hz(right[greeting]) - GREETING_HZ) < 15  # the agent, on the right
    assert abs(channel_hz(left[speech]) - 300) < 15  # the caller, on the left, when they spoke
    assert np.sqrt(np.mean(left[greeting] ** 2)) < 100  # the caller was silent during the greeting
    assert np.sqrt(np.mean(right[speech] ** 2)) < 100  # and the agent silent while they spoke


async def test_call_events_arrive_signed_and_verifiable():
    secret = "whsec_test_secret"
    async with event_receiver() as (events_url, received):
        behaviour = AgentBehaviour(greeting_s=0.2, goodbye_s=0.2, pace=8)
        async with sandbox(behaviour, call_events_url=events_url, call_events_secret=secret) as box:
            call = await box.connect_call()
            await call.run(CallScript(dtmf=[(0.4, "*"), (0.8, "#")], max_s=10))
            form = {
                "CallSid": call.call_sid,
                "RecordingSid": "RE1",
                "RecordingUrl": "https://api/rec/RE1",
                "RecordingStatus": "completed",
                "RecordingDuration": "3",
                "RecordingChannels": "2",
            }
            assert (await call.post("/twilio/recording", form))[0] == 204
            async with asyncio.timeout(5):
                while not any(b"recording.completed" in body for _, body in received):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        events = events_of(received, secret)
        assert not verify("wrong-secret", received[0][1], received[0][0][SIGNATURE_HEADER.lower()])
    by_type = {}
    for event in events:
        assert event["call_sid"] == call.call_sid
        by_type.setdefault(event["type"], []).append(event)
    assert by_type["call.started"][0]["data"]["from"] == call.from_
    assert [e["data"]["digits"] for e in by_type["dtmf"]] == ["*", "147", "#"]
    assert by_type["agent.custom"][0]["data"]["metadata"] == {"greeting": True, "sessions": 1}
    (ended,) = by_type["call.ended"]
    assert ended["data"]["outcome"] == "agent_ended_call" and ended["data"]["duration_s"] > 0.5
    assert by_type["recording.completed"][0]["data"]["recording_url"] == "https://api/rec/RE1"


async def test_a_blind_transfer_nobody_takes_is_reported_as_transfer_failed():
    async with event_receiver() as (events_url, received):
        async with sandbox(
            AgentBehaviour(greeting_s=0.2),
            transfer_allow=ALLOW,
            transfer_fallback="hangup",
            call_events_url=events_url,
            call_events_secret="whsec_3",
        ) as box:
            call, _, action = await blind_transfer(box)
            status, twiml = await call.post(action, dial_outcome(call, "busy"))
            assert status == 200 and "<Hangup />" in twiml
            await asyncio.sleep(0.3)
        failed = [e for e in events_of(received, "whsec_3") if e["type"] == "transfer.failed"]
    assert len(failed) == 1
    assert failed[0]["call_sid"] == call.call_sid
    assert failed[0]["data"]["status"] == "busy"
    assert failed[0]["data"]["destination"] == "+15551234567"


async def test_warm_transfer_to_a_sip_desk_dials_it_with_its_credentials():
    creds = (("pbx.example.com", "gateway", "s3cret-pass"),)
    async with sandbox(
        AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW, transfer_sip_credentials=creds
    ) as box:
        _, _, runner, url = await live_call(box)
        body = {
            "action": "call_transfer",
            "to": "sip:desk@pbx.example.com",
            "mode": "warm",
            "headers": {"X-Ticket": "7"},
        }
        assert (await post_json(url, body))[0] == 200
        await asyncio.wait_for(runner, 10)
        (human,) = box.rest.created
        assert human.form["To"] == "sip:desk@pbx.example.com?X-Ticket=7"
        assert (human.form["SipAuthUsername"], human.form["SipAuthPassword"]) == ("gateway", "s3cret-pass")


def test_agent_routes_can_come_from_a_json_file(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text('{"+15559870002": {"agent": "agent_sales", "metadata": {"team": "sales"}}}')
    routes = Settings.from_env({"AGENT_ROUTES": str(path)}).agent_routes
    assert routes == {"+15559870002": {"agent": "agent_sales", "metadata": {"team": "sales"}}}
