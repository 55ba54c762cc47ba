"""What the caller hears at the end of a call: every byte goes through the call's Playout, so
the drain before a hang-up or a transfer ends when the caller has heard the last of the agent,
whatever the agent's output format and however the agent leaves."""

import asyncio

import pytest

from gateway.sandbox.agent import GOODBYE_HZ, AgentBehaviour
from gateway.sandbox.harness import sandbox
from gateway.sandbox.script import CallScript

try:
    from tests.test_call import dominant_hz, frames, loud
except ModuleNotFoundError:  # plain `pytest`: tests/ itself is on sys.path
    from test_call import dominant_hz, frames, loud  # type: ignore[no-redef]

ALLOW = ("+1555*",)
END_CALL_TOOL, TRANSFER_TOOL = "7", "9"


@pytest.mark.parametrize(
    ("output_format", "digit"),
    [
        ("pcm_16000", END_CALL_TOOL),
        ("pcm_44100", END_CALL_TOOL),
        ("pcm_16000", TRANSFER_TOOL),
        ("mulaw_8000", END_CALL_TOOL),
    ],
)
async def test_agent_closing_during_the_drain_does_not_hold_up_the_hang_up(output_format, digit):
    """The agent says goodbye, POSTs end_call (or a transfer), and closes its socket 0.3 s later,
    while the goodbye is still playing. With a PCM agent the resampler's tail goes out after
    the drain's mark: it must be marked too, or the drain waits END_CALL_DRAIN_S of dead air."""
    behaviour = AgentBehaviour(
        output_format=output_format, greeting_s=0.2, goodbye_s=0.8, close_after_tool_s=0.3
    )
    async with sandbox(behaviour, transfer_allow=ALLOW, end_call_drain_s=5.0) as box:
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(0.6, digit)], max_s=12))
        agent_call = box.agent.calls[0]
        await asyncio.wait_for(agent_call.closed.wait(), 5)
        ((status, _body),) = agent_call.control_replies
        assert status == 200
        requests = (
            box.rest.hangups(call.call_sid) if digit == END_CALL_TOOL else box.rest.redirects(call.call_sid)
        )
        assert len(requests) == 1
        # The agent closed its socket while the goodbye was still playing, before the REST call.
        assert agent_call.hung_up_at is not None and agent_call.hung_up_at < requests[0].at
        # The goodbye played out (0.8 s of it, at the caller's real-time pace) ...
        assert call.last_audio_at is not None
        waited = requests[0].at - call.last_audio_at
        # ... and the hang-up or transfer came right after its last frame was heard.
        assert 0 <= waited < 0.5, f"REST request {waited:.2f} s after the caller heard the last audio"


@pytest.mark.parametrize("digit", [END_CALL_TOOL, TRANSFER_TOOL])
async def test_a_goodbye_that_arrives_after_the_tools_post_is_heard_whole(digit):
    """A Line agent's tool POSTs at once, while the goodbye it said just before is still being
    synthesised: the gateway gives the agent a quiet moment before it drains and acts."""
    behaviour = AgentBehaviour(greeting_s=0.2, goodbye_s=0.6, goodbye_after_tool_s=0.3)
    async with sandbox(behaviour, transfer_allow=ALLOW) as box:
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(0.5, digit)], max_s=8))
        agent_call = await box.agent.wait_for_call()
        await asyncio.wait_for(agent_call.closed.wait(), 5)
        rest = box.rest
        (request,) = rest.hangups(call.call_sid) if digit == END_CALL_TOOL else rest.redirects(call.call_sid)
    goodbye = [f for f in frames(bytes(call.heard)) if loud(f) and abs(dominant_hz(f) - GOODBYE_HZ) < 40]
    assert len(goodbye) >= 28  # 0.6 s is 30 frames of 20 ms
    assert request.at >= call.last_audio_at - 0.05  # after it had all been heard
