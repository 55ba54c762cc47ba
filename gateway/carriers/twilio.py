"""Twilio: Media Streams codec, voice-webhook TwiML and signature checks. Pure: no I/O.

Wire format: PROTOCOLS.md sections 1-3. Frames are JSON text; the caller's audio is base64
mu-law 8 kHz, which the gateway passes to the agent without decoding.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, Dial, VoiceResponse

from gateway.events import (
    CallerAudio,
    CallerDtmf,
    CarrierEvent,
    PlaybackMark,
    ProtocolError,
    StreamConnected,
    StreamStarted,
    StreamStopped,
)

MEDIA_PATH = "/twilio/media"
DTMF_DIGITS = frozenset("0123456789*#ABCD")

# A 20 ms media frame is ~300 bytes; `start` with custom parameters a few KiB. Anything larger
# than this is not Twilio and is refused before it is parsed.
MAX_FRAME_BYTES = 64 * 1024


def stream_url(public_url: str) -> str:
    """The `<Stream url>`: PUBLIC_URL with https -> wss, http -> ws, no query string."""
    parts = urlsplit(public_url)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"PUBLIC_URL must be http(s), got {public_url!r}")
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{MEDIA_PATH}"


def _obj(frame: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = frame.get(key)
    if not isinstance(value, dict):
        raise ProtocolError(f"'{key}' must be an object")
    return value


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{where}.{key} must be a non-empty string")
    return value


def parse_frame(text: str | bytes) -> CarrierEvent | None:
    """Decode one Media Streams frame from Twilio. None for events the bridge does not use.

    Raises ProtocolError, with a message saying what is wrong, for anything malformed.
    """
    if len(text) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(text)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise ProtocolError("frame must be a JSON object")
    event = frame.get("event")
    if event == "media":
        media = _obj(frame, "media")
        track = media.get("track", "inbound")
        if track not in ("inbound", "inbound_track"):
            return None  # an outbound-track echo, not the caller
        payload = _str(media, "payload", "media")
        try:
            binascii.a2b_base64(payload, strict_mode=True)
        except binascii.Error as exc:
            raise ProtocolError(f"media.payload is not base64: {exc}") from None
        stamp = media.get("timestamp")
        return CallerAudio(payload, int(stamp) if isinstance(stamp, str) and stamp.isdigit() else None)
    if event == "mark":
        return PlaybackMark(_str(_obj(frame, "mark"), "name", "mark"))
    if event == "dtmf":
        digit = _str(_obj(frame, "dtmf"), "digit", "dtmf")
        if digit not in DTMF_DIGITS:
            raise ProtocolError(f"dtmf.digit {digit!r} is not a DTMF digit")
        return CallerDtmf(digit)
    if event == "start":
        start = _obj(frame, "start")
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError("start.customParameters must be an object")
        stream_sid = _str(start, "streamSid", "start")
        if not stream_sid.isalnum():
            raise ProtocolError("start.streamSid must be alphanumeric")
        return StreamStarted(
            stream_sid=stream_sid,
            call_sid=_str(start, "callSid", "start"),
            parameters={str(k): str(v) for k, v in params.items()},
        )
    if event == "stop":
        return StreamStopped()
    if event == "connected":
        return StreamConnected()
    if not isinstance(event, str):
        raise ProtocolError("'event' must be a string")
    raise ProtocolError(f"unknown event {event!r}")


# Frames to Twilio. Built by hand rather than through a JSON encoder: the payload is
# base64 and the names are ours, so nothing needs escaping, and this runs for every frame.


def media_frame(stream_sid: str, payload_b64: str) -> str:
    return f'{{"event":"media","streamSid":"{stream_sid}","media":{{"payload":"{payload_b64}"}}}}'


def mark_frame(stream_sid: str, name: str) -> str:
    return f'{{"event":"mark","streamSid":"{stream_sid}","mark":{{"name":"{name}"}}}}'


def clear_frame(stream_sid: str) -> str:
    return f'{{"event":"clear","streamSid":"{stream_sid}"}}'


# TwiML


def connect_stream_twiml(stream_url: str, parameters: Mapping[str, str]) -> str:
    """Answer a call by streaming it both ways; hang up when the stream ends."""
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=stream_url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    response.append(connect)
    response.hangup()
    return str(response)


def dial_twiml(
    target: str,
    caller_id: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: int = 30,
    action_url: str | None = None,
    sip_credentials: tuple[str, str] | None = None,
) -> str:
    """Blind transfer: dial a number or a SIP URI (with X- headers) and bridge the caller.

    With `action_url`, Twilio posts the outcome (`DialCallStatus`) there and runs the TwiML it
    answers, so a busy or unanswered destination does not simply end the call.
    """
    response = VoiceResponse()
    attrs: dict[str, Any] = {"answer_on_bridge": True, "timeout": timeout_s}
    if caller_id:
        attrs["caller_id"] = caller_id
    if action_url:
        attrs["action"] = action_url
        attrs["method"] = "POST"
    dial = Dial(**attrs)
    if target.lower().startswith("sip"):
        auth = {"username": sip_credentials[0], "password": sip_credentials[1]} if sip_credentials else {}
        dial.sip(sip_uri_with_headers(target, headers or {}), **auth)
    else:
        dial.number(target)
    response.append(dial)
    return str(response)


def conference_twiml(
    name: str,
    *,
    starts_conference: bool,
    whisper: str = "",
    wait_url: str = "",
    status_callback: str = "",
) -> str:
    """Join a conference. The caller waits on hold (it does not start the conference); the human
    hears the `whisper` first, on their own leg, and starts the conference when they join."""
    response = VoiceResponse()
    if whisper:
        response.say(whisper)
    dial = Dial()
    attrs: dict[str, Any] = {
        "start_conference_on_enter": starts_conference,
        "end_conference_on_exit": True,
        "beep": False,
    }
    if wait_url:
        attrs["wait_url"] = wait_url
        attrs["wait_method"] = "GET"  # hold music is usually a static file, which refuses POST
    if status_callback:
        attrs["status_callback"] = status_callback
        attrs["status_callback_event"] = "join"
        attrs["status_callback_method"] = "POST"
    dial.conference(name, **attrs)
    response.append(dial)
    return str(response)


def say_and_hangup_twiml(message: str) -> str:
    response = VoiceResponse()
    if message:
        response.say(message)
    response.hangup()
    return str(response)


def sip_uri_with_headers(uri: str, headers: Mapping[str, str]) -> str:
    if not headers:
        return uri
    query = "&".join(f"{quote(k, safe='-')}={quote(str(v), safe='')}" for k, v in headers.items())
    return f"{uri}{'&' if '?' in uri else '?'}{query}"


def hangup_twiml() -> str:
    response = VoiceResponse()
    response.hangup()
    return str(response)


# Signatures


class SignatureChecker:
    """Checks X-Twilio-Signature against URLs built from PUBLIC_URL, never from request headers."""

    def __init__(self, auth_token: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self._validator = RequestValidator(auth_token) if auth_token else None

    def valid(self, url: str, params: Mapping[str, str], signature: str | None) -> bool:
        if not self.enabled:
            return True
        if self._validator is None or not signature:
            return False
        return bool(self._validator.validate(url, dict(params), signature))
