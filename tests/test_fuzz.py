"""Fuzzing: every parser the outside world reaches takes anything and refuses what is wrong with
its one documented error (ProtocolError, ActionRefused, AudioFormatError), never another
exception; then the same junk on a running gateway's media sockets and control URLs, which
must answer no 5xx, log no exception, and leave a call beside them hearing its agent.

Examples are fixed (derandomized) and few enough that the file runs in well under a minute."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import time

import aiohttp
import orjson
import pytest
from fuzz_strategies import (
    AGENT_FRAMES,
    B64,
    CONTROL_SHAPES,
    FUZZ,
    SID,
    TEXT,
    TWILIO_FRAMES,
    draw_each,
)
from hypothesis import given
from hypothesis import strategies as st
from streaming import (
    control_url_of,
    flowing_call,
    longest_gap,
    server_gc,  # noqa: F401 (a fixture, used by name)
)

from gateway import audio, dtmf
from gateway.agents import calls_api
from gateway.call.actions import ActionRefused, EndCall, SendDtmf, TransferPlan
from gateway.carriers.twilio import codec
from gateway.control import parse
from gateway.control.policy import TransferPolicy
from gateway.destinations import is_e164, is_sip_uri
from gateway.events import CarrierEvent, ProtocolError, StreamStarted
from gateway.registry.base import CallRecord
from gateway.sandbox.agent import AgentBehaviour
from gateway.sandbox.harness import sandbox
from gateway.sandbox.script import CallScript

# 1. The Twilio codec


@pytest.mark.parametrize("shape", sorted(TWILIO_FRAMES))
@FUZZ
@given(data=st.data())
def test_twilio_parse_frame_raises_only_protocol_error(shape: str, data: st.DataObject) -> None:
    frame = data.draw(TWILIO_FRAMES[shape])
    try:
        event = codec.parse_frame(frame)
    except ProtocolError:
        return
    assert event is None or isinstance(event, CarrierEvent)
    if isinstance(event, StreamStarted):
        assert event.stream_sid.isalnum() and event.call_sid


@FUZZ
@given(SID, B64, SID)
def test_twilio_frame_builders_make_the_json_twilio_reads(stream_sid: str, payload: str, serial: str) -> None:
    assert orjson.loads(codec.media_frame(stream_sid, payload)) == {
        "event": "media",
        "streamSid": stream_sid,
        "media": {"payload": payload},
    }
    mark = orjson.loads(codec.mark_frame(stream_sid, f"m{serial}"))
    assert mark == {"event": "mark", "streamSid": stream_sid, "mark": {"name": f"m{serial}"}}
    assert codec.parse_frame(orjson.dumps(mark)).name == f"m{serial}"  # Twilio's echo
    assert orjson.loads(codec.clear_frame(stream_sid)) == {"event": "clear", "streamSid": stream_sid}


def test_an_oversized_twilio_frame_is_a_protocol_error() -> None:
    frame = as_media_frame("A" * codec.MAX_FRAME_BYTES)
    with pytest.raises(ProtocolError, match="exceeds"):
        codec.parse_frame(frame)


def as_media_frame(payload: str) -> str:
    return orjson.dumps({"event": "media", "media": {"payload": payload}}).decode()


# 2. The Calls API codec


@pytest.mark.parametrize("shape", sorted(AGENT_FRAMES))
@FUZZ
@given(data=st.data())
def test_calls_api_parse_frame_raises_only_protocol_error(shape: str, data: st.DataObject) -> None:
    frame = data.draw(AGENT_FRAMES[shape])
    with contextlib.suppress(ProtocolError):
        calls_api.parse_frame(frame)


@FUZZ
@given(st.one_of(TEXT, B64.map(lambda b: b + "="), st.binary(max_size=64)), st.binary(max_size=64))
def test_decode_payload_raises_only_protocol_error(junk: str | bytes, audio: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        calls_api.decode_payload(junk)
    assert calls_api.decode_payload(base64.b64encode(audio).decode()) == audio


@FUZZ
@given(SID, B64, st.dictionaries(TEXT, TEXT, max_size=3), st.text("0123456789*#", min_size=1, max_size=64))
def test_calls_api_builders_make_json(stream_id: str, payload: str, metadata: dict, digits: str) -> None:
    start = orjson.loads(
        calls_api.start_frame(stream_id=stream_id, input_format="mulaw_8000", metadata=metadata)
    )
    assert (start["stream_id"], start["metadata"]) == (stream_id, metadata)
    media = orjson.loads(calls_api.media_input_frame(stream_id, payload))
    assert media == {"event": "media_input", "stream_id": stream_id, "media": {"payload": payload}}
    assert calls_api.parse_frame(calls_api.dtmf_frame(stream_id, digits)).digit == digits
    assert orjson.loads(calls_api.custom_frame(stream_id, metadata))["metadata"] == metadata


# 3. The audio codecs


@FUZZ
@given(st.binary(max_size=801))
def test_mulaw_and_levels_take_any_bytes(data: bytes) -> None:
    assert len(audio.ulaw_to_pcm16(data)) == 2 * len(data)
    for pure in (audio.pcm16_to_ulaw, audio.rms_dbfs):
        try:
            out = pure(data)
        except audio.AudioFormatError:
            assert len(data) % 2
            continue
        assert len(data) % 2 == 0
        if pure is audio.rms_dbfs:
            assert out <= 0.0
        else:
            assert len(out) == len(data) // 2


@FUZZ
@given(st.sampled_from(sorted(audio.OUTPUT_FORMATS)) | TEXT, st.lists(st.binary(max_size=401), max_size=6))
def test_the_downlink_converter_takes_any_chunks(name: str, chunks: list[bytes]) -> None:
    try:
        converter = audio.DownlinkConverter(name)
    except audio.AudioFormatError:
        assert name not in audio.OUTPUT_FORMATS
        return
    out = b"".join(converter.convert(chunk) for chunk in chunks)
    encoding, rate = audio.OUTPUT_FORMATS[name]
    total = sum(map(len, chunks))
    samples = total if encoding == "mulaw" else total // 2
    assert len(out) == math.ceil(samples * 8000 / rate)  # what convert() documents


NUMBERS = st.one_of(
    st.floats(min_value=-1e4, max_value=1e5), st.sampled_from([math.nan, math.inf, -math.inf])
)
RATES = st.one_of(st.integers(min_value=-8, max_value=48_000), st.sampled_from([8000.0, 0, True]))


@FUZZ
@given(NUMBERS, NUMBERS.map(lambda s: s / 1e4 if math.isfinite(s) else s), RATES, NUMBERS)
def test_tones_raise_only_audio_format_error(
    freq: float, seconds: float, rate: int, amplitude: float
) -> None:
    try:
        pcm = audio.tone_pcm16(freq, seconds, rate, amplitude)
    except audio.AudioFormatError:
        return
    assert len(pcm) == 2 * round(seconds * rate)


@FUZZ
@given(st.text("0123456789*#ABCDwx ", max_size=6) | TEXT, RATES, NUMBERS.map(lambda a: a / 1e4))
def test_dtmf_raises_only_audio_format_error(digits: str, rate: int, amplitude: float) -> None:
    for render in (lambda: dtmf.dtmf_pcm16(digits, rate, amplitude), lambda: dtmf.dtmf_mulaw(digits)):
        with contextlib.suppress(audio.AudioFormatError):
            render()


@FUZZ
@given(st.binary(max_size=1601), st.one_of(RATES, st.integers(min_value=3267, max_value=10**7)))
def test_dtmf_detection_raises_only_audio_format_error(pcm: bytes, rate: int) -> None:
    try:
        found = dtmf.detect_dtmf(pcm, rate)
    except audio.AudioFormatError:
        return
    assert set(found) <= set(dtmf.DTMF_FREQS)


# 4. Control bodies

POLICY = TransferPolicy(allow=("+1555*", "sip:*@pbx.example.com"))


def record(direction: str, to: str) -> CallRecord:
    return CallRecord("CA1", "i1", "live", "+15551230001", to, "agent", direction, "")


@pytest.mark.parametrize("shape", sorted(CONTROL_SHAPES))
@FUZZ
@given(
    data=st.data(),
    direction=st.sampled_from(["inbound", "outbound-api"]),
    to=st.sampled_from(["+15559870002", "sip:a@b.c"]),
)
def test_control_bodies_raise_only_action_refused(
    shape: str, data: st.DataObject, direction: str, to: str
) -> None:
    body = data.draw(CONTROL_SHAPES[shape])
    try:
        action = parse.build_action(record(direction, to), parse.parse_body(body), POLICY)
    except ActionRefused as refused:
        assert refused.status in (400, 403, 413, 422) and refused.code and refused.message
        return
    assert isinstance(action, EndCall | SendDtmf | TransferPlan)
    if isinstance(action, TransferPlan):  # what reaches Twilio is valid and allowed
        assert is_e164(action.target) or is_sip_uri(action.target)
        assert POLICY.allows(action.target)


# 5. A running gateway

QUIET_AGENT = AgentBehaviour(  # talks without end; the caller's keys set nothing off
    continuous=True,
    end_digit="",
    transfer_digit="",
    end_call_tool_digit="",
    transfer_tool_digit="",
    dtmf_replies={},
)
FUZZED_CALLS = 4
MAX_AUDIO_GAP_S = 0.2


@pytest.mark.usefixtures("server_gc")
async def test_junk_on_media_sockets_and_control_urls_breaks_nothing(captured_logs, monkeypatch) -> None:
    monkeypatch.setattr(parse, "RATE_LIMIT", 100_000)  # fuzz the parser, not the rate limit
    media_junk = draw_each(TWILIO_FRAMES, 50)
    # Frames that once ended a call (an exception in its uplink), and one past the socket's
    # limit, which closes that stream (the caller then opens a new one, as Twilio does).
    known = [
        '{"event":"media","media":{"payload":"AAAA","timestamp":"²"}}',
        '{"event":"media","media":{"payload":"AAAA","timestamp":"' + "9" * 5000 + '"}}',
        '{"event":"media","media":{"payload":"AAAA²"}}',
        as_media_frame("A" * 70_000),
    ]
    bodies = draw_each(CONTROL_SHAPES, 30)
    mark = captured_logs.tell()
    allow = ("+1555*", "sip:*@pbx.example.com")
    async with (
        sandbox(QUIET_AGENT, transfer_allow=allow, end_call_drain_s=0.5) as box,
        flowing_call(box) as quiet,
    ):
        fuzzed = [await Victim.start(box) for _ in range(FUZZED_CALLS)]
        since = time.monotonic()
        _, answers = await asyncio.gather(
            send_frames(fuzzed, known + media_junk),  # the stream cut early: it is back by the end
            post_bodies(fuzzed, bodies),
        )
        gap = longest_gap(quiet, since, time.monotonic())
        assert not quiet.ended.is_set()
        for victim in fuzzed:
            await victim.stop()
    assert [(body[:300], answer) for status, body, answer in answers if status >= 500] == []
    assert {400, 413} <= {status for status, _, _ in answers}  # the bodies reached the parser
    lines = [orjson.loads(line) for line in captured_logs.getvalue()[mark:].splitlines() if line.strip()]
    assert any(line.get("event") == "carrier_frame_dropped" for line in lines)  # the frames did too
    broken = [line for line in lines if "exception" in line or line.get("level") in ("error", "critical")]
    assert [(b.get("event"), b.get("call_sid"), str(b.get("exception", ""))[-600:]) for b in broken] == []
    assert gap < MAX_AUDIO_GAP_S, f"the untouched call heard nothing for {gap * 1000:.0f} ms"


class Victim:
    """A fuzzed call: streams like Twilio, and takes junk on its socket and its control URL.
    When junk ends it (a tool's end_call, a transfer, an oversized frame), another replaces it."""

    def __init__(self, box, call, runner: asyncio.Task, control_url: str) -> None:
        self.box, self.call, self.runner, self.control_url = box, call, runner, control_url
        self._replacing = asyncio.Lock()  # frames and bodies both find it ended: one new call

    @classmethod
    async def start(cls, box) -> Victim:
        call = await box.connect_call()
        runner = asyncio.create_task(call.run(CallScript(max_s=120)))
        return cls(box, call, runner, await control_url_of(box, call))

    async def live(self) -> Victim:
        async with self._replacing:
            if self.call.ended.is_set():
                await self.stop()
                fresh = await Victim.start(self.box)
                self.call, self.runner, self.control_url = fresh.call, fresh.runner, fresh.control_url
        return self

    async def stop(self) -> None:
        await self.call.hang_up()
        await self.runner


async def send_frames(fuzzed: list[Victim], frames: list[str | bytes]) -> None:
    for n, frame in enumerate(frames):
        victim = await fuzzed[n % len(fuzzed)].live()
        if isinstance(frame, bytes) and n % 3:  # most as text: a binary frame is refused unread
            with contextlib.suppress(UnicodeDecodeError):
                frame = frame.decode()
        await victim.call.send(frame)
        await asyncio.sleep(0.005)


async def post_bodies(fuzzed: list[Victim], bodies: list[bytes]) -> list[tuple[int, bytes, bytes]]:
    """(status, body sent, answer) of each POST; every answer but a 5xx must be the API's JSON."""
    answers = []
    async with aiohttp.ClientSession() as http:
        for n, body in enumerate(bodies):
            victim = await fuzzed[n % len(fuzzed)].live()
            headers = {"Content-Type": "application/json"}
            async with http.post(victim.control_url, data=body, headers=headers) as resp:
                answers.append((resp.status, body, await resp.read()))
            if resp.status < 500:
                assert "ok" in orjson.loads(answers[-1][2]), answers[-1]
            await asyncio.sleep(0.01)
    return answers
