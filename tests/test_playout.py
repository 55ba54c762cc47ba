"""What the caller hears at the end of a call: every byte goes through the call's Playout, so
the drain before a hang-up or a transfer ends when the caller has heard the last of the agent,
whatever the agent's output format and however the agent leaves."""

import asyncio

import pytest

from gateway.sandbox.agent import AgentBehaviour
from gateway.sandbox.harness import sandbox
from gateway.sandbox.script import CallScript

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
