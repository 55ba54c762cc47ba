"""Twilio Media Streams: the frames both ways, and the stream's URL. Pure: no I/O.

Wire format: PROTOCOLS.md sections 1-3. Frames are JSON text; the caller's audio is base64
mu-law 8 kHz, which the gateway passes to the agent without decoding.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from gateway.events import (
    CallerAudio,
    CallerDtmf,
    CarrierEvent,
    PlaybackMark,
    ProtocolError,
    StreamConnected,
    StreamStarted,
    StreamStopped,
    json_object,
)

MEDIA_PATH = "/twilio/media"
DTMF_DIGITS = frozenset("0123456789*#ABCD")

# A 20 ms media frame is ~300 bytes; `start` with custom parameters a few KiB. Anything larger
# than this is not Twilio and is refused before it is parsed.
MAX_FRAME_BYTES = 64 * 1024


def stream_url(public_url: str, call_sid: str) -> str:
    """The `<Stream url>`: PUBLIC_URL with https -> wss, http -> ws, the call's SID in the path,
    no query string. Twilio signs the upgrade on this URL, path included (query strings are
    stripped), so a signature is good for this call's streams only."""
    parts = urlsplit(public_url)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"PUBLIC_URL must be http(s), got {public_url!r}")
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{MEDIA_PATH}/{quote(call_sid, safe='')}"


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
    frame = json_object(text)
    event = frame.get("event")
    if event == "media":
        media = _obj(frame, "media")
        track = media.get("track", "inbound")
        if track not in ("inbound", "inbound_track"):
            return None  # an outbound-track echo, not the caller
        payload = _str(media, "payload", "media")
        try:
            binascii.a2b_base64(payload, strict_mode=True)
        except ValueError as exc:  # binascii.Error, or a plain ValueError for non-ASCII text
            raise ProtocolError(f"media.payload is not base64: {exc}") from None
        stamp = media.get("timestamp")
        # ASCII digits only ("²".isdigit() is true), and not so many that int() refuses them.
        readable = isinstance(stamp, str) and stamp.isascii() and stamp.isdigit() and len(stamp) <= 18
        return CallerAudio(payload, int(stamp) if readable else None)
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
