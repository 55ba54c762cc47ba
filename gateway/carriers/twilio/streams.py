"""Connecting a call's media to the gateway: register a fresh agent session for the call, and
answer the TwiML whose `<Stream>` brings its audio here (on any instance)."""

from __future__ import annotations

from gateway.call.states import State, check_transition
from gateway.carriers.twilio import codec, twiml
from gateway.registry.base import CallRecord, SessionRegistry, digest, new_secret


async def connect_stream(registry: SessionRegistry, record: CallRecord, public_url: str) -> str:
    """Register `record` for a new agent session and return the TwiML that streams the call.

    The stream carries a one-off `session` reference (only its hash is stored), which the media
    socket must present. The control token is minted where the media lands (it goes to the
    agent from there); until then the call answers to no token at all.
    """
    session = new_secret()
    record.session_hash = digest(session)
    record.token_hash = digest(new_secret())
    record.owner = registry.instance_id
    record.state = State.RINGING
    await registry.put(record)
    return twiml.connect_stream_twiml(codec.stream_url(public_url), {"session": session})


async def reconnect(
    registry: SessionRegistry, call_sid: str, why: dict[str, str], public_url: str
) -> str | None:
    """A transfer was not taken: the caller goes back to a new agent session that is told why
    (`metadata.transfer_failed`). None when the call is no longer known."""
    record = await registry.get(call_sid)
    if record is None:
        return None
    check_transition(call_sid, record.state, State.RINGING)
    record.metadata = {**record.metadata, "transfer_failed": why}
    record.transfer = {}
    return await connect_stream(registry, record, public_url)
