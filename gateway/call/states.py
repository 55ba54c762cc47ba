"""A call's states and the moves between them, in one table.

`State` is a `StrEnum`: records in the registry, logs and the control API carry the plain
string ("live"), and comparing a state with that string works.
"""

from __future__ import annotations

import enum

import structlog

log = structlog.get_logger(__name__)


class State(enum.StrEnum):
    DIALING = "dialing"  # an outbound call we started, not answered yet
    RINGING = "ringing"  # answered by the voice webhook; its media socket has not come yet
    CONNECTING = "connecting"  # media is here; the agent is being opened
    LIVE = "live"
    ENDING = "ending"  # a hang-up is under way (the agent's last words first)
    TRANSFERRING = "transferring"  # a transfer is under way (the same)
    ENDED = "ended"
    TRANSFERRED = "transferred"


FINAL = frozenset({State.ENDED, State.TRANSFERRED})
LEAVING = frozenset({State.ENDING, State.TRANSFERRING, State.ENDED, State.TRANSFERRED})
# Media arrived and no ending is under way: a new stream may resume the call.
RESUMABLE = frozenset({State.CONNECTING, State.LIVE})

# Every legal move. Nothing leaves ENDED; a TRANSFERRED call comes back (RINGING, a new agent
# session) only when nobody took the transfer. A failed transfer with the agent still there
# goes back to LIVE; one whose agent has gone still ends as TRANSFERRED (the hang-up follows).
# A caller who hangs up while the transfer waits for the agent's last words ENDS the call.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.DIALING: frozenset({State.RINGING}),
    State.RINGING: frozenset({State.CONNECTING}),
    State.CONNECTING: frozenset({State.LIVE, State.ENDING, State.TRANSFERRING, State.ENDED}),
    # A live call's stream that lands on another instance starts a new session there.
    State.LIVE: frozenset({State.CONNECTING, State.ENDING, State.TRANSFERRING, State.ENDED}),
    State.ENDING: frozenset({State.ENDED}),
    State.TRANSFERRING: frozenset({State.TRANSFERRED, State.LIVE, State.ENDED}),
    State.ENDED: frozenset(),
    State.TRANSFERRED: frozenset({State.RINGING}),
}


def is_legal(current: str, new: str) -> bool:
    return State(new) in TRANSITIONS[State(current)]


def check_transition(call_sid: str, current: str, new: str) -> bool:
    """True if `current -> new` is in the table; otherwise log an error naming the call.
    The move is not stopped: a call in a state the table did not foresee still has to end."""
    if is_legal(current, new):
        return True
    log.error("illegal_call_transition", call_sid=call_sid, state=str(new), previous=str(current))
    return False
