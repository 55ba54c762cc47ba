"""A call: its state machine and the bridge between the caller's leg and the agent's leg.

The session knows neither Twilio nor Cartesia: legs hand it neutral events (gateway.events)
and take audio, marks and DTMF from it. One call is one task group (uplink, downlink, inbox);
whichever way the call ends, one `finally` closes both sockets and removes the registry entry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from gateway.agents.cartesia import decode_payload, ended_by_agent
from gateway.audio import DownlinkConverter, dtmf_mulaw, mulaw_duration_s
from gateway.events import (
    AgentAudio,
    AgentClear,
    AgentCustom,
    AgentDtmf,
    AgentEvent,
    AgentTransfer,
    AgentUnknown,
    CallerAudio,
    CallerDtmf,
    CarrierEvent,
    PlaybackMark,
    ProtocolError,
    StreamStopped,
)
from gateway.liveness import WATCH_EVERY_S, Liveness
from gateway.recording import CallRecorder, recording_path
from gateway.registry.base import LIVE_TTL_S, CallRecord, SessionRegistry

log = structlog.get_logger(__name__)

# Caller frames that arrive before the agent's `ack` are held, then sent in order. 250 frames
# of 20 ms is 5 s of speech (~75 KiB); past that the oldest are dropped, and that is logged.
PENDING_UPLINK_FRAMES = 250
# A mark every second of agent audio tells the session what the caller has heard. Each mark is
# a frame out and its echo a frame in, as costly as an audio frame: once a second adds 2 % to
# a call's 50 frames a second each way (twice a second was 4 %). The drain before a hang-up or
# transfer forces a last mark, so how soon the end is known does not depend on this.
# Outstanding marks are capped: Twilio buffers at most ~10 min of audio, which is 600 marks;
# past the cap no new marks are sent until echoes come back (the drain mark is always sent).
MARK_EVERY_S = 1.0
MAX_OUTSTANDING_MARKS = 600
# Control actions queued for the call; a full inbox answers "busy" rather than growing.
INBOX_SIZE = 8
# A transferred call's record outlives its session this long, for the transfer's outcome.
TRANSFERRED_TTL_S = 3600
# Closing a socket that does not answer is abandoned after this long.
CLOSE_TIMEOUT_S = 2.0


class State:
    DIALING = "dialing"  # an outbound call we started, not answered yet
    RINGING = "ringing"
    CONNECTING = "connecting"
    LIVE = "live"
    ENDING = "ending"
    TRANSFERRING = "transferring"
    ENDED = "ended"
    TRANSFERRED = "transferred"

    FINAL = frozenset({ENDED, TRANSFERRED})
    LEAVING = frozenset({ENDING, TRANSFERRING, ENDED, TRANSFERRED})


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
AgentOpener = Callable[[CallRecord], Awaitable[AgentLeg]]
EventSink = Callable[..., None]  # emit(event_type, call_sid, **data): never blocks


def _no_events(*_args: Any, **_kwargs: Any) -> None:
    pass


TransferPlanner = Callable[[CallRecord, dict[str, Any]], TransferPlan]


class ActionRefused(Exception):
    """A control action the call cannot take now; `code` is the control API's error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class LogThrottle:
    """The first few of a kind in full, then every hundredth: a broken peer must not make
    logging the bottleneck."""

    def __init__(self, first: int = 5, every: int = 100) -> None:
        self.count = 0
        self._first, self._every = first, every

    def allow(self) -> bool:
        self.count += 1
        return self.count <= self._first or self.count % self._every == 0


class Playback:
    """What the caller has heard, from Twilio's mark echoes. Pure bookkeeping, no I/O."""

    def __init__(self) -> None:
        self._marks: deque[tuple[str, float]] = deque()
        self._serial = 0
        self.sent_s = 0.0  # agent audio sent since the last clear, in seconds
        self.heard_s = 0.0  # of which the caller has heard at least this much
        self.marked_s = 0.0  # audio covered by the newest mark
        self.played_out = asyncio.Event()
        self.played_out.set()

    @property
    def unplayed_s(self) -> float:
        return self.sent_s - self.heard_s

    def sent(self, seconds: float) -> None:
        self.sent_s += seconds
        self.played_out.clear()

    def next_mark(self, *, force: bool = False) -> str | None:
        """Name of a mark to send now, or None if none is due."""
        due = self.sent_s - self.marked_s
        if due <= 0 or (not force and (due < MARK_EVERY_S or len(self._marks) >= MAX_OUTSTANDING_MARKS)):
            return None
        self._serial += 1
        name = f"m{self._serial}"
        self._marks.append((name, self.sent_s))
        self.marked_s = self.sent_s
        return name

    def echoed(self, name: str) -> None:
        if not any(mark == name for mark, _ in self._marks):
            return  # a void mark (sent before a clear) or one we never sent
        while self._marks:  # marks echo in order: every earlier one has played too
            mark, at = self._marks.popleft()
            self.heard_s = max(self.heard_s, at)
            if mark == name:
                break
        if not self._marks and self.marked_s >= self.sent_s:
            self.played_out.set()

    def void(self) -> None:
        """After a clear: nothing is queued any more, and outstanding marks prove nothing."""
        self._marks.clear()
        self.sent_s = self.heard_s = self.marked_s = 0.0
        self.played_out.set()


class Session:
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
    ) -> None:
        self.record = record
        self.call_sid = record.call_sid
        self._registry = registry
        self._control = control
        self._open_agent = open_agent
        self._plan_transfer = plan_transfer
        self._output_format = output_format
        self._drain_s = end_call_drain_s
        self._emit = emit
        self._recorder = recorder
        self._recordings_dir = recordings_dir
        self._live_since: float | None = None
        # Twilio's media timestamps count from each stream's start; after a handover the new
        # stream's are shifted by when it began, so the recording stays in time.
        self._stream_started = time.monotonic()
        self._caller_offset_s = 0.0
        self._log = log.bind(call_sid=record.call_sid)
        self._carrier: CarrierLeg | None = None
        self._agent: AgentLeg | None = None
        self._pending: deque[CallerAudio | CallerDtmf] = deque(maxlen=PENDING_UPLINK_FRAMES)
        # The agent's socket from the moment it opens (for cleanup), before `_agent` is set
        # (for sending, once the frames held before the ack have gone out in order).
        self._agent_socket: AgentLeg | None = None
        self._agent_gone = False
        self._agent_noise = LogThrottle()
        self._pending_dropped = 0
        self._converter = DownlinkConverter(output_format)
        self.playback = Playback()
        self._inbox: asyncio.Queue[Action] = asyncio.Queue(INBOX_SIZE)
        self._finished = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self.outcome = ""
        self.state = record.state
        # Set when an end or transfer is accepted, before its task runs, so that a second
        # request sees it at once (409, or 200 for a repeated end_call).
        self._intent: str | None = None
        self._carrier_gone = False

    # State

    async def _transition(self, state: str, **fields: Any) -> None:
        if state == self.state:
            return
        self._log.info("call_state", state=state, previous=self.state, **fields)
        self.state = self.record.state = state
        try:
            if state in State.FINAL:
                return  # written by _cleanup, and only if the entry is still this session's
            await self._registry.set_state(self.call_sid, state)
        except Exception as exc:  # a registry outage never stops a call
            self._log.warning("registry_state_not_saved", state=state, error=str(exc))

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    async def wait(self) -> None:
        await self._finished.wait()

    # Running the call

    async def run(self, carrier: CarrierLeg) -> None:
        """Bridge the call until it ends, however it ends. Returns when everything is closed."""
        self._carrier = carrier
        await self._transition(State.CONNECTING)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tasks = [
                    tg.create_task(self._uplink(), name=f"uplink-{self.call_sid}"),
                    tg.create_task(self._connect_and_downlink(), name=f"downlink-{self.call_sid}"),
                    tg.create_task(self._serve_inbox(), name=f"inbox-{self.call_sid}"),
                    tg.create_task(self._watch(), name=f"watch-{self.call_sid}"),
                ]
                await self._finished.wait()
                for task in self._tasks:
                    task.cancel()
        except* Exception as group:
            for exc in group.exceptions:
                self._log.error("call_failed", error=repr(exc), exc_info=exc)
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
                if self._agent_socket is not None:
                    transferred = self.state in (State.TRANSFERRING, State.TRANSFERRED)
                    await self._agent_socket.close(1000, "call transferred" if transferred else "call ended")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                if self._carrier is not None:
                    await self._carrier.close(1000)
        final = State.TRANSFERRED if self.state == State.TRANSFERRING else State.ENDED
        if self.state not in State.FINAL:
            await self._transition(final, outcome=self.outcome or "ended")
        try:
            # Only if the entry is still this session's: after a transfer nobody took, a newer
            # agent session for the same call has its own entry, which must not be touched.
            current = await self._registry.get(self.call_sid)
            if current is not None and current.session_hash == self.record.session_hash:
                if self.state == State.TRANSFERRED:
                    # Kept a while (with what the transfer wrote to it): if nobody takes the
                    # transfer, the caller comes back to an agent with this call's metadata.
                    # Its token is dead already (final state: 404).
                    current.state = State.TRANSFERRED
                    await self._registry.put(current, TRANSFERRED_TTL_S)
                else:
                    await self._registry.delete(self.call_sid)
        except Exception as exc:
            self._log.warning("registry_cleanup_failed", error=str(exc))
        duration = 0.0 if self._live_since is None else time.monotonic() - self._live_since
        self._emit(
            "call.ended", self.call_sid, outcome=self.outcome, state=self.state, duration_s=round(duration, 3)
        )
        self._log.info("call_closed", outcome=self.outcome, state=self.state)
        if self._recorder is not None and self._recordings_dir:
            await self._save_recording()

    def _record_caller(self, event: CallerAudio) -> None:
        try:
            mulaw = decode_payload(event.payload)
        except ProtocolError:
            return
        at_s = None if event.timestamp_ms is None else event.timestamp_ms / 1000 + self._caller_offset_s
        self._recorder.caller(mulaw, at_s)  # type: ignore[union-attr]

    async def _save_recording(self) -> None:
        assert self._recorder is not None
        try:
            path = recording_path(self._recordings_dir, self.call_sid)
            serial = 1
            while path.exists():  # a later agent session of the same call (after a transfer)
                serial += 1
                path = path.with_name(f"{self.call_sid}-{serial}.wav")
            # pydub writes synchronously; a long call's WAV must not stall other calls.
            await asyncio.to_thread(self._recorder.write_wav, path)
        except Exception as exc:
            self._log.error("recording_not_saved", error=str(exc))
            return
        self._log.info("recording_saved", path=str(path), duration_s=round(self._recorder.duration_s, 2))

    def carrier_ended(self, call_status: str) -> None:
        """The carrier reports the call over (status callback): stop bridging, hang up nothing."""
        self._log.info("carrier_call_ended", call_status=call_status)
        self._finish(f"call_{call_status}")

    async def adopt(self, carrier: CarrierLeg) -> None:
        """A second media socket for this call (network handover): the newest one wins."""
        old, self._carrier = self._carrier, carrier
        self.playback.void()
        self._caller_offset_s = time.monotonic() - self._stream_started
        self._log.info("carrier_replaced")
        if old is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await old.close(1000, "replaced by a newer stream")

    # Uplink: caller -> agent

    async def _uplink(self) -> None:
        malformed = LogThrottle()
        while True:
            carrier = self._carrier
            assert carrier is not None
            async for event in carrier.events():
                if carrier is not self._carrier:
                    break  # replaced mid-iteration: its last frames do not matter
                match event:
                    case CallerAudio():
                        if self._recorder is not None:
                            self._record_caller(event)
                        if self._agent is not None:
                            await self._agent.send_audio(event.payload)
                        else:
                            self._hold(event)
                    case PlaybackMark(name):
                        self.playback.echoed(name)
                    case CallerDtmf(digit):
                        self._log.info("caller_dtmf", digit=digit)
                        self._emit("dtmf", self.call_sid, digits=digit, source="caller")
                        if self._agent is not None:
                            await self._agent.send_dtmf(digit)
                        else:
                            self._hold(event)
                    case StreamStopped():
                        break
                    case ProtocolError():
                        if malformed.allow():
                            count = malformed.count
                            self._log.warning("carrier_frame_dropped", error=str(event), count=count)
            if carrier is self._carrier:
                break  # this stream ended (stop, or closed) and no newer one replaced it
        await self._caller_left()

    def _hold(self, event: CallerAudio | CallerDtmf) -> None:
        if len(self._pending) == PENDING_UPLINK_FRAMES:
            self._pending_dropped += 1
        self._pending.append(event)

    async def _caller_left(self, cause: str = "caller_hung_up") -> None:
        self._carrier_gone = True
        if self._intent == State.TRANSFERRING or self.state in (State.TRANSFERRING, State.TRANSFERRED):
            # The stream's stop after a redirect, not a hang-up. The transfer task finishes
            # the call once all its steps are done (a warm transfer has several).
            return
        if self.state == State.ENDING:
            self._finish(self.outcome or "ended")
            return
        self._log.info(cause)
        await self._transition(State.ENDING, cause=cause)
        self._finish(cause)

    async def _watch(self) -> None:
        """End the call when a leg is dead: a carrier silent for too long, or a send to either
        side that has waited too long (the peer stopped reading). Reads the legs' Liveness."""
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            now = time.monotonic()
            carrier = self._carrier
            if carrier is not None and not self._carrier_gone:
                lv = carrier.liveness
                if carrier.silent_after_s is not None and lv.silent_s(now) > carrier.silent_after_s:
                    self._log.warning("carrier_silent", silent_s=round(lv.silent_s(now), 1))
                    await self._caller_left("carrier_silent")
                elif lv.send_stalled_s(now) > carrier.stalled_after_s:
                    self._log.warning("carrier_not_reading", waited_s=round(lv.send_stalled_s(now), 1))
                    await self._caller_left("carrier_not_reading")
            agent = self._agent_socket
            if agent is None or self._agent_gone:
                continue
            # A dead agent is dropped in every state: a send stuck on it would stall the uplink
            # (and so the carrier's liveness) even while the call is ending or transferring.
            # The downlink then sees it gone and, unless an end or transfer is under way, hangs
            # up: the caller is not left in silence.
            busy = bool(self._intent) or self.state in State.LEAVING
            stalled = agent.liveness.send_stalled_s(now)
            if stalled > agent.stalled_after_s:
                self._log.warning("agent_not_reading", waited_s=round(stalled, 1))
                self._drop_agent(agent, "agent_not_reading", busy)
            elif not busy and not await agent.keepalive(now):
                self._log.warning("agent_unresponsive", reason="no pong")
                self._drop_agent(agent, "agent_unresponsive", busy)

    def _drop_agent(self, agent: AgentLeg, outcome: str, busy: bool) -> None:
        if not busy:
            self.outcome = self.outcome or outcome
        agent.abort()

    # Downlink: agent -> caller

    async def _connect_and_downlink(self) -> None:
        try:
            agent = await self._open_agent(self.record)
        except Exception as exc:
            self._log.error("agent_unavailable", error=str(exc))
            await self._hang_up("agent_unavailable")
            return
        self._agent_socket = agent
        while self._pending:  # what the caller said and pressed before the ack, in order
            held = self._pending.popleft()
            if isinstance(held, CallerDtmf):
                await agent.send_dtmf(held.digit)
            else:
                await agent.send_audio(held.payload)
        if self._pending_dropped:
            self._log.warning("uplink_frames_dropped_before_ack", count=self._pending_dropped)
        self._agent = agent
        if self.state == State.CONNECTING:
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
        await self._downlink(agent)

    async def _downlink(self, agent: AgentLeg) -> None:
        async for event in agent.events():
            match event:
                case AgentAudio(payload):
                    await self._play(payload)
                case AgentClear():
                    await self._barge_in()
                case AgentDtmf(digits):
                    await self._play_dtmf(digits)
                case AgentCustom(metadata):
                    self._log.info("agent_custom", metadata=metadata)
                    self._emit("agent.custom", self.call_sid, metadata=metadata)
                case AgentTransfer():
                    await self._agent_transfer(event)
                case AgentUnknown(name):
                    if self._agent_noise.allow():
                        self._log.info("agent_event_ignored", agent_event=name, count=self._agent_noise.count)
                case ProtocolError():
                    if self._agent_noise.allow():
                        count = self._agent_noise.count
                        self._log.warning("agent_frame_dropped", error=str(event), count=count)
        await self._agent_left(agent.close_code, agent.close_reason)

    async def _play(self, payload_b64: str) -> None:
        carrier = self._carrier
        if carrier is None:
            return
        try:
            audio = decode_payload(payload_b64)
            # mu-law 8 kHz goes to Twilio as it came, without re-encoding
            mulaw = audio if self._converter.passthrough else self._converter.convert(audio)
        except ValueError as exc:  # ProtocolError (base64) or AudioFormatError
            self._log.warning("agent_frame_dropped", error=str(exc))
            return
        if not mulaw:
            return  # the resampler is still filling
        await carrier.send_audio(payload_b64 if mulaw is audio else base64.b64encode(mulaw).decode())
        if self._recorder is not None:
            self._recorder.agent(mulaw)
        playback = self.playback
        playback.sent(mulaw_duration_s(len(mulaw)))
        # inline rather than `_mark()`: this runs for every frame, and a mark is due once a second
        name = playback.next_mark(force=self.state in State.LEAVING)
        if name is not None:
            await carrier.send_mark(name)

    async def _play_tail(self) -> None:
        """The resampler holds a few ms of the agent's last words; play them too."""
        if self._converter.passthrough or self._carrier is None:
            return
        tail = self._converter.flush()
        if tail:
            await self._carrier.send_audio(base64.b64encode(tail).decode())
            if self._recorder is not None:
                self._recorder.agent(tail)
            self.playback.sent(mulaw_duration_s(len(tail)))

    async def _mark(self, *, force: bool = False) -> None:
        name = self.playback.next_mark(force=force)
        if name is not None and self._carrier is not None:
            await self._carrier.send_mark(name)

    async def _barge_in(self) -> None:
        self._log.info("agent_clear", unplayed_s=round(self.playback.unplayed_s, 3))
        if self._carrier is not None:
            await self._carrier.send_clear()
        self._converter.reset()
        self.playback.void()
        if self._recorder is not None:
            self._recorder.agent_cleared()

    async def _play_dtmf(self, digits: str) -> None:
        try:
            tones = dtmf_mulaw(digits)
        except ValueError as exc:
            self._log.warning("dtmf_refused", error=str(exc))
            return
        self._log.info("dtmf_to_caller", digits=digits)
        self._emit("dtmf", self.call_sid, digits=digits, source="agent")
        if self._carrier is not None:
            await self._carrier.send_audio(base64.b64encode(tones).decode())
            if self._recorder is not None:
                self._recorder.agent(tones)
            self.playback.sent(mulaw_duration_s(len(tones)))
            await self._mark(force=True)

    async def _agent_transfer(self, event: AgentTransfer) -> None:
        fields = dict(event.details)
        fields["to"] = event.target
        try:
            self.submit(self._plan_transfer(self.record, fields))
        except ActionRefused as exc:
            self._log.warning("agent_transfer_refused", code=exc.code, error=exc.message)

    async def _agent_left(self, code: int | None, reason: str | None) -> None:
        self._agent_gone = True
        await self._play_tail()
        if self._intent or self.state in State.LEAVING:
            return  # we are ending or transferring; the inbox task finishes the call
        if ended_by_agent(code, reason):
            self._log.info("agent_ended_call", reason=reason)
            await self._transition(State.ENDING, cause="agent_ended_call")
            await self._drain()
            await self._hang_up("agent_ended_call")
        else:
            self._log.warning("agent_disconnected", close_code=code, close_reason=reason)
            await self._hang_up("agent_disconnected")

    # Ending

    async def _drain(self) -> None:
        """Wait until the caller has heard everything the agent said (bounded)."""
        budget = self.playback.unplayed_s + self._drain_s
        try:
            async with asyncio.timeout(budget):
                await self._mark(force=True)
                await self.playback.played_out.wait()
        except TimeoutError:
            self._log.warning("drain_timed_out", waited_s=round(budget, 2))

    async def _hang_up(self, outcome: str) -> None:
        # Set now: the REST hang-up ends the stream, and the uplink may finish the call first.
        self.outcome = self.outcome or outcome
        if self.state not in State.LEAVING:
            await self._transition(State.ENDING, cause=outcome)
        try:
            await self._control.hangup(self.call_sid)
        except Exception as exc:
            # Closing the media socket runs the TwiML after </Connect>, which hangs up too.
            self._log.error("hangup_failed", error=str(exc))
        self._finish(outcome)

    # Control actions: validated by the control module, carried out here in the call's tasks

    def submit(self, action: Action) -> None:
        """Accept an action for this call, or raise ActionRefused (409 and friends)."""
        current = self._intent or self.state
        if current in State.FINAL:
            raise ActionRefused(404, "not_found", "the call has ended")
        if isinstance(action, EndCall):
            if current == State.ENDING:
                return  # a repeated end_call: already under way
            if current == State.TRANSFERRING:
                raise ActionRefused(409, "call_transferring", "the call is being transferred")
        elif current in (State.ENDING, State.TRANSFERRING):
            raise ActionRefused(409, f"call_{current}", f"the call is already {current}")
        if isinstance(action, SendDtmf) and self._carrier is None:
            raise ActionRefused(409, "call_not_live", "the call has no media stream yet")
        try:
            self._inbox.put_nowait(action)
        except asyncio.QueueFull:
            raise ActionRefused(409, "call_busy", "the call has too many actions pending") from None
        if isinstance(action, EndCall):
            self._intent = State.ENDING
        elif isinstance(action, TransferPlan):
            self._intent = State.TRANSFERRING

    async def _serve_inbox(self) -> None:
        while True:
            action = await self._inbox.get()
            match action:
                case EndCall(reason):
                    await self._end_call(reason)
                case TransferPlan():
                    await self._transfer(action)
                case SendDtmf(digits):
                    await self._play_dtmf(digits)

    async def _end_call(self, reason: str) -> None:
        await self._transition(State.ENDING, cause="end_call", reason=reason)
        await self._drain()
        await self._hang_up("end_call")

    async def _transfer(self, plan: TransferPlan) -> None:
        # Marked in the registry before the REST update, so the stream's `stop` that the
        # update causes is not taken for the caller hanging up.
        await self._transition(State.TRANSFERRING, target=plan.target, mode=plan.mode)
        await self._drain()
        # Emitted first: the update's `stop` may end this task before the REST call returns.
        self._log.info("transfer_started", target=plan.target)
        self._emit("transfer.started", self.call_sid, destination=plan.target, mode=plan.mode)
        try:
            await self._control.transfer(self.call_sid, plan)
        except Exception as exc:
            self._log.error("transfer_failed", target=plan.target, error=str(exc))
            self._emit(
                "transfer.failed", self.call_sid, destination=plan.target, mode=plan.mode, error=str(exc)
            )
            if self._carrier_gone:  # the caller hung up while we waited: nothing to transfer
                self._finish("caller_hung_up")
                return
            self._intent = None
            if self._agent_gone:  # nobody left to talk to: do not leave the caller in silence
                await self._hang_up("transfer_failed")
                return
            await self._transition(State.LIVE, cause="transfer_failed")
            return
        self._finish("transferred")

    def snapshot(self) -> dict[str, Any]:
        return {**self.record.public(), "state": self.state, "heard_s": self.playback.heard_s}
