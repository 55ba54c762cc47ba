"""The agent's side of a call: bringing it up (again, after a drop), what it sends that matters
to the call (`transfer_call`, `custom`), its leaving, and the fallback when it cannot be had."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.agents.calls_api import ended_by_agent
from gateway.call.actions import ActionRefused, TransferPlan
from gateway.call.agent_link import AgentLink, bounded_state, drop_reason
from gateway.call.bridge import Bridge, EventSink
from gateway.call.legs import AgentLeg, CallControl, CallMetrics
from gateway.call.playout import Playout
from gateway.call.states import LEAVING, State
from gateway.events import AgentTransfer
from gateway.registry.base import LIVE_TTL_S, CallRecord, SessionRegistry


class AgentSide:
    """Mixed into gateway.call.session.Session, whose attributes these are."""

    call_sid: str
    record: CallRecord
    log: Any
    playout: Playout
    state: State
    outcome: str
    agent_socket: AgentLeg | None
    agent_gone: bool
    released: bool
    _registry: SessionRegistry
    _control: CallControl
    _bridge: Bridge
    _link: AgentLink
    _fallback: list[str]
    _resume_reason: str
    _metrics: CallMetrics | None
    _emit: EventSink
    _live_since: float | None
    _redirected: bool
    _agent_left_event: asyncio.Event
    _plan_transfer: Callable[[CallRecord, dict[str, Any]], TransferPlan]

    # Provided by Session.
    if TYPE_CHECKING:
        busy_leaving: bool

        def _finish(self, outcome: str) -> None: ...
        def submit(self, action: Any) -> None: ...
        async def _transition(self, state: State, **fields: Any) -> None: ...
        async def _hang_up(self, outcome: str) -> None: ...
        async def _drain(self, *, after_agent_quiet: bool = False) -> None: ...

    def drop_agent(self, agent: AgentLeg, outcome: str) -> None:
        """The agent's socket is dead: drop it. The downlink then sees it gone and opens the
        agent again (or, past the call's reconnects, falls back): never silence for good."""
        self.log.warning("agent_dropped", cause=outcome)
        agent.abort()

    # The agent's side

    async def _connect_and_downlink(self) -> None:
        reason = self._resume_reason
        while True:
            agent = await self._link.connect(reason)
            if agent is None:
                await self._fall_back()
                return
            self.agent_socket = agent
            if agent.output_format:
                self.playout.agent_format(agent.output_format)
            await self._bridge.agent_ready(agent)
            if self.state == State.CONNECTING:
                await self._went_live(agent)
            await self._bridge.downlink(agent, self._agent_transfer, self._agent_custom)
            if self.busy_leaving or self.released or not (reason := self._link.reconnect_reason(agent)):
                break
            # Until the new agent's ack, the caller's frames are held (bounded) and then sent.
            self._bridge.agent = None
        await self._agent_left(agent.close_code, agent.close_reason)

    async def _went_live(self, agent: AgentLeg) -> None:
        await self._transition(State.LIVE, stream_id=agent.stream_id)
        self._live_since = time.monotonic()
        r = self.record
        self._emit(
            "call.started",
            self.call_sid,
            agent_id=r.agent_id,
            direction=r.direction,
            **{"from": r.from_, "to": r.to},
        )
        with contextlib.suppress(Exception):
            await self._registry.refresh(self.call_sid, LIVE_TTL_S)

    async def _agent_custom(self, metadata: dict[str, Any]) -> None:
        """Keep the agent's last `custom` metadata with the call: a resumed session gets it."""
        state = bounded_state(metadata)
        if state is None:
            self.log.warning("agent_state_not_kept", reason="custom metadata over the size bound")
            return
        self.record.agent_state = state
        try:
            await self._registry.update(self.call_sid, agent_state=state)
        except Exception as exc:  # a registry outage never stops a call
            self.log.warning("agent_state_not_saved", error=str(exc))

    async def _fall_back(self) -> None:
        """The agent cannot be had: what the operator chose (AGENT_FALLBACK), never silence."""
        kind = self._fallback[0]
        outcome = f"agent_fallback_{kind}"
        self.outcome = self.outcome or outcome
        self.log.error("agent_fallback", kind=kind)
        if self._metrics is not None:
            self._metrics.fallback(f"agent_{kind}")
        if self.state not in LEAVING:
            await self._transition(State.ENDING, cause="agent_unavailable")
        self._redirected = kind != "hangup"  # the update's `stop` is not the caller hanging up
        try:
            await self._control.fall_back(self.call_sid, self._fallback)
        except Exception as exc:
            self.log.error("agent_fallback_failed", error=str(exc))
            with contextlib.suppress(Exception):
                await self._control.hangup(self.call_sid)
        self._finish(outcome)

    def _agent_transfer(self, event: AgentTransfer) -> None:
        if event.unreadable:
            # Never to TRANSFER_TO instead: the agent asked for somewhere, just not legibly.
            self.log.error(
                "agent_transfer_refused",
                reason="the transfer_call event's destination cannot be read",
                fields=list(event.unreadable),
            )
            return
        if not event.target:
            self.log.info("agent_transfer_without_destination", using="TRANSFER_TO")
        fields = dict(event.details)
        fields["to"] = event.target
        try:
            self.submit(self._plan_transfer(self.record, fields))
        except ActionRefused as exc:
            self.log.warning("agent_transfer_refused", code=exc.code, error=exc.message)

    async def _agent_left(self, code: int | None, reason: str | None) -> None:
        self.agent_gone = True
        self._agent_left_event.set()
        if self.busy_leaving or self.released:
            # We are ending or transferring (the inbox task finishes the call), or the call
            # lives on another instance now: nothing here may hang it up.
            return
        if ended_by_agent(code, reason):
            self.log.info("agent_ended_call", reason=reason)
            await self._transition(State.ENDING, cause="agent_ended_call")
            await self._drain()
            await self._hang_up("agent_ended_call")
        elif drop_reason(code, reason):  # dropped again and again: the fallback, not silence
            await self._drain()
            await self._fall_back()
        else:
            self.log.warning("agent_disconnected", close_code=code, close_reason=reason)
            await self._hang_up("agent_disconnected")
