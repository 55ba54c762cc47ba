"""The two sides of a call's bridge, and the carrier's call control, as the session sees them.

The session knows neither Twilio nor Cartesia: legs hand it neutral events (gateway.events)
and take audio, marks and DTMF from it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from gateway.call.actions import TransferPlan
from gateway.events import AgentEvent, CarrierEvent, ProtocolError
from gateway.liveness import Liveness


class CarrierLeg(Protocol):
    """The caller's side of the bridge (Twilio Media Streams today)."""

    liveness: Liveness
    silent_after_s: float | None  # the peer is dead after this long without a frame (None: never)
    stalled_after_s: float  # a send waiting this long means the peer has stopped reading

    def events(self) -> AsyncIterator[CarrierEvent | ProtocolError]: ...
    async def send_audio(self, payload_b64: str) -> None: ...
    async def send_mark(self, name: str) -> None: ...
    async def send_clear(self) -> None: ...
    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class AgentLeg(Protocol):
    """The agent's side of the bridge (a Cartesia Line agent today)."""

    stream_id: str
    output_format: str  # as the agent's ack reported it; "" when it did not
    liveness: Liveness
    silent_after_s: float | None
    stalled_after_s: float

    def events(self) -> AsyncIterator[AgentEvent | ProtocolError]: ...
    async def send_audio(self, payload_b64: str) -> None: ...
    async def send_dtmf(self, digit: str) -> None: ...
    async def close(self, code: int = 1000, reason: str = "") -> None: ...
    async def keepalive(self, now: float) -> bool: ...  # False: the peer stopped answering pings
    def abort(self) -> None: ...  # drop the connection at once; events() then ends

    @property
    def close_code(self) -> int | None: ...

    @property
    def close_reason(self) -> str | None: ...


class CallControl(Protocol):
    """What the carrier's REST API does to a live call."""

    async def hangup(self, call_sid: str) -> bool: ...
    async def transfer(self, call_sid: str, plan: TransferPlan) -> None: ...
