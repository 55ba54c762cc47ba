"""Connecting a call's media to the gateway: register a fresh agent session for the call, and
answer the TwiML whose `<Stream>` brings its audio here (on any instance)."""

from __future__ import annotations

from gateway.call.states import State, check_transition
from gateway.carriers.twilio import codec, twiml
from gateway.registry.base import CallRecord, SessionRegistry, digest, new_secret

# A call is given at most this many new streams (after drops, moves and takeovers): a stream
# that fails again and again ends the call rather than loop.
MAX_RESUMES = 20
CONTINUE_PATH = "/twilio/continue"


def _stream_twiml(record: CallRecord, session: str, public_url: str) -> str:
    return twiml.connect_stream_twiml(
        codec.stream_url(public_url, record.call_sid), {"session": session}, public_url + CONTINUE_PATH
    )


async def connect_stream(registry: SessionRegistry, record: CallRecord, public_url: str) -> str:
    """Register `record` for a new agent session and return the TwiML that streams the call.

    The stream carries a one-off `session` reference (only its hash is stored), which the media
    socket must present, once. The control token is minted where the media lands (it goes to
    the agent from there); until then the call answers to no token at all.
    """
    session = new_secret()
    record.session_hash = digest(session)
    record.token_hash = digest(new_secret())
    record.owner = registry.instance_id
    record.state = State.RINGING
    await registry.put(record)
    return _stream_twiml(record, session, public_url)


async def resume_stream(
    registry: SessionRegistry, record: CallRecord, public_url: str, why: str
) -> str | None:
    """A new stream for a call whose stream ended while it was live (dropped, moved, or its
    instance died): the call keeps its state, owner (until the stream lands), control token and
    the agent's state, and its next agent session is told it resumes. None past MAX_RESUMES."""
    if record.resumes >= MAX_RESUMES:
        return None
    session = new_secret()
    fields = {"session_hash": digest(session), "resumes": record.resumes + 1, "resume_reason": why}
    await registry.update(record.call_sid, **fields)
    for name, value in fields.items():
        setattr(record, name, value)
    return _stream_twiml(record, session, public_url)


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
