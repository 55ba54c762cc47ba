"""What an agent's tools can ask of a call, and when the call refuses.

The control API builds these (gateway.control.parse); the session carries them out
(gateway.call.session), or the control service does through the carrier's REST API when the
instance holding the call is gone. `admit` is the one rule both apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.call.states import FINAL, State


@dataclass(slots=True, frozen=True)
class TransferPlan:
    target: str
    caller_id: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    mode: str = "blind"


@dataclass(slots=True, frozen=True)
class EndCall:
    reason: str = ""


@dataclass(slots=True, frozen=True)
class SendDtmf:
    digits: str


Action = EndCall | TransferPlan | SendDtmf

ACTION_NAMES: dict[type, str] = {EndCall: "end_call", TransferPlan: "call_transfer", SendDtmf: "send_dtmf"}


class ActionRefused(Exception):
    """A request the call cannot take now; `status` and `code` are the control API's answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def admit(current: str, action: Action) -> bool:
    """May a call in state `current` (or heading to it) take `action`? True: go ahead. False: a
    repeated `end_call` while the call is ending, answered 200 with nothing more done. Anything
    else raises ActionRefused."""
    if current in FINAL:
        raise ActionRefused(404, "not_found", "the call has ended")
    if isinstance(action, EndCall):
        if current == State.ENDING:
            return False
        if current == State.TRANSFERRING:
            raise ActionRefused(409, "call_transferring", "the call is being transferred")
    elif current in (State.ENDING, State.TRANSFERRING):
        raise ActionRefused(409, f"call_{current}", f"the call is already {current}")
    return True
