"""The caller's side of a call: its stream ending, dropping, moving, and a new one resuming it.

A stream that ends with Twilio's `stop` is the caller hanging up (or a REST update we made). One
that just closes has dropped, or was closed by us to move the call (a deploy): the call is held,
agent and all, for STREAM_RESUME_GRACE_S until a new stream comes: here (`adopt`), or on another
instance, which asks this one to let go (`release`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from gateway.call.legs import AgentLeg, CarrierLeg
from gateway.call.playout import Playout
from gateway.call.states import State
from gateway.registry.base import CallRecord, SessionRegistry

# Moving a call (a deploy) waits at most this long for a quiet moment: the agent's queued
# speech played out.
MOVE_QUIET_S = 3.0
# Part of it: the agent has sent no audio for this long (as before an end_call).
MOVE_AGENT_QUIET_S = 0.7
# Closing a socket that does not answer is abandoned after this long.
CLOSE_TIMEOUT_S = 2.0


class CallerSide:
    """Mixed into gateway.call.session.Session, whose attributes these are."""

    call_sid: str
    record: CallRecord
    log: Any
    playout: Playout
    state: State
    intent: State | None
    outcome: str
    carrier_gone: bool
    moving: bool
    released: bool
    agent_socket: AgentLeg | None
    _registry: SessionRegistry
    _bridge: Any
    _redirected: bool
    _resume_grace_s: float
    _new_stream: asyncio.Event
    _agent_left_event: asyncio.Event

    # Provided by Session.
    if TYPE_CHECKING:
        carrier: CarrierLeg | None
        busy_leaving: bool
        done: bool

        def _finish(self, outcome: str) -> None: ...
        async def _transition(self, state: State, **fields: Any) -> None: ...
        async def _hang_up(self, outcome: str) -> None: ...

    def carrier_ended(self, call_status: str) -> None:
        """The carrier reports the call over (status callback): stop bridging, hang up nothing."""
        self.log.info("carrier_call_ended", call_status=call_status)
        self._finish(f"call_{call_status}")

    async def adopt(self, carrier: CarrierLeg, session_hash: str) -> None:
        """A new stream for this call reached this instance (after its stream dropped): it
        replaces the old one, and the agent goes on as it was."""
        old = self.carrier
        self.record.session_hash = session_hash  # the registry's record names the new stream
        self._bridge.replace_carrier(carrier)
        self.carrier_gone = False
        self._new_stream.set()
        self.log.info("stream_resumed", same_instance=True)
        self.moving = False
        with contextlib.suppress(Exception):
            await self._registry.update(self.call_sid, resume_reason="")
        if old is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await old.close(1000, "replaced by a newer stream")

    async def release(self) -> None:
        """Another instance has the call's new stream: end this session without touching the
        call (its record and control URL are the new session's now). Returns once the agent's
        socket is closed, so that the new session's agent is the only one."""
        self.released = True
        self._new_stream.set()
        self._finish("moved")
        if self.agent_socket is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self.agent_socket.close(1000, "call moved")

    async def move(self) -> None:
        """Hand the call to another instance (a deploy): at a quiet moment, close the stream so
        that Twilio runs the TwiML after `</Connect>`, whose `<Redirect>` brings the call back
        through the public URL to an instance that is ready. Held here until it lands."""
        if self.busy_leaving or self.carrier is None or self.done or self.moving:
            return
        await self.playout.agent_quiet(MOVE_AGENT_QUIET_S, MOVE_QUIET_S, self._agent_left_event)
        await self.playout.played_out(MOVE_QUIET_S)
        if self.busy_leaving or self.done:
            return
        self.moving = True
        with contextlib.suppress(Exception):
            await self._registry.update(self.call_sid, resume_reason="instance_draining")
        self.log.info("call_moving")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.carrier.close(1000, "moving to another instance")

    # The caller's side

    async def _uplink(self) -> None:
        while True:
            stopped = await self._bridge.uplink()
            if stopped or self.busy_leaving or self._redirected or self.released or self.done:
                break
            if not await self._hold_for_new_stream():
                break
        if self.released:
            return
        await self.caller_left("caller_hung_up" if stopped or self.busy_leaving else "stream_lost")

    async def _hold_for_new_stream(self) -> bool:
        """The stream closed without `stop`: it dropped, or we closed it to move the call. Hold
        the call (the agent stays) until a new stream comes, here or elsewhere; False when none
        came within the grace."""
        self.carrier_gone = True
        self._new_stream.clear()
        self.log.warning("stream_held", moving=self.moving, grace_s=self._resume_grace_s)
        if not self.moving:  # (a move wrote its own reason before closing the stream)
            # What lets /twilio/continue answer a new stream: without it, the call's stream is
            # taken to be up, and a replayed continue request gets nothing.
            with contextlib.suppress(Exception):
                await self._registry.update(self.call_sid, resume_reason="stream_dropped")
        try:
            async with asyncio.timeout(self._resume_grace_s):
                await self._new_stream.wait()
        except TimeoutError:
            self.log.error("stream_not_resumed", waited_s=self._resume_grace_s)
            return False
        return not self.released

    async def caller_left(self, cause: str = "caller_hung_up") -> None:
        self.carrier_gone = True
        if self._redirected:
            # The stream's stop after the transfer's REST update, not a hang-up. The transfer
            # task finishes the call once all its steps are done (a warm transfer has several).
            return
        if self.intent == State.TRANSFERRING or self.state == State.TRANSFERRING:
            # The caller hung up while the transfer waited for the agent's last words: a
            # hang-up, and nobody is dialled.
            self.log.info(cause, during="transfer_drain")
            self.outcome = self.outcome or cause
            await self._transition(State.ENDED, cause=cause)
            self._finish(cause)
            return
        if self.state == State.ENDING:
            self._finish(self.outcome or "ended")
            return
        self.log.info(cause)
        if cause == "stream_lost":  # the call may still be up at Twilio, in silence: end it
            await self._hang_up(cause)
            return
        await self._transition(State.ENDING, cause=cause)
        self._finish(cause)
