"""The two sides of a call's bridge, and the carrier's call control, as the session sees them.

The session knows neither Twilio nor Cartesia: legs hand it neutral events (gateway.events)
and take audio, marks and DTMF from it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from gateway.call.actions import TransferPlan
from gateway.events import AgentEvent, CarrierEvent, ProtocolError
from gateway.liveness import Liveness


class AgentUnavailable(RuntimeError):
    """The agent could not be had: refused, unreachable, or no `ack`. `status`: the HTTP status
    of a refused handshake (0 when there was none); `retry`: whether trying again may help (not
    for a refused key or an agent that does not exist)."""

    def __init__(self, message: str, status: int = 0, *, retry: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retry = retry


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


class CallMetrics(Protocol):
    """What a call reports to the gateway's metrics (gateway.metrics.Metrics), per event."""

    def agent_reconnect(self, reason: str) -> None: ...
    def fallback(self, kind: str) -> None: ...


class CallControl(Protocol):
    """What the carrier's REST API does to a live call."""

    async def hangup(self, call_sid: str) -> bool: ...
    async def transfer(self, call_sid: str, plan: TransferPlan) -> None: ...
    async def fall_back(self, call_sid: str, fallback: Sequence[str]) -> None:
        """What the caller gets when the agent cannot be had: [kind, argument] (AGENT_FALLBACK)."""
        ...
