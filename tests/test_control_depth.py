"""The control API in depth, on one instance: conflicts while a transfer is under way, and the
agent's queued speech playing out before the transfer's REST redirect."""

import asyncio
import base64

import aiohttp

from gateway.audio import MULAW_FRAME_BYTES
from gateway.dtmf import detect_dtmf
from gateway.sandbox.agent import AgentBehaviour
from gateway.sandbox.caller import FRAME_S, SILENCE, SimulatedCall
from gateway.sandbox.harness import sandbox
from gateway.sandbox.script import CallScript

ALLOW = ("+1555*", "sip:*@pbx.example.com")
TRANSFER_TO = "+15551234567"


async def post(url: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def get(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json()


async def live_call(box, script: CallScript | None = None):
    """A connected call streaming in the background; returns (call, agent_call, runner, control_url)."""
    call = await box.connect_call()
    runner = asyncio.create_task(call.run(script or CallScript(max_s=20)))
    async with asyncio.timeout(10):
        while not (mine := [a for a in box.agent.calls if a.metadata.get("call_sid") == call.call_sid]):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return call, mine[0], runner, mine[0].metadata["control_url"]


def received_agent_audio_s(call: SimulatedCall) -> float:
    """Seconds of agent audio the gateway has sent to the caller's stream (heard or queued)."""
    media = [f["media"]["payload"] for f in call.received if f.get("event") == "media"]
    return sum(len(base64.b64decode(payload)) for payload in media) / 8000


def heard_agent_audio_s(call: SimulatedCall) -> float:
    """Seconds of the caller's playback that carried agent audio (not silence)."""
    heard = bytes(call.heard)
    frames = (heard[i : i + MULAW_FRAME_BYTES] for i in range(0, len(heard), MULAW_FRAME_BYTES))
    return sum(FRAME_S for frame in frames if frame != SILENCE)


async def wait_until_queued(call: SimulatedCall, seconds: float) -> None:
    """Until the whole greeting has reached the caller's stream (it plays at real time after)."""
    async with asyncio.timeout(10):
        while received_agent_audio_s(call) < seconds - 0.05:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def assert_409(status: int, body: dict, code: str) -> None:
    """The documented failure body, exactly: {"ok": false, "error": {"code", "message"}}."""
    assert status == 409, body
    assert set(body) == {"ok", "error"} and body["ok"] is False, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


async def test_conflicting_actions_while_transferring_answer_409():
    """Once a call_transfer is accepted, another transfer, end_call (and its alias) and send_dtmf
    are refused with 409 call_transferring until the call is gone; the first transfer goes on."""
    greeting_s = 3.0  # queued at the caller, so the transfer waits a while for it to play out
    async with sandbox(
        AgentBehaviour(greeting_s=greeting_s, pace=8), transfer_allow=ALLOW, end_call_drain_s=3.0
    ) as box:
        call, agent_call, runner, url = await live_call(box)
        await wait_until_queued(call, greeting_s)
        status, body = await post(url, {"action": "call_transfer", "to": TRANSFER_TO})
        assert (status, body) == (200, {"ok": True, "action": "call_transfer", "call_sid": call.call_sid})
        conflicts = [
            {"action": "call_transfer", "to": "+15557654321"},
            {"action": "transfer", "to": TRANSFER_TO},  # even to the same destination
            {"action": "end_call"},
            {"action": "hangup", "reason": "changed my mind"},
            {"action": "send_dtmf", "digits": "1"},
        ]
        for action in conflicts:
            assert_409(*(await post(url, action)), "call_transferring")
        # 403 comes before 409: a disallowed destination is refused as such, even now.
        status, body = await post(url, {"action": "call_transfer", "to": "+19005550100"})
        assert (status, body["error"]["code"]) == (403, "destination_not_allowed")
        status, state = await get(url)
        assert (status, state["state"]) == (200, "transferring")
        # All of that happened while the transfer was still waiting for the agent's speech.
        assert box.rest.requests == []
        await asyncio.sleep(0.5)
        assert_409(*(await post(url, {"action": "end_call"})), "call_transferring")  # still, mid-drain
        assert box.rest.requests == []
        await asyncio.wait_for(runner, 10)
        await asyncio.wait_for(agent_call.closed.wait(), 5)
    (redirect,) = box.rest.redirects(call.call_sid)  # the first transfer, and only it
    assert f"<Number>{TRANSFER_TO}</Number>" in redirect.form["Twiml"]
    assert box.rest.hangups() == []
    assert detect_dtmf(call.heard_pcm16()) == ""  # the refused send_dtmf played nothing
    assert call.end_reason == "redirected via REST"


async def test_the_agents_queued_speech_plays_out_before_the_transfer_redirect():
    """POST call_transfer while most of a long greeting is still queued at the caller: the
    REST redirect comes once the caller has heard its last audio, and promptly then (not a
    whole END_CALL_DRAIN_S later)."""
    greeting_s, drain_s = 2.5, 3.0
    async with sandbox(
        AgentBehaviour(greeting_s=greeting_s, pace=8), transfer_allow=ALLOW, end_call_drain_s=drain_s
    ) as box:
        call, _agent_call, runner, url = await live_call(box)
        await wait_until_queued(call, greeting_s)
        heard_at_post = heard_agent_audio_s(call)
        assert heard_at_post < greeting_s - 1.0  # over a second of speech still to play
        assert (await post(url, {"action": "call_transfer", "to": TRANSFER_TO}))[0] == 200
        await asyncio.wait_for(runner, 10)
    (redirect,) = box.rest.redirects(call.call_sid)
    assert f"<Number>{TRANSFER_TO}</Number>" in redirect.form["Twiml"]
    heard = heard_agent_audio_s(call)
    assert heard >= greeting_s - 0.1, f"the caller heard {heard:.2f} s of a {greeting_s} s greeting"
    assert call.last_audio_at is not None
    gap = redirect.at - call.last_audio_at
    assert 0 <= gap < 1.0, f"redirect {gap:+.2f} s after the caller heard the agent's last audio"
    assert box.rest.hangups() == []
