"""TwiML the gateway answers Twilio with, and the SIP URIs it dials. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from twilio.twiml.voice_response import Connect, Dial, VoiceResponse


def connect_stream_twiml(stream_url: str, parameters: Mapping[str, str], continue_url: str) -> str:
    """Answer a call by streaming it both ways. When the stream ends with the call still up
    (Twilio runs what follows `</Connect>` once the server closes the socket), ask the gateway
    what next: a new stream if the call was moving or its stream dropped, else a hang-up."""
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=stream_url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    response.append(connect)
    response.redirect(continue_url, method="POST")
    return str(response)


def fallback_twiml(kind: str, argument: str, caller_id: str = "") -> str:
    """What a caller gets when the agent cannot be had (AGENT_FALLBACK): `say` a message and
    hang up, `dial` a person, or `hangup`."""
    if kind == "dial":
        return dial_twiml(argument, caller_id)
    return say_and_hangup_twiml(argument if kind == "say" else "")


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


def sip_headers_query(headers: Mapping[str, str]) -> str:
    """The headers part of a SIP URI, URL-encoded as Twilio receives it."""
    return "&".join(f"{quote(k, safe='-')}={quote(str(v), safe='')}" for k, v in headers.items())


def sip_uri_with_headers(uri: str, headers: Mapping[str, str]) -> str:
    if not headers:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}{sip_headers_query(headers)}"


def hangup_twiml() -> str:
    response = VoiceResponse()
    response.hangup()
    return str(response)
