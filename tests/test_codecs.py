"""The Twilio and Calls API codecs as pure functions."""

import base64

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from gateway.agents import calls_api
from gateway.call.playout import MARK_EVERY_S, Playback
from gateway.carriers.twilio import codec, signatures
from gateway.carriers.twilio import twiml as twiml_builders
from gateway.events import (
    AgentAudio,
    AgentClear,
    AgentCustom,
    AgentDtmf,
    AgentReady,
    AgentTransfer,
    AgentUnknown,
    CallerAudio,
    CallerDtmf,
    PlaybackMark,
    ProtocolError,
    StreamConnected,
    StreamStarted,
    StreamStopped,
)

START = {
    "event": "start",
    "sequenceNumber": "1",
    "streamSid": "MZ1",
    "start": {
        "accountSid": "AC1",
        "streamSid": "MZ1",
        "callSid": "CA1",
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"session": "tok"},
    },
}


def test_twilio_frames_parse_to_events():
    assert codec.parse_frame('{"event":"connected","protocol":"Call","version":"1.0.0"}') == StreamConnected()
    assert codec.parse_frame(orjson.dumps(START)) == StreamStarted("MZ1", "CA1", {"session": "tok"})
    media = {"event": "media", "media": {"track": "inbound", "payload": "//8="}}
    assert codec.parse_frame(orjson.dumps(media)) == CallerAudio("//8=")
    assert codec.parse_frame('{"event":"dtmf","dtmf":{"track":"inbound_track","digit":"#"}}') == CallerDtmf(
        "#"
    )
    assert codec.parse_frame('{"event":"mark","mark":{"name":"m3"}}') == PlaybackMark("m3")
    assert codec.parse_frame('{"event":"stop","stop":{}}') == StreamStopped()


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ("nope", "invalid JSON"),
        ("[1]", "JSON object"),
        ('{"event":"media"}', "'media' must be an object"),
        ('{"event":"media","media":{"payload":""}}', "media.payload"),
        ('{"event":"media","media":{"payload":"a$b="}}', "not base64"),
        ('{"event":"dtmf","dtmf":{"digit":"x"}}', "not a DTMF digit"),
        ('{"event":"mark","mark":{"name":5}}', "mark.name"),
        ('{"event":"start","start":{"streamSid":"MZ\\"1","callSid":"CA1"}}', "alphanumeric"),
        ('{"event":"teleport"}', "unknown event 'teleport'"),
        ('{"event":7}', "'event' must be a string"),
        ("x" * (codec.MAX_FRAME_BYTES + 1), "exceeds"),
    ],
)
def test_malformed_twilio_frames_are_rejected_with_a_clear_error(frame, message):
    with pytest.raises(ProtocolError, match=message):
        codec.parse_frame(frame)


@given(st.binary(min_size=1, max_size=400), st.text("ABCDEFabcdef0123456789", min_size=1, max_size=34))
def test_outbound_twilio_frames_are_valid_json_that_round_trips(audio, sid):
    payload = base64.b64encode(audio).decode()
    assert orjson.loads(codec.media_frame(sid, payload)) == {
        "event": "media",
        "streamSid": sid,
        "media": {"payload": payload},
    }
    assert orjson.loads(codec.mark_frame(sid, "m1")) == {
        "event": "mark",
        "streamSid": sid,
        "mark": {"name": "m1"},
    }
    assert orjson.loads(codec.clear_frame(sid)) == {"event": "clear", "streamSid": sid}
    media = {"event": "media", "media": {"payload": payload}}
    assert codec.parse_frame(orjson.dumps(media)) == CallerAudio(payload)


def test_stream_url_swaps_the_scheme_names_the_call_and_drops_the_query():
    assert codec.stream_url("https://gw.example.com", "CA1") == "wss://gw.example.com/twilio/media/CA1"
    assert codec.stream_url("http://127.0.0.1:8080/", "CA2") == "ws://127.0.0.1:8080/twilio/media/CA2"
    with pytest.raises(ValueError):
        codec.stream_url("ftp://x", "CA1")


def test_connect_twiml_streams_both_ways_then_asks_the_gateway_what_next():
    twiml = twiml_builders.connect_stream_twiml(
        "wss://gw/twilio/media/CA1", {"session": "abc"}, "https://gw/twilio/continue"
    )
    assert (
        '<Connect><Stream url="wss://gw/twilio/media/CA1"><Parameter name="session" value="abc" />' in twiml
    )
    assert twiml.index("</Connect>") < twiml.index(
        '<Redirect method="POST">https://gw/twilio/continue</Redirect>'
    )
    assert "<Hangup" not in twiml and "<Start>" not in twiml


def test_dial_twiml_for_numbers_and_sip_uris_with_headers():
    number = twiml_builders.dial_twiml("+15551234567", "+15550000000")
    assert (
        '<Dial answerOnBridge="true" callerId="+15550000000" timeout="30"><Number>+15551234567</Number>'
        in number
    )
    sip = twiml_builders.dial_twiml("sip:alice@pbx.example.com", "+1555", headers={"X-Case": "42 a&b"})
    assert "<Sip>sip:alice@pbx.example.com?X-Case=42%20a%26amp%3Bb</Sip>" in sip or (
        "<Sip>sip:alice@pbx.example.com?X-Case=42%20a%26b</Sip>" in sip
    )


def test_signature_checker_uses_twilios_validator():
    checker = signatures.SignatureChecker("secret-token")
    url, params = "https://gw.example.com/twilio/voice?agent=a1", {"CallSid": "CA1", "From": "+1"}
    good = RequestValidator("secret-token").compute_signature(url, params)
    assert checker.valid(url, params, good)
    assert not checker.valid(url, {**params, "From": "+2"}, good)
    assert not checker.valid(url, params, None)
    assert not signatures.SignatureChecker("").valid(url, params, good)
    assert signatures.SignatureChecker("", enabled=False).valid(url, params, None)


def test_agent_frames_parse_to_events():
    assert calls_api.parse_frame('{"event":"ack","stream_id":"s1"}') == AgentReady("s1")
    assert calls_api.parse_frame('{"event":"media_output","media":{"payload":"AAA="}}') == AgentAudio("AAA=")
    assert calls_api.parse_frame('{"event":"clear"}') == AgentClear()
    assert calls_api.parse_frame('{"event":"dtmf","dtmf":"5"}') == AgentDtmf("5")
    assert calls_api.parse_frame('{"event":"custom","metadata":{"a":1}}') == AgentCustom({"a": 1})
    assert calls_api.parse_frame('{"event":"whatever_new"}') == AgentUnknown("whatever_new")


@pytest.mark.parametrize(
    ("frame", "target"),
    [
        ({"target_phone_number": "+15551112222"}, "+15551112222"),
        ({"transfer": {"target_phone_number": "+15551112222"}}, "+15551112222"),
        ({"transfer": {"sip_uri": "sip:a@b.example"}}, "sip:a@b.example"),
        ({}, ""),
    ],
)
def test_transfer_call_target_is_found_wherever_it_is(frame, target):
    event = calls_api.parse_frame(orjson.dumps({"event": "transfer_call", **frame}))
    assert isinstance(event, AgentTransfer)
    assert event.target == target


@pytest.mark.parametrize(
    "frame",
    [
        "{",
        "3",
        '{"event":"media_output"}',
        '{"event":"media_output","media":{"payload":1}}',
        '{"event":"dtmf"}',
    ],
)
def test_malformed_agent_frames_are_rejected(frame):
    with pytest.raises(ProtocolError):
        calls_api.parse_frame(frame)


def test_start_and_media_input_frames():
    start = orjson.loads(
        calls_api.start_frame(stream_id="CA1", input_format="mulaw_8000", metadata={"from": "+1"})
    )
    assert start == {
        "event": "start",
        "stream_id": "CA1",
        "config": {"input_format": "mulaw_8000"},
        "metadata": {"from": "+1"},
    }
    assert orjson.loads(calls_api.media_input_frame("CA1", "AAA=")) == {
        "event": "media_input",
        "stream_id": "CA1",
        "media": {"payload": "AAA="},
    }
    assert orjson.loads(calls_api.dtmf_frame("CA1", "7")) == {
        "event": "dtmf",
        "stream_id": "CA1",
        "dtmf": "7",
    }
    assert calls_api.agent_url("wss://api.cartesia.ai/", "ag1") == "wss://api.cartesia.ai/agents/stream/ag1"


def test_agent_end_is_recognised_only_from_close_1000_with_its_reason():
    assert calls_api.ended_by_agent(1000, "call ended by agent")
    assert calls_api.ended_by_agent(1000, "call ended by agent, reason: done")
    assert not calls_api.ended_by_agent(1000, "connection idle timeout")
    assert not calls_api.ended_by_agent(1011, "call ended by agent")


async def test_playback_knows_what_the_caller_heard():
    playback = Playback()
    playback.sent(MARK_EVERY_S * 0.6)
    assert playback.next_mark() is None  # less than MARK_EVERY_S since the last mark
    playback.sent(MARK_EVERY_S * 0.6)
    first = playback.next_mark()
    playback.sent(0.1)
    last = playback.next_mark(force=True)
    assert first and last and not playback.played_out.is_set()
    playback.echoed(first)
    assert playback.heard_s == pytest.approx(MARK_EVERY_S * 1.2)
    assert not playback.played_out.is_set()
    playback.echoed(last)
    assert playback.played_out.is_set()
    assert playback.unplayed_s == pytest.approx(0)


async def test_marks_outstanding_at_a_clear_are_void():
    playback = Playback()
    playback.sent(1.0)
    stale = playback.next_mark(force=True)
    playback.void()
    assert playback.played_out.is_set()
    playback.sent(0.6)
    fresh = playback.next_mark(force=True)
    playback.echoed(stale)  # echoed by Twilio's clear: proves nothing
    assert playback.heard_s == 0 and not playback.played_out.is_set()
    playback.echoed(fresh)
    assert playback.played_out.is_set()
