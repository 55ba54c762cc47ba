"""Cartesia's Calls API: the frames both ways (pure, no I/O).

Wire format: PROTOCOLS.md section 5. All frames are JSON text with base64 audio inside.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.destinations import read_destination
from gateway.events import (
    AgentAudio,
    AgentClear,
    AgentCustom,
    AgentDtmf,
    AgentEvent,
    AgentReady,
    AgentTransfer,
    AgentUnknown,
    ProtocolError,
    json_object,
)

AGENT_END_REASON = "call ended by agent"
# Each digit is 160 ms of tones; 64 digits is ten seconds. Longer strings are not DTMF.
MAX_DTMF_DIGITS = 64
# The digits the Calls API documents for a `dtmf` event; a caller's A-D are not forwarded.
CALLS_API_DTMF = frozenset("0123456789*#")


def agent_url(base_url: str, agent_id: str) -> str:
    return f"{base_url.rstrip('/')}/agents/stream/{agent_id}"


def start_frame(
    *,
    stream_id: str,
    input_format: str,
    metadata: Mapping[str, Any],
    agent: Mapping[str, Any] | None = None,
) -> str:
    frame: dict[str, Any] = {
        "event": "start",
        "stream_id": stream_id,
        "config": {"input_format": input_format},
        "metadata": dict(metadata),
    }
    if agent:
        frame["agent"] = dict(agent)
    return orjson.dumps(frame).decode()


def media_input_frame(stream_id: str, payload_b64: str) -> str:
    # Hand-built: this runs for every 20 ms of caller audio, and neither part needs escaping
    # (stream_id is ours, the payload is base64 checked by the carrier codec).
    return f'{{"event":"media_input","stream_id":"{stream_id}","media":{{"payload":"{payload_b64}"}}}}'


def dtmf_frame(stream_id: str, digit: str) -> str:
    return orjson.dumps({"event": "dtmf", "stream_id": stream_id, "dtmf": digit}).decode()


def custom_frame(stream_id: str, metadata: Mapping[str, Any]) -> str:
    return orjson.dumps({"event": "custom", "stream_id": stream_id, "metadata": metadata}).decode()


def _transfer_target(frame: Mapping[str, Any]) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    """(destination, details under `transfer`, destination fields present but unreadable),
    from under the frame's `transfer` or its top level (gateway.destinations reads them)."""
    nested = frame.get("transfer")
    details: dict[str, Any] = dict(nested) if isinstance(nested, dict) else {}
    unreadable: tuple[str, ...] = ()
    for source in (details, frame):
        target, bad = read_destination(source)
        if target:
            return target, details, ()
        unreadable += bad
    return "", details, unreadable


def _ack_output_format(frame: Mapping[str, Any]) -> str:
    """The agent's output format, when the `ack` reports it (in `config`, or at the top level)."""
    config = frame.get("config")
    for source in (config if isinstance(config, dict) else {}, frame):
        value = source.get("output_format")
        if isinstance(value, str) and value:
            return value
    return ""


def parse_frame(text: str | bytes) -> AgentEvent:
    """Decode one frame from the agent; ProtocolError for anything malformed."""
    frame = json_object(text)
    event = frame.get("event")
    if event == "media_output":
        media = frame.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            raise ProtocolError("media_output.media.payload must be a string")
        return AgentAudio(payload)
    if event == "clear":
        return AgentClear()
    if event == "dtmf":
        digit = frame.get("dtmf")
        if not isinstance(digit, str) or not 0 < len(digit) <= MAX_DTMF_DIGITS:
            raise ProtocolError(f"dtmf.dtmf must be a string of 1 to {MAX_DTMF_DIGITS} digits")
        return AgentDtmf(digit)
    if event == "ack":
        stream_id = frame.get("stream_id")
        return AgentReady(stream_id if isinstance(stream_id, str) else "", _ack_output_format(frame))
    if event == "custom":
        metadata = frame.get("metadata")
        return AgentCustom(metadata if isinstance(metadata, dict) else {})
    if event == "transfer_call":
        return AgentTransfer(*_transfer_target(frame))
    if not isinstance(event, str):
        raise ProtocolError("'event' must be a string")
    return AgentUnknown(event)


def decode_payload(payload_b64: str) -> bytes:
    try:
        return binascii.a2b_base64(payload_b64, strict_mode=True)
    except ValueError as exc:  # binascii.Error, or a plain ValueError for non-ASCII text
        raise ProtocolError(f"audio payload is not base64: {exc}") from None


def ended_by_agent(code: int | None, reason: str | None) -> bool:
    """Close 1000 `call ended by agent[, reason: ...]`: the agent hung up on purpose."""
    return code == 1000 and (reason or "").startswith(AGENT_END_REASON)
