"""Carrier- and agent-neutral events: what the codecs produce and the session consumes.

The session never sees a Twilio or Cartesia frame, only these, so a new carrier or agent
platform is one new codec file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


class ProtocolError(ValueError):
    """A frame that breaks its protocol; the message says how. The call goes on."""


def json_object(text: str | bytes) -> dict[str, Any]:
    """A frame's JSON object (both protocols frame their events so); ProtocolError otherwise."""
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise ProtocolError("frame must be a JSON object")
    return frame


# Carrier leg (caller side)


@dataclass(slots=True, frozen=True)
class StreamConnected:
    pass


@dataclass(slots=True, frozen=True)
class StreamStarted:
    stream_sid: str
    call_sid: str
    parameters: dict[str, str] = field(default_factory=dict)


# The two events built for every 20 ms frame are not frozen: a frozen dataclass's __init__
# sets each field through object.__setattr__, 2.5x the cost. Nothing mutates them.


@dataclass(slots=True)
class CallerAudio:
    payload: str  # base64 mu-law 8 kHz, passed through untouched
    timestamp_ms: int | None = None  # since the stream started, when the carrier says


@dataclass(slots=True, frozen=True)
class CallerDtmf:
    digit: str


@dataclass(slots=True, frozen=True)
class PlaybackMark:
    name: str


@dataclass(slots=True, frozen=True)
class StreamStopped:
    pass


CarrierEvent = StreamConnected | StreamStarted | CallerAudio | CallerDtmf | PlaybackMark | StreamStopped


# Agent leg


@dataclass(slots=True, frozen=True)
class AgentReady:
    stream_id: str
    output_format: str = ""  # the agent's audio format, when its `ack` says


@dataclass(slots=True)  # not frozen: built per frame (see CallerAudio)
class AgentAudio:
    payload: str  # base64, in the agent's output format


@dataclass(slots=True, frozen=True)
class AgentClear:
    pass


@dataclass(slots=True, frozen=True)
class AgentDtmf:
    digit: str


@dataclass(slots=True, frozen=True)
class AgentCustom:
    metadata: dict[str, Any]


@dataclass(slots=True, frozen=True)
class AgentTransfer:
    target: str  # E.164 number or sip: URI, "" when the agent named none
    details: dict[str, Any] = field(default_factory=dict)
    # Destination fields the frame had but that could not be read: such a transfer is refused,
    # never sent to the default destination.
    unreadable: tuple[str, ...] = ()


@dataclass(slots=True, frozen=True)
class AgentUnknown:
    event: str


AgentEvent = AgentReady | AgentAudio | AgentClear | AgentDtmf | AgentCustom | AgentTransfer | AgentUnknown
