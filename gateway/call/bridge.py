"""The frames of one call between its two legs.

Caller audio and DTMF go to the agent untouched (held, in order, until the agent has
acknowledged the call); the agent's speech, clears and DTMF go to the caller's `Playout`.
What the frames mean for the call (the caller or the agent leaving, a transfer the agent asks
for) is the session's to decide: the bridge only reports it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.agents.calls_api import decode_payload
from gateway.call.legs import AgentLeg, CarrierLeg
from gateway.call.playout import Playout
from gateway.events import (
    AgentAudio,
    AgentClear,
    AgentCustom,
    AgentDtmf,
    AgentTransfer,
    AgentUnknown,
    CallerAudio,
    CallerDtmf,
    PlaybackMark,
    ProtocolError,
    StreamStopped,
)
from gateway.logging import LogThrottle
from gateway.recording import CallRecorder

# Caller frames that arrive before the agent's `ack` are held, then sent in order. 250 frames
# of 20 ms is 5 s of speech (~75 KiB); past that the oldest are dropped, and that is logged.
PENDING_UPLINK_FRAMES = 250

EventSink = Callable[..., None]  # emit(event_type, call_sid, **data): never blocks


class Bridge:
    def __init__(
        self, call_sid: str, playout: Playout, log: Any, emit: EventSink, recorder: CallRecorder | None
    ) -> None:
        self.call_sid = call_sid
        self.playout = playout
        self.agent: AgentLeg | None = None  # set once the frames held before the ack are sent
        self._log = log
        self._emit = emit
        self._recorder = recorder
        self._pending: deque[CallerAudio | CallerDtmf] = deque(maxlen=PENDING_UPLINK_FRAMES)
        self._pending_dropped = 0
        self.dropped_before_agent = 0  # caller frames past the hold's bound, for the call's metrics
        self._agent_noise = LogThrottle()
        # Twilio's media timestamps count from each stream's start; after a handover the new
        # stream's are shifted by when it began, so the recording stays in time.
        self._stream_started = time.monotonic()
        self._caller_offset_s = 0.0

    def replace_carrier(self, carrier: CarrierLeg) -> None:
        self.playout.replace_carrier(carrier)
        self._caller_offset_s = time.monotonic() - self._stream_started

    # Caller -> agent

    async def uplink(self) -> bool:
        """Until the caller's stream ends with no newer one replacing it: True when it ended
        with Twilio's `stop` (a hang-up, or a REST update), False when it just closed."""
        malformed = LogThrottle()
        playout = self.playout
        stopped = False
        while True:
            carrier = playout.carrier
            assert carrier is not None
            async for event in carrier.events():
                if carrier is not playout.carrier:
                    break  # replaced mid-iteration: its last frames do not matter
                match event:
                    case CallerAudio():
                        if self._recorder is not None:
                            self._record_caller(event)
                        if self.agent is not None:
                            await self.agent.send_audio(event.payload)
                        else:
                            self._hold(event)
                    case PlaybackMark(name):
                        playout.playback.echoed(name)
                    case CallerDtmf(digit):
                        self._log.info("caller_dtmf", digit=digit)
                        self._emit("dtmf", self.call_sid, digits=digit, source="caller")
                        if self.agent is not None:
                            await self.agent.send_dtmf(digit)
                        else:
                            self._hold(event)
                    case StreamStopped():
                        stopped = True
                        break
                    case ProtocolError():
                        if malformed.allow():
                            count = malformed.count
                            self._log.warning("carrier_frame_dropped", error=str(event), count=count)
            if carrier is playout.carrier:
                return stopped
            stopped = False

    def _record_caller(self, event: CallerAudio) -> None:
        try:
            mulaw = decode_payload(event.payload)
        except ProtocolError:
            return
        at_s = None if event.timestamp_ms is None else event.timestamp_ms / 1000 + self._caller_offset_s
        self._recorder.caller(mulaw, at_s)  # type: ignore[union-attr]

    def _hold(self, event: CallerAudio | CallerDtmf) -> None:
        if len(self._pending) == PENDING_UPLINK_FRAMES:
            self._pending_dropped += 1
        self._pending.append(event)

    async def agent_ready(self, agent: AgentLeg) -> None:
        """Send what the caller said and pressed before the ack, in order; then go live."""
        while self._pending:
            held = self._pending.popleft()
            if isinstance(held, CallerDtmf):
                await agent.send_dtmf(held.digit)
            else:
                await agent.send_audio(held.payload)
        if self._pending_dropped:
            self._log.warning("uplink_frames_dropped_before_ack", count=self._pending_dropped)
            self.dropped_before_agent += self._pending_dropped
            self._pending_dropped = 0
        self.agent = agent

    # Agent -> caller

    async def downlink(
        self,
        agent: AgentLeg,
        on_transfer: Callable[[AgentTransfer], None],
        on_custom: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        """Until the agent's socket closes."""
        playout = self.playout
        async for event in agent.events():
            match event:
                case AgentAudio(payload):
                    await playout.agent_audio(payload)
                case AgentClear():
                    await playout.barge_in()
                case AgentDtmf(digits):
                    await self.play_dtmf(digits)
                case AgentCustom(metadata):
                    self._log.info("agent_custom", metadata=metadata)
                    self._emit("agent.custom", self.call_sid, metadata=metadata)
                    await on_custom(metadata)
                case AgentTransfer():
                    on_transfer(event)
                case AgentUnknown(name):
                    if self._agent_noise.allow():
                        self._log.info("agent_event_ignored", agent_event=name, count=self._agent_noise.count)
                case ProtocolError():
                    if self._agent_noise.allow():
                        count = self._agent_noise.count
                        self._log.warning("agent_frame_dropped", error=str(event), count=count)
        await playout.agent_stopped()

    async def play_dtmf(self, digits: str) -> None:
        if await self.playout.dtmf(digits):
            self._log.info("dtmf_to_caller", digits=digits)
            self._emit("dtmf", self.call_sid, digits=digits, source="agent")
