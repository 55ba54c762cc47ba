"""Transfers right in every case: where the agent asked, with headers Twilio takes, reported
truly, never after the caller has gone, with our own number as caller ID, and every REST
request bounded."""

import asyncio
import contextlib
import re
import time

import pytest

from gateway.sandbox.agent import AgentBehaviour
from gateway.sandbox.harness import sandbox
from gateway.sandbox.script import CallScript

try:
    from tests.test_telephony import (
        blind_transfer,
        dial_outcome,
        event_receiver,
        events_of,
        live_call,
        post_json,
    )
except ModuleNotFoundError:  # plain `pytest`: tests/ itself is on sys.path
    from test_telephony import (  # type: ignore[no-redef]
        blind_transfer,
        dial_outcome,
        event_receiver,
        events_of,
        live_call,
        post_json,
    )

ALLOW = ("+1555*", "sip:*@pbx.example.com")
SECRET = "whsec_transfers"


@contextlib.asynccontextmanager
async def sandbox_with_events(greeting_s: float):
    """A sandbox whose call events go to a local receiver: (box, what it received)."""
    async with (
        event_receiver() as (events_url, received),
        sandbox(
            AgentBehaviour(greeting_s=greeting_s),
            transfer_allow=ALLOW,
            call_events_url=events_url,
            call_events_secret=SECRET,
        ) as box,
    ):
        yield box, received


def dial_of(box, call) -> str:
    (redirect,) = box.rest.redirects(call.call_sid)
    return redirect.form["Twiml"]


# 1. Where the agent asked, in the Line SDK's own field names


@pytest.mark.parametrize(
    ("body", "dialled"),
    [
        ({"target_sip_uri": "sip:desk@pbx.example.com"}, "<Sip>sip:desk@pbx.example.com</Sip>"),
        (
            {"transfer_destination": {"type": "sip_uri", "value": "sip:desk@pbx.example.com"}},
            "<Sip>sip:desk@pbx.example.com</Sip>",
        ),
        (
            {"transfer_destination": {"type": "phone", "value": "+15557654321"}},
            "<Number>+15557654321</Number>",
        ),
    ],
)
async def test_a_transfer_goes_where_the_body_says_in_the_sdks_names(body, dialled):
    async with sandbox(
        AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW, transfer_to="+15550009999"
    ) as box:
        call, _agent, runner, url = await live_call(box, to="+15559870002")
        status, reply = await post_json(url, {"action": "transfer_call", **body})
        assert (status, reply["ok"]) == (200, True)
        await asyncio.wait_for(runner, 10)
        twiml = dial_of(box, call)
    assert dialled in twiml and "+15550009999" not in twiml


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"destination": "+15557654321"}, "destination"),
        ({"phone": "+15557654321"}, "phone"),
        ({"transfer_destination": {"type": "queue", "value": "billing"}}, "transfer_destination"),
    ],
)
async def test_a_destination_the_gateway_cannot_read_is_422_never_transfer_to(body, field):
    async with sandbox(
        AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW, transfer_to="+15550009999"
    ) as box:
        call, _agent, runner, url = await live_call(box)
        status, reply = await post_json(url, {"action": "transfer_call", **body})
        assert (status, reply["error"]["code"]) == (422, "invalid_destination")
        assert f"'{field}'" in reply["error"]["message"]
        await asyncio.sleep(0.3)
        assert box.rest.requests == []
        await call.hang_up()
        await runner


# 2. SIP headers as Twilio takes them


async def test_standard_sip_headers_pass_and_a_2kb_set_is_refused_before_any_rest_call():
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        call, _agent, runner, url = await live_call(box)
        too_big = {"to": "sip:desk@pbx.example.com", "headers": {"User-to-User": "a b&c" * 350}}
        status, reply = await post_json(url, {"action": "transfer", **too_big})
        assert (status, reply["error"]["code"]) == (400, "bad_field")
        # 1,000 bytes raw, but spaces and ampersands are three bytes each once URL-encoded.
        encoded_over = {"to": "sip:desk@pbx.example.com", "headers": {"X-Note": " &" * 300}}
        assert (await post_json(url, {"action": "transfer", **encoded_over}))[0] == 400
        assert box.rest.requests == []
        headers = {"User-to-User": "case=42;encoding=ascii", "P-Called-Party-ID": "<sip:q@pbx.example.com>"}
        status, _ = await post_json(
            url, {"action": "transfer", "to": "sip:desk@pbx.example.com", "headers": headers}
        )
        assert status == 200
        await asyncio.wait_for(runner, 10)
        sip = re.search(r"<Sip>([^<]+)</Sip>", dial_of(box, call)).group(1)
    assert sip.startswith("sip:desk@pbx.example.com?User-to-User=case%3D42%3Bencoding%3Dascii")
    assert "P-Called-Party-ID=%3Csip%3Aq%40pbx.example.com%3E" in sip


# 3. Outcomes reported truly


async def transfer_events_after(dial_status: str) -> list[dict]:
    """A blind transfer whose <Dial> ended with `dial_status` as the caller hung up (CallStatus
    completed): the transfer events the gateway sent."""
    async with sandbox_with_events(greeting_s=0.2) as (box, received):
        call, _, action = await blind_transfer(box)
        form = {**dial_outcome(call, dial_status), "CallStatus": "completed"}
        status, twiml = await call.post(action, form)
        assert status == 200 and "<Hangup />" in twiml
        await asyncio.sleep(0.3)
    return [e for e in events_of(received, SECRET) if e["type"].startswith("transfer.")]


async def test_a_bridged_transfer_the_caller_ends_is_completed_not_failed():
    events = await transfer_events_after("completed")  # bridged, then the caller hung up
    assert [e["type"] for e in events] == ["transfer.started", "transfer.completed"]
    assert events[1]["data"]["status"] == "completed"


async def test_a_caller_who_hangs_up_while_it_rings_is_a_failed_transfer():
    events = await transfer_events_after("no-answer")
    failed = [e for e in events if e["type"] == "transfer.failed"]
    assert [e["data"]["status"] for e in failed] == ["caller-hung-up"]


# 4. A caller who hangs up while the transfer waits for the agent's last words


@pytest.mark.parametrize("mode", ["blind", "warm"])
async def test_hanging_up_during_the_transfers_drain_is_a_hang_up(mode):
    async with sandbox_with_events(greeting_s=4.0) as (box, received):
        gateway = box.app.state.gateway
        call = await box.connect_call()
        runner = asyncio.create_task(call.run(CallScript(hangup_at=1.0, max_s=10)))
        agent_call = await box.agent.wait_for_call()
        await asyncio.sleep(0.5)  # the greeting plays on, well past the hang-up below
        body = {"action": "transfer", "to": "+15551234567", "mode": mode}
        assert (await post_json(agent_call.metadata["control_url"], body))[0] == 200
        await runner  # the caller hangs up half a second into the drain
        hung_up_at = time.monotonic()
        async with asyncio.timeout(1.0):
            while gateway.sessions or await gateway.registry.get(call.call_sid) is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        gone_after = time.monotonic() - hung_up_at
        await asyncio.sleep(1.5)
        assert box.rest.redirects(call.call_sid) == [] and box.rest.created == []
    events = events_of(received, SECRET)
    assert gone_after < 1.0
    ended = [e for e in events if e["type"] == "call.ended"]
    assert [(e["data"]["state"], e["data"]["outcome"]) for e in ended] == [("ended", "caller_hung_up")]
    assert not [e for e in events if e["type"].startswith("transfer.")]


# 5. Our number as caller ID on an outbound call


async def test_an_outbound_calls_transfer_shows_the_number_we_called_from():
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        call, _agent, runner, url = await live_call(
            box, from_="+15550001000", to="+15557778888", extra_form={"Direction": "outbound-api"}
        )
        assert (await post_json(url, {"action": "transfer", "to": "+15551234567"}))[0] == 200
        await asyncio.wait_for(runner, 10)
        twiml = dial_of(box, call)
    assert 'callerId="+15550001000"' in twiml


# 7. Every REST request bounded


async def test_a_rest_request_that_never_answers_is_bounded_by_its_timeout(monkeypatch):
    monkeypatch.setattr("gateway.carriers.twilio.rest.REQUEST_TIMEOUT_S", 0.5)
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        box.rest.stall_updates = True
        try:
            call, _agent, runner, url = await live_call(box)
            gateway = box.app.state.gateway
            assert (await post_json(url, {"action": "transfer", "to": "+15551234567"}))[0] == 200
            async with asyncio.timeout(5):
                while not box.rest.redirects(call.call_sid):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            sent = time.monotonic()
            async with asyncio.timeout(3):  # today: aiohttp's 300 s
                while gateway.sessions[call.call_sid].state != "live":  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            assert time.monotonic() - sent < 1.5  # the transfer failed at its timeout, back to live
            await call.hang_up()
            await runner
        finally:
            box.rest.release.set()


async def test_a_caller_who_hangs_up_after_a_refused_transfer_ends_the_call():
    """A transfer Twilio refused leaves the call with its agent; the caller's hang-up after
    that is a hang-up, not the stop of a redirect that never happened."""
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        box.rest.refuse_redirects = True
        gateway = box.app.state.gateway
        call, _agent, runner, url = await live_call(box)
        assert (await post_json(url, {"action": "transfer", "to": "+15551234567"}))[0] == 200
        async with asyncio.timeout(5):
            while not box.rest.redirects(call.call_sid):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # refused: back to live
        await call.hang_up()
        await runner
        async with asyncio.timeout(2):
            while gateway.sessions:  # noqa: ASYNC110
                await asyncio.sleep(0.05)


async def test_a_warm_transfer_whose_hold_twilio_refuses_leaves_the_caller_with_the_agent():
    """The human was dialled, then Twilio refused to put the caller on hold: the human's leg is
    hung up, and its last status moves nobody (the caller stays with the agent)."""
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        box.rest.refuse_redirects = True
        gateway = box.app.state.gateway
        call, _agent, runner, url = await live_call(box)
        body = {"action": "transfer", "to": "+15551234567", "mode": "warm"}
        assert (await post_json(url, body))[0] == 200
        async with asyncio.timeout(5):
            while not box.rest.redirects(call.call_sid):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        (human,) = box.rest.created
        await asyncio.sleep(0.3)
        record = await gateway.registry.get(call.call_sid)
        assert (record.state, record.transfer) == ("live", {})
        leg_status = {**call.webhook_form(), "CallSid": human.call_sid, "CallStatus": "canceled"}
        status, _ = await call.post(
            f"/twilio/warm-status?caller={call.call_sid}&to=%2B15551234567", leg_status
        )
        assert status == 204
        await asyncio.sleep(0.3)
        assert len(box.rest.redirects(call.call_sid)) == 1  # only the refused hold
        assert (await post_json(url, {"action": "send_dtmf", "digits": "1"}))[0] == 200  # still live
        await call.hang_up()
        await runner
