"""The agent leg against a sandbox agent that behaves as Cartesia's docs say the real one does:
auth, the agent's own output format, the Line SDK's transfer shapes, DTMF the Calls API takes,
audio that is never held back, and the sandbox agent's own fidelity."""

import asyncio
import base64
import time

import aiohttp
import orjson
import pytest

from gateway.audio import tone_pcm16
from gateway.sandbox.agent import GREETING_HZ, AgentBehaviour, AgentEmulator
from gateway.sandbox.harness import sandbox
from gateway.sandbox.script import CallScript

try:
    from tests.test_call import dominant_hz, frames, loud
except ModuleNotFoundError:  # plain `pytest`: tests/ itself is on sys.path
    from test_call import dominant_hz, frames, loud  # type: ignore[no-redef]

PCM_FORMATS = ("pcm_16000", "pcm_24000", "pcm_44100")
ALLOW = ("+1555*", "sip:*@pbx.example.com")


def log_lines(captured_logs, since: int) -> list[dict]:
    return [orjson.loads(line) for line in captured_logs.getvalue()[since:].splitlines()]


# 1. Auth


async def test_the_api_key_goes_in_both_headers_cartesia_takes():
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        call = await box.connect_call()
        await call.run(CallScript(hangup_at=0.5))
        headers = (await box.agent.wait_for_call()).headers
    key = box.settings.cartesia_api_key
    assert headers["X-API-Key"] == key
    assert headers["Authorization"] == f"Bearer {key}"


async def test_a_refused_key_is_one_clear_line_and_the_caller_gets_the_fallback(captured_logs):
    mark = captured_logs.tell()
    async with sandbox(AgentBehaviour(greeting_s=0.2), cartesia_api_key="sk_wrong_key_1234") as box:
        call = await box.connect_call()
        await call.run(CallScript(max_s=3))
    assert len(call.said) == 1  # AGENT_FALLBACK's message, at once: a refused key is not retried
    assert box.agent.calls == []  # refused at the handshake (401)
    lines = [line for line in log_lines(captured_logs, mark) if line.get("call_sid") == call.call_sid]
    refused = [line for line in lines if "refused the API key" in str(line.get("error", ""))]
    assert len(refused) == 1, lines
    assert refused[0]["level"] == "error"
    assert "Cartesia refused the API key for agent agent_sandbox (HTTP 401)" in refused[0]["error"]
    assert "sk_wrong_key_1234" not in captured_logs.getvalue()[mark:]


# 3. The agent's output format


async def test_the_acks_output_format_wins_over_the_setting(captured_logs):
    mark = captured_logs.tell()
    behaviour = AgentBehaviour(output_format="pcm_24000", greeting_s=1.0, ack_reports_output_format=True)
    async with sandbox(behaviour, cartesia_output_format="mulaw_8000") as box:
        call = await box.connect_call()
        await call.run(CallScript(hangup_at=1.5))
    heard = [f for f in frames(bytes(call.heard)) if loud(f)]
    assert len(heard) > 30
    assert abs(dominant_hz(b"".join(heard)) - GREETING_HZ) < 15  # a clean tone, not noise
    lines = log_lines(captured_logs, mark)
    differs = [line for line in lines if line.get("event") == "agent_output_format_differs"]
    assert [(d["agent_format"], d["expected"]) for d in differs] == [("pcm_24000", "mulaw_8000")]
    assert not [line for line in lines if line.get("event") == "agent_output_format_mismatch"]


@pytest.mark.parametrize(
    ("agent_format", "configured", "heard"),
    [("pcm_16000", "mulaw_8000", "16-bit PCM"), ("mulaw_8000", "pcm_16000", "mu-law 8 kHz")],
)
async def test_audio_in_another_encoding_than_configured_is_one_clear_error(
    captured_logs, agent_format, configured, heard
):
    mark = captured_logs.tell()
    behaviour = AgentBehaviour(output_format=agent_format, greeting_s=1.0)
    async with sandbox(behaviour, cartesia_output_format=configured) as box:
        call = await box.connect_call()
        await call.run(CallScript(hangup_at=1.2))
    errors = [
        line
        for line in log_lines(captured_logs, mark)
        if line.get("event") == "agent_output_format_mismatch" and line.get("call_sid") == call.call_sid
    ]
    assert [(e["level"], e["expected"], e["heard"]) for e in errors] == [("error", configured, heard)]
    assert configured in errors[0]["hint"] and "CARTESIA_OUTPUT_FORMAT" in errors[0]["hint"]


@pytest.mark.parametrize("output_format", ["mulaw_8000", *PCM_FORMATS])
async def test_no_format_alarm_when_the_formats_agree(captured_logs, output_format):
    mark = captured_logs.tell()
    async with sandbox(AgentBehaviour(output_format=output_format, greeting_s=1.0)) as box:
        call = await box.connect_call()
        await call.run(CallScript(hangup_at=1.2))
    events = {line.get("event") for line in log_lines(captured_logs, mark)}
    assert not events & {"agent_output_format_mismatch", "agent_output_format_differs"}


# 2. No agent audio held back


@pytest.mark.parametrize("output_format", PCM_FORMATS)
async def test_an_utterance_reaches_the_caller_whole_and_at_once(output_format):
    """A one-second utterance: first audio out within 10 ms of the agent's first frame, all of it
    (7,950-8,050 bytes at 8 kHz) within 30 ms of its last frame, and nothing after."""
    behaviour = AgentBehaviour(output_format=output_format, greeting_s=1.0, send_custom=False)
    async with sandbox(behaviour) as box:
        call = await box.connect_call()
        runner = asyncio.create_task(call.run(CallScript(max_s=10)))
        agent_call = await box.agent.wait_for_call()
        async with asyncio.timeout(5):
            while sum(n for _, n in agent_call.audio_out) < 1.0 * _bytes_per_s(output_format):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # anything held back would have had time to come
        await call.hang_up()
        await runner
    first_sent, last_sent = agent_call.audio_out[0][0], agent_call.audio_out[-1][0]
    arrivals = call.media_arrivals
    assert arrivals[0][0] - first_sent < 0.010
    within = sum(n for at, n in arrivals if at <= last_sent + 0.030)
    assert 7950 <= within <= 8050, within
    assert sum(n for _, n in arrivals) == within  # no stale tail later


def _bytes_per_s(output_format: str) -> int:
    rate = int(output_format.split("_")[1])
    return rate if output_format.startswith("mulaw") else 2 * rate


# 4. The Line SDK's transfer shapes and the DTMF the Calls API takes


@pytest.mark.parametrize(
    ("fields", "dialled"),
    [
        ({"target_sip_uri": "sip:desk@pbx.example.com"}, "<Sip>sip:desk@pbx.example.com</Sip>"),
        (
            {"transfer_destination": {"type": "sip_uri", "value": "sip:desk@pbx.example.com"}},
            "<Sip>sip:desk@pbx.example.com</Sip>",
        ),
        (
            {"transfer": {"transfer_destination": {"type": "phone", "value": "+15557654321"}}},
            "<Number>+15557654321</Number>",
        ),
        ({"target_phone_number": "+15557654321"}, "<Number>+15557654321</Number>"),
    ],
)
async def test_an_agents_transfer_goes_where_the_sdk_said(fields, dialled):
    behaviour = AgentBehaviour(greeting_s=0.2, transfer_fields=fields)
    async with sandbox(behaviour, transfer_allow=ALLOW, transfer_to="+15550009999") as box:
        call = await box.connect_call(to="+15559870002")
        await call.run(CallScript(dtmf=[(0.4, "0")], max_s=6))
        (redirect,) = box.rest.redirects(call.call_sid)
    assert dialled in redirect.form["Twiml"]
    assert "+15550009999" not in redirect.form["Twiml"]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"transfer_destination": {"type": "queue", "value": "billing"}}, ["transfer_destination"]),
        ({"transfer_destination": "+15557654321"}, ["transfer_destination"]),
        ({"target_sip_uri": 42}, ["target_sip_uri"]),
        ({"transfer": {"target_phone_number": ["+15557654321"]}}, ["target_phone_number"]),
    ],
)
async def test_an_unreadable_destination_is_refused_never_sent_to_transfer_to(captured_logs, fields, named):
    mark = captured_logs.tell()
    behaviour = AgentBehaviour(greeting_s=0.2, transfer_fields=fields)
    async with sandbox(behaviour, transfer_allow=ALLOW, transfer_to="+15550009999") as box:
        call = await box.connect_call(to="+15559870002")
        await call.run(CallScript(dtmf=[(0.4, "0")], hangup_at=1.5))
        assert box.rest.redirects(call.call_sid) == []
    refused = [
        line for line in log_lines(captured_logs, mark) if line.get("event") == "agent_transfer_refused"
    ]
    assert len(refused) == 1 and refused[0]["level"] == "error"
    assert refused[0]["fields"] == named


async def test_caller_dtmf_the_calls_api_does_not_document_is_not_forwarded():
    async with sandbox(AgentBehaviour(greeting_s=0.2, dtmf_replies={})) as box:
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(0.3, "A"), (0.4, "1"), (0.5, "D"), (0.6, "#")], max_s=5))
        agent_call = await box.agent.wait_for_call()
    assert agent_call.dtmf_in == ["1", "#"]


# 5. The sandbox agent behaves as the real one does


async def _open(url: str, headers: dict[str, str], **start_fields) -> tuple[aiohttp.ClientSession, object]:
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(url + "/agents/stream/agent_x", headers=headers, autoping=False)
    await ws.send_str(orjson.dumps({"event": "start", "stream_id": "s1", **start_fields}).decode())
    return http, ws


async def test_sandbox_agent_checks_the_key_echoes_the_ack_and_closes_idle_sockets():
    agent = AgentEmulator(
        AgentBehaviour(greeting_s=0.1, send_custom=False, idle_timeout_s=0.6), api_key="k_1"
    )
    async with agent.running():
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(agent.url + "/agents/stream/agent_x")
            assert refused.value.status == 401
        config = {"input_format": "mulaw_8000"}
        http, ws = await _open(agent.url, {"Authorization": "Bearer k_1"}, config=config, agent={"a": 1})
        try:
            ack = orjson.loads((await ws.receive()).data)
            assert ack == {"event": "ack", "stream_id": "s1", "config": config, "agent": {"a": 1}}
            opened = time.monotonic()
            for _ in range(5):  # pings count as client messages
                await asyncio.sleep(0.25)
                await ws.ping()
            assert not ws.closed and time.monotonic() - opened > 1.0
            async with asyncio.timeout(3):
                while (msg := await ws.receive()).type not in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                ):
                    pass
            assert (ws.close_code, msg.extra) == (1000, "connection idle timeout")
            assert time.monotonic() - opened > 1.5
        finally:
            await ws.close()
            await http.close()


async def test_sandbox_agent_hears_pcm_input_in_the_starts_format():
    """Loud PCM in a `pcm_16000` start is speech to it (a barge-in), as it would be to Cartesia."""
    agent = AgentEmulator(AgentBehaviour(greeting_s=3.0, send_custom=False), api_key="k_2")
    loud_pcm = tone_pcm16(300, 0.02, 16000, amplitude=0.5)  # 20 ms: 640 bytes
    async with agent.running():
        http, ws = await _open(agent.url, {"X-API-Key": "k_2"}, config={"input_format": "pcm_16000"})
        try:
            assert orjson.loads((await ws.receive()).data)["event"] == "ack"
            payload = base64.b64encode(loud_pcm).decode()
            frame = {"event": "media_input", "stream_id": "s1", "media": {"payload": payload}}
            events = []
            for _ in range(6):
                await ws.send_str(orjson.dumps(frame).decode())
                await asyncio.sleep(0.02)
            async with asyncio.timeout(3):
                while "clear" not in events:
                    events.append(orjson.loads((await ws.receive()).data)["event"])
        finally:
            await ws.close()
            await http.close()
    assert agent.calls[0].audio_in[: 2 * len(loud_pcm)] == loud_pcm * 2  # kept as it came
