"""The control API on one instance: every action, alias and error, and blind transfers."""

import asyncio

import aiohttp

from gateway.dtmf import detect_dtmf
from gateway.sandbox.agent import AgentBehaviour
from gateway.sandbox.harness import sandbox
from gateway.sandbox.script import CallScript

ALLOW = ("+1555*", "sip:*@pbx.example.com")


async def post(url: str, body=None, *, raw: bytes | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        kwargs = (
            {"data": raw, "headers": {"Content-Type": "application/json"}}
            if raw is not None
            else {"json": body}
        )
        async with http.post(url, **kwargs) as resp:
            return resp.status, await resp.json()


async def get(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json()


async def live_call(box, **kwargs):
    """A connected call streaming in the background; returns (call, agent_call, runner, control_url)."""
    call = await box.connect_call(**kwargs)
    runner = asyncio.create_task(call.run(CallScript(max_s=20)))
    async with asyncio.timeout(10):
        while not (mine := [a for a in box.agent.calls if a.metadata.get("call_sid") == call.call_sid]):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    agent_call = mine[0]
    return call, agent_call, runner, agent_call.metadata["control_url"]


def assert_error(status: int, body: dict, expected_status: int, code: str) -> None:
    assert (status, body["ok"], body["error"]["code"]) == (expected_status, False, code), body
    assert body["error"]["message"]


async def test_agent_metadata_carries_the_control_url_under_both_keys():
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        call, agent_call, runner, url = await live_call(box, from_="+15551110000", to="+15552220000")
        meta = agent_call.metadata
        assert meta["vox_session_control_url"] == url
        assert url.startswith(box.url + "/control/") and len(url.rsplit("/", 1)[1]) >= 43
        assert (meta["from"], meta["to"], meta["call_sid"], meta["direction"]) == (
            "+15551110000",
            "+15552220000",
            call.call_sid,
            "inbound",
        )
        assert agent_call.headers["X-API-Key"] == box.settings.cartesia_api_key
        assert agent_call.headers["Cartesia-Version"] == "2025-04-16"
        status, state = await get(url)
        assert status == 200
        assert {k: state[k] for k in ("call_sid", "state", "from", "to", "agent_id", "direction")} == {
            "call_sid": call.call_sid,
            "state": "live",
            "from": "+15551110000",
            "to": "+15552220000",
            "agent_id": "agent_sandbox",
            "direction": "inbound",
        }
        assert isinstance(state["started_at"], float)
        await call.hang_up()
        await runner


async def test_voximplant_end_call_tool_works_unchanged():
    """An agent tool written for the hosted connector POSTs {"action":"end_call"} as is."""
    async with sandbox(AgentBehaviour(greeting_s=0.2, goodbye_s=0.6, pace=8)) as box:
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(0.4, "7")], max_s=10))
        agent_call = box.agent.calls[0]
        await asyncio.wait_for(agent_call.closed.wait(), 5)
        (status, body), *_ = agent_call.control_replies
        assert status == 200 and body["ok"] is True
        assert body == {"ok": True, "action": "end_call", "call_sid": call.call_sid}
        hangups = box.rest.hangups(call.call_sid)
        assert len(hangups) == 1
        assert hangups[0].at >= call.last_audio_at - 0.05  # the goodbye played first
        assert agent_call.close_code == 1000
        # Once the call has ended its token answers 404 like any unknown token.
        url = agent_call.metadata["control_url"]
        assert_error(*(await post(url, {"action": "end_call"})), 404, "not_found")
        assert_error(*(await get(url)), 404, "not_found")


async def test_end_call_alias_repeats_are_idempotent_and_conflicts_are_409():
    async with sandbox(AgentBehaviour(greeting_s=0.2), end_call_drain_s=1.0, transfer_allow=ALLOW) as box:
        call, _agent_call, runner, url = await live_call(box)
        assert (await post(url, {"action": "hangup", "reason": "done"}))[0] == 200
        assert (await post(url, {"action": "end_call"}))[0] == 200
        assert_error(*(await post(url, {"action": "transfer", "to": "+15551234567"})), 409, "call_ending")
        assert_error(*(await post(url, {"action": "send_dtmf", "digits": "1"})), 409, "call_ending")
        await runner
        assert len(box.rest.hangups(call.call_sid)) == 1


async def test_send_dtmf_plays_tones_to_the_caller():
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        call, _agent_call, runner, url = await live_call(box)
        status, body = await post(url, {"action": "send_dtmf", "digits": "90#"})
        assert (status, body) == (200, {"ok": True, "action": "send_dtmf", "call_sid": call.call_sid})
        await asyncio.sleep(1.0)
        await call.hang_up()
        await runner
    assert detect_dtmf(call.heard_pcm16()) == "90#"


BAD_REQUESTS = [
    (b"{not json", 400, "malformed_json"),
    (b"[1, 2]", 400, "malformed_json"),
    (b"", 400, "malformed_json"),
    (b'{"action": "explode"}', 400, "unknown_action"),
    (b'{"reason": "no action"}', 400, "unknown_action"),
    (b'{"action": "send_dtmf"}', 400, "bad_field"),
    (b'{"action": "send_dtmf", "digits": "12x"}', 400, "bad_field"),
    (b'{"action": "send_dtmf", "digits": ""}', 400, "bad_field"),
    (b'{"action": "call_transfer", "to": 15551234567}', 400, "bad_field"),
    (
        b'{"action": "call_transfer", "to": "sip:a@pbx.example.com", "headers": {"Foo": "1"}}',
        400,
        "bad_field",
    ),
    (b'{"action": "call_transfer", "to": "+15551234567", "mode": "sideways"}', 400, "bad_field"),
    (b'{"action": "call_transfer", "to": "+1 555 12"}', 422, "invalid_destination"),
    (b'{"action": "call_transfer", "to": "tel:5551234567"}', 422, "invalid_destination"),
    (
        b'{"action": "call_transfer", "to": "+15551234567", "headers": {"X-A": "1"}}',
        422,
        "invalid_destination",
    ),
    (b'{"action": "call_transfer", "to": "+15551234567", "caller_id": "me"}', 422, "invalid_caller_id"),
    (b'{"action": "call_transfer", "to": "+19005550100"}', 403, "destination_not_allowed"),
    (b'{"action": "call_transfer", "to": "sip:x@evil.example.com"}', 403, "destination_not_allowed"),
    (b'{"action": "call_transfer"}', 400, "bad_field"),  # no `to` and no TRANSFER_TO
]


async def test_every_control_error_has_its_status_and_json_body():
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        call, _agent_call, runner, url = await live_call(box)
        sent = 0
        for raw, status, code in BAD_REQUESTS:
            assert_error(*(await post(url, raw=raw)), status, code)
            sent += 1
        message = (await post(url, {"action": "explode"}))[1]["error"]["message"]
        sent += 1
        for known in ("end_call", "hangup", "call_transfer", "transfer_call", "transfer", "send_dtmf"):
            assert known in message
        oversized = b'{"action":"end_call","pad":"' + b"x" * 17000 + b'"}'
        assert_error(*(await post(url, raw=oversized)), 413, "body_too_large")
        sent += 1
        unknown = box.url + "/control/" + "A" * 43
        assert_error(*(await post(unknown, {"action": "end_call"})), 404, "not_found")
        assert_error(*(await get(box.url + "/control/nope")), 404, "not_found")
        assert sent <= 20
        while sent < 20:  # twenty requests in ten seconds are fine ...
            assert (await get(url))[0] == 200
            sent += 1
        assert_error(*(await get(url)), 429, "rate_limited")  # ... the twenty-first is not
        # The call itself is untouched by all of that.
        assert box.rest.requests == []
        await call.hang_up()
        await runner


async def test_errors_come_in_the_documented_order():
    """404, 429, 413, 400, 422, 403, 409: the first that applies wins."""
    huge_bad = b"{" + b"x" * 17000
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        assert_error(*(await post(box.url + "/control/" + "B" * 43, raw=huge_bad)), 404, "not_found")
        call, _, runner, url = await live_call(box)
        assert_error(*(await post(url, raw=huge_bad)), 413, "body_too_large")  # 413 before 400
        mixed = {"action": "call_transfer", "to": "+1900", "headers": "nope"}
        assert_error(*(await post(url, mixed)), 400, "bad_field")  # 400 before 422
        assert_error(
            *(await post(url, {"action": "call_transfer", "to": "+1900"})), 422, "invalid_destination"
        )
        assert (await post(url, {"action": "end_call"}))[0] == 200
        disallowed = {"action": "call_transfer", "to": "+19005550100"}
        assert_error(*(await post(url, disallowed)), 403, "destination_not_allowed")  # 403 before 409
        await runner
        for _ in range(25):
            status, body = await post(url, raw=huge_bad)
        assert_error(status, body, 404, "not_found")  # the call ended: 404 beats everything
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        call, _, runner, url = await live_call(box)
        for _ in range(20):
            await get(url)
        assert_error(*(await post(url, raw=huge_bad)), 429, "rate_limited")  # 429 before 413
        await call.hang_up()
        await runner


async def test_blind_transfer_to_a_number_dials_it_and_never_hangs_up():
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        call, agent_call, runner, url = await live_call(box, to="+15559870002")
        gateway = box.app.state.gateway
        states_at_update = []
        forward = box.rest.on_update

        async def record_state(call_sid, form):
            states_at_update.append((await gateway.registry.get(call_sid)).state)
            await forward(call_sid, form)

        box.rest.on_update = record_state
        status, body = await post(
            url, {"action": "call_transfer", "to": "+1 (555) 123-4567", "summary": "billing"}
        )
        assert (status, body) == (200, {"ok": True, "action": "call_transfer", "call_sid": call.call_sid})
        await asyncio.wait_for(runner, 10)
        await asyncio.wait_for(agent_call.closed.wait(), 5)
        (redirect,) = box.rest.redirects(call.call_sid)
        twiml = redirect.form["Twiml"]
        assert "<Number>+15551234567</Number>" in twiml
        assert 'callerId="+15559870002"' in twiml and 'answerOnBridge="true"' in twiml
        assert call.end_reason == "redirected via REST"  # the stream's stop came from the update
        assert states_at_update == ["transferring"]  # marked before the REST update
        await asyncio.sleep(0.3)
        assert box.rest.hangups() == []
        assert agent_call.close_code == 1000
        assert not gateway.sessions
        assert (await gateway.registry.get(call.call_sid)).state == "transferred"


async def test_sip_transfer_carries_headers_and_the_chosen_caller_id():
    async with sandbox(
        AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW, transfer_caller_id="+15550009999"
    ) as box:
        call, _, runner, url = await live_call(box)
        action = {
            "action": "transfer_call",
            "sip_uri": "sip:desk@pbx.example.com",
            "headers": {"X-Case": "42", "X-Lang": "en"},
        }
        assert (await post(url, action))[0] == 200
        await asyncio.wait_for(runner, 10)
        (redirect,) = box.rest.redirects(call.call_sid)
        twiml = redirect.form["Twiml"]
        assert "<Sip>sip:desk@pbx.example.com?X-Case=42&amp;X-Lang=en</Sip>" in twiml
        assert 'callerId="+15550009999"' in twiml
        assert box.rest.hangups() == []


async def test_transfer_from_a_sip_call_to_a_number_needs_a_caller_id():
    sip_form = {"SipDomain": "gw.sip.twilio.com", "SipHeader_X-Account": "77"}
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        call, agent_call, runner, url = await live_call(
            box, from_="sip:alice@example.com", to="sip:support@gw.sip.twilio.com", extra_form=sip_form
        )
        assert agent_call.metadata["sip_headers"] == {"X-Account": "77"}
        status, body = await post(url, {"action": "call_transfer", "to": "+15551234567"})
        assert_error(status, body, 422, "caller_id_required")
        assert "caller_id" in body["error"]["message"]
        ok = {"action": "call_transfer", "to": "+15551234567", "caller_id": "+15550001234"}
        assert (await post(url, ok))[0] == 200
        await asyncio.wait_for(runner, 10)
        assert 'callerId="+15550001234"' in box.rest.redirects(call.call_sid)[0].form["Twiml"]


async def test_transfer_to_the_default_destination_and_the_agents_own_transfer_event():
    behaviour = AgentBehaviour(greeting_s=0.2, transfer_target="+15557654321")
    async with sandbox(behaviour, transfer_to="+15557654321") as box:
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(0.4, "0")], max_s=10))
        (redirect,) = box.rest.redirects(call.call_sid)
        assert "<Number>+15557654321</Number>" in redirect.form["Twiml"]
        assert box.rest.hangups() == []
        # And through the control URL with no destination at all: TRANSFER_TO.
        call, _, runner, url = await live_call(box)
        assert (await post(url, {"action": "call_transfer", "summary": "vip"}))[0] == 200
        await asyncio.wait_for(runner, 10)
        assert "<Number>+15557654321</Number>" in box.rest.redirects(call.call_sid)[0].form["Twiml"]


async def test_agent_transfer_to_a_disallowed_number_is_refused_and_the_call_goes_on():
    behaviour = AgentBehaviour(greeting_s=0.2, transfer_target="+19005550199")
    async with sandbox(behaviour, transfer_allow=ALLOW) as box:
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(0.4, "0")], hangup_at=1.5))
        assert box.rest.redirects() == []
        assert call.end_reason == "caller hung up"


async def test_no_token_or_control_url_reaches_a_log_line(captured_logs):
    """A whole call, error paths included, with every log line captured at DEBUG."""
    async with sandbox(AgentBehaviour(greeting_s=0.2, goodbye_s=0.2, pace=8), transfer_allow=ALLOW) as box:
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(0.3, "*"), (0.6, "7")], max_s=10))
        session_ref = call.parameters["session"]
        url = box.agent.calls[0].metadata["control_url"]
        token = url.rsplit("/", 1)[1]
        await post(url, {"action": "call_transfer", "to": "+19005550100"})  # 404 by now
        await post(url, raw=b"{broken")
        # A live call's failures too: refused transfer, bad frames, a forged socket.
        second, _, runner, url2 = await live_call(box)
        token2 = url2.rsplit("/", 1)[1]
        await post(url2, {"action": "call_transfer", "to": "+19005550100"})
        await second.send("not json")
        await post(url2, {"action": "end_call"})
        await runner
        logs = captured_logs.getvalue()
    assert call.call_sid in logs and "control_accepted" in logs  # the calls were logged ...
    for secret in (token, token2, session_ref, second.parameters["session"]):
        assert secret not in logs  # ... but never a token or session reference,
        assert "/control/" + secret[:8] not in logs  # nor any part of a control URL,
    assert box.settings.twilio_auth_token not in logs  # nor the Twilio auth token,
    assert box.settings.cartesia_api_key not in logs  # nor the Cartesia API key.


def test_transfer_allow_list_matches_the_host_twilio_dials():
    from gateway.control.policy import TransferPolicy
    from gateway.destinations import is_sip_uri

    policy = TransferPolicy(default_to="+15550001111", allow=("sip:*@pbx.example.com", "+1555*"))
    assert policy.allows("+15550001111")
    assert policy.allows("+15551234567")
    assert not policy.allows("+19005550100")
    assert policy.allows("sip:desk@pbx.example.com")
    assert policy.allows("sip:desk@PBX.example.com:5061;transport=tls")
    assert not policy.allows("sip:desk@pbx.example.com.evil.example")
    assert not policy.allows("sip:evil@attacker.example;x=@pbx.example.com")
    assert not policy.allows("sip:evil@attacker.example?x=@pbx.example.com")
    # ... and the control API refuses such a URI outright (422, before the allow-list's 403).
    assert not is_sip_uri("sip:evil@attacker.example;x=@pbx.example.com")


async def test_a_refused_transfer_keeps_the_call_with_its_agent():
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        box.rest.refuse_redirects = True
        call, agent_call, runner, url = await live_call(box)
        assert (await post(url, {"action": "transfer", "to": "+15551234567"}))[0] == 200
        await asyncio.sleep(1.5)  # the agent's quiet moment (AGENT_QUIET_S), then the refusal
        status, state = await get(url)
        assert (status, state["state"]) == (200, "live")
        assert not agent_call.closed.is_set()
        assert (await post(url, {"action": "send_dtmf", "digits": "1"}))[0] == 200
        await call.hang_up()
        await runner


async def test_a_refused_transfer_after_the_agent_left_hangs_up_instead_of_silence():
    behaviour = AgentBehaviour(greeting_s=0.2, transfer_target="+15551234567", close_after_transfer=True)
    async with sandbox(behaviour, transfer_allow=ALLOW) as box:
        box.rest.refuse_redirects = True
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(0.4, "0")], max_s=10))
        assert len(box.rest.hangups(call.call_sid)) == 1
        assert call.end_reason == "hung up via REST"
