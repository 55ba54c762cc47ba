"""A call: its state machine and the bridge between the caller's leg and the agent's leg.

One call is one task group (uplink, downlink, inbox, watchdog); whichever way the call ends,
one `finally` closes both sockets and removes the registry entry. What the caller hears goes
through the call's `Playout`. A dropped agent is reopened (gateway.call.agent_link); a stream
that closes without Twilio's `stop` is held for a new one, here or on another instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from gateway.call.actions import Action, ActionRefused, EndCall, SendDtmf, TransferPlan, admit
from gateway.call.agent_link import AgentLink, AgentOpener
from gateway.call.agent_side import AgentSide
from gateway.call.bridge import Bridge, EventSink
from gateway.call.caller_side import CLOSE_TIMEOUT_S, CallerSide
from gateway.call.legs import AgentLeg, CallControl, CallMetrics, CarrierLeg
from gateway.call.playout import Playout
from gateway.call.states import FINAL, LEAVING, State, check_transition
from gateway.call.watchdog import watch
from gateway.recording import CallRecorder, save_recording
from gateway.registry.base import TRANSFERRED_TTL_S, CallRecord, SessionRegistry

log = structlog.get_logger(__name__)

# Control actions queued for the call; a full inbox answers "busy" rather than growing.
INBOX_SIZE = 8
# Before an end_call or a transfer asked for through the control API, the agent is given this
# long, from the request on, without sending audio: a Line agent's tool POSTs at once, while the
# goodbye it spoke just before is still being synthesised, and its audio can arrive after the
# POST. Part of END_CALL_DRAIN_S; an agent that closes its socket ends the wait at once.
AGENT_QUIET_S = 0.7

TransferPlanner = Callable[[CallRecord, dict[str, Any]], TransferPlan]


def _no_events(*_args: Any, **_kwargs: Any) -> None:
    pass


class Session(CallerSide, AgentSide):
    """One live call on this instance."""

    def __init__(
        self,
        record: CallRecord,
        *,
        registry: SessionRegistry,
        control: CallControl,
        open_agent: AgentOpener,
        plan_transfer: TransferPlanner,
        output_format: str,
        end_call_drain_s: float,
        emit: EventSink = _no_events,
        recorder: CallRecorder | None = None,
        recordings_dir: str = "",
        fallback: Sequence[str] = ("hangup", ""),
        max_reconnects: int = 3,
        resume_grace_s: float = 10.0,
        resume_reason: str = "",
        metrics: CallMetrics | None = None,
    ) -> None:
        self.record = record
        self.call_sid = record.call_sid
        self._registry = registry
        self._control = control
        self._plan_transfer = plan_transfer
        self._drain_s = end_call_drain_s
        self._emit = emit
        self._recorder = recorder
        self._recordings_dir = recordings_dir
        self._live_since: float | None = None
        self.log = log.bind(call_sid=record.call_sid)
        self.playout = Playout(output_format, self.log, recorder)
        self._bridge = Bridge(record.call_sid, self.playout, self.log, emit, recorder)
        # The agent's socket from the moment it opens (for cleanup and the watchdog); the
        # bridge sends to it once the frames held before the ack have gone out.
        self.agent_socket: AgentLeg | None = None
        self.agent_gone = False
        self._agent_left_event = asyncio.Event()
        self.carrier_gone = False
        self._inbox: asyncio.Queue[Action] = asyncio.Queue(INBOX_SIZE)
        self._finished = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self.outcome = ""
        self.state = State(record.state)
        # Where an accepted end or transfer is taking the call, set before its task runs, so
        # that a second request sees it at once (409, or 200 for a repeated end_call).
        self.intent: State | None = None
        self._redirected = False  # the transfer's REST update has been sent (its stop follows)
        self._link = AgentLink(record, open_agent, self.log, max_reconnects, metrics)
        self._metrics = metrics
        self._fallback = list(record.fallback or fallback)
        self._resume_grace_s = resume_grace_s
        self._resume_reason = resume_reason  # why this session resumes the call ("" a new call)
        self._new_stream = asyncio.Event()  # a new stream adopted, or the call taken elsewhere
        self.moving = False  # we closed the stream so that Twilio brings the call back elsewhere
        self.released = False  # another instance has the call now: end here, touch nothing

    @property
    def carrier(self) -> CarrierLeg | None:
        return self.playout.carrier

    @property
    def busy_leaving(self) -> bool:
        """An end or transfer is accepted or under way."""
        return bool(self.intent) or self.state in LEAVING

    # State

    async def _transition(self, state: State, **fields: Any) -> None:
        if state == self.state:
            return
        check_transition(self.call_sid, self.state, state)
        self.log.info("call_state", state=state, previous=self.state, **fields)
        self.state = self.record.state = state
        self.playout.leaving = state in LEAVING
        try:
            if state in FINAL or self.released:
                return  # written by _cleanup, and only if the entry is still this session's
            await self._registry.set_state(self.call_sid, state)
        except Exception as exc:  # a registry outage never stops a call
            self.log.warning("registry_state_not_saved", state=state, error=str(exc))

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    async def wait(self) -> None:
        await self._finished.wait()

    # Running the call

    async def run(self, carrier: CarrierLeg) -> None:
        """Bridge the call until it ends, however it ends. Returns when everything is closed."""
        self.playout.carrier = carrier
        await self._transition(State.CONNECTING)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tasks = [
                    tg.create_task(self._uplink(), name=f"uplink-{self.call_sid}"),
                    tg.create_task(self._connect_and_downlink(), name=f"downlink-{self.call_sid}"),
                    tg.create_task(self._serve_inbox(), name=f"inbox-{self.call_sid}"),
                    tg.create_task(watch(self), name=f"watch-{self.call_sid}"),
                ]
                await self._finished.wait()
                for task in self._tasks:
                    task.cancel()
        except* Exception as group:
            for exc in group.exceptions:
                self.log.error("call_failed", error=repr(exc), exc_info=exc)
            self.outcome = self.outcome or "error"
        finally:
            # The finished tasks keep their CancelledError, whose traceback holds the frames
            # that hold this session: without this, every ended call would stay in memory as a
            # cycle until the next full garbage collection.
            self._tasks = []
            self._finished.set()
            await self._cleanup()

    def _finish(self, outcome: str) -> None:
        if not self.outcome:
            self.outcome = outcome
        self._finished.set()

    async def _cleanup(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                if self.agent_socket is not None:
                    transferred = self.state in (State.TRANSFERRING, State.TRANSFERRED)
                    why = "call transferred" if transferred else "call ended"
                    await self.agent_socket.close(1000, "call moved" if self.released else why)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                if self.carrier is not None:
                    await self.carrier.close(1000)
        if self.released:  # the call goes on, on the instance its new stream reached
            self.log.info("call_moved_away")
            with contextlib.suppress(Exception):
                # Forgets our copy (never restored after a Redis restart); the record itself
                # names the new session, so it stays.
                await self._registry.delete(self.call_sid, self.record.session_hash)
            return
        final = State.TRANSFERRED if self.state == State.TRANSFERRING else State.ENDED
        if self.state not in FINAL:
            await self._transition(final, outcome=self.outcome or "ended")
        try:
            # Only if the entry is still this session's (its control token): after a transfer
            # nobody took, or a stream handed over to another instance, a newer session of the
            # same call has its own entry, which must not be touched.
            if self.state != State.TRANSFERRED:
                await self._registry.delete(self.call_sid, self.record.session_hash)
            elif (current := await self._registry.get(self.call_sid)) is not None and (
                current.session_hash == self.record.session_hash
            ):
                # Kept a while (with what the transfer wrote to it): if nobody takes the
                # transfer, the caller comes back to an agent with this call's metadata. Its
                # token is dead already (final state: 404).
                current.state = State.TRANSFERRED
                await self._registry.put(current, TRANSFERRED_TTL_S)
        except Exception as exc:
            self.log.warning("registry_cleanup_failed", error=str(exc))
        duration = 0.0 if self._live_since is None else time.monotonic() - self._live_since
        self._emit(
            "call.ended", self.call_sid, outcome=self.outcome, state=self.state, duration_s=round(duration, 3)
        )
        self.log.info("call_closed", outcome=self.outcome, state=self.state)
        if self._recorder is not None and self._recordings_dir:
            await save_recording(self._recorder, self._recordings_dir, self.call_sid, self.log)

    # Ending

    async def _drain(self, *, after_agent_quiet: bool = False) -> None:
        """Wait until the caller has heard everything the agent said (bounded by the audio
        queued plus END_CALL_DRAIN_S); first, with `after_agent_quiet`, until the agent has
        sent no audio for AGENT_QUIET_S (or has left)."""
        budget = self._drain_s
        if after_agent_quiet:
            started = time.monotonic()
            await self.playout.agent_quiet(AGENT_QUIET_S, budget, self._agent_left_event)
            budget = max(0.0, budget - (time.monotonic() - started))
        await self.playout.played_out(budget)

    async def _hang_up(self, outcome: str) -> None:
        # Set now: the REST hang-up ends the stream, and the uplink may finish the call first.
        self.outcome = self.outcome or outcome
        if self.state not in LEAVING:
            await self._transition(State.ENDING, cause=outcome)
        try:
            await self._control.hangup(self.call_sid)
        except Exception as exc:
            # Closing the media socket runs the TwiML after </Connect>, which hangs up too.
            self.log.error("hangup_failed", error=str(exc))
        self._finish(outcome)

    # Control actions: validated by the control API, carried out here in the call's tasks

    def submit(self, action: Action) -> None:
        """Accept an action for this call, or raise ActionRefused (409 and friends)."""
        if not admit(self.intent or self.state, action):
            return  # a repeated end_call: already under way
        if isinstance(action, SendDtmf) and self.carrier is None:
            raise ActionRefused(409, "call_not_live", "the call has no media stream yet")
        try:
            self._inbox.put_nowait(action)
        except asyncio.QueueFull:
            raise ActionRefused(409, "call_busy", "the call has too many actions pending") from None
        if isinstance(action, EndCall):
            self.intent = State.ENDING
        elif isinstance(action, TransferPlan):
            self.intent = State.TRANSFERRING

    async def _serve_inbox(self) -> None:
        while True:
            action = await self._inbox.get()
            match action:
                case EndCall(reason):
                    await self._end_call(reason)
                case TransferPlan():
                    await self._transfer(action)
                case SendDtmf(digits):
                    await self._bridge.play_dtmf(digits)

    async def _end_call(self, reason: str) -> None:
        await self._transition(State.ENDING, cause="end_call", reason=reason)
        await self._drain(after_agent_quiet=True)
        await self._hang_up("end_call")

    async def _transfer(self, plan: TransferPlan) -> None:
        # Marked in the registry before the REST update, so the stream's `stop` that the
        # update causes is not taken for the caller hanging up.
        await self._transition(State.TRANSFERRING, target=plan.target, mode=plan.mode)
        await self._drain(after_agent_quiet=True)
        if self.carrier_gone:  # the caller hung up during the drain (caller_left ended the call)
            return
        self._redirected = True
        # Emitted first: the update's `stop` may end this task before the REST call returns.
        self.log.info("transfer_started", target=plan.target)
        self._emit("transfer.started", self.call_sid, destination=plan.target, mode=plan.mode)
        try:
            await self._control.transfer(self.call_sid, plan)
        except Exception as exc:
            self.log.error("transfer_failed", target=plan.target, error=str(exc))
            self._emit(
                "transfer.failed", self.call_sid, destination=plan.target, mode=plan.mode, error=str(exc)
            )
            if self.carrier_gone:  # the caller hung up while we waited: nothing to transfer
                await self._transition(State.ENDED, cause="caller_hung_up")
                self._finish("caller_hung_up")
                return
            self.intent = None
            self._redirected = False  # no update went through: a stop from now on is a hang-up
            if self.agent_gone:  # nobody left to talk to: do not leave the caller in silence
                await self._hang_up("transfer_failed")
                return
            await self._transition(State.LIVE, cause="transfer_failed")
            return
        self._finish("transferred")

    @property
    def dropped_before_agent(self) -> int:
        """Caller frames dropped while no agent took them (past the hold's bound)."""
        return self._bridge.dropped_before_agent

    def snapshot(self) -> dict[str, Any]:
        return {**self.record.public(), "state": self.state, "heard_s": self.playout.playback.heard_s}
