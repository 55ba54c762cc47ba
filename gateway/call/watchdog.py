"""A call's watchdog: ends the call when a leg is dead, reading the legs' `Liveness` once a
second instead of running a timeout around every frame (gateway.liveness says why)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from gateway.call.legs import AgentLeg, CarrierLeg
from gateway.liveness import WATCH_EVERY_S


class Watched(Protocol):
    """What the watchdog reads of a call, and what it may do to it (gateway.call.session)."""

    log: Any
    carrier_gone: bool
    agent_gone: bool
    agent_socket: AgentLeg | None

    @property
    def carrier(self) -> CarrierLeg | None: ...
    @property
    def busy_leaving(self) -> bool: ...
    async def caller_left(self, cause: str = ...) -> None: ...
    def drop_agent(self, agent: AgentLeg, outcome: str) -> None: ...


async def watch(session: Watched) -> None:
    """A carrier silent for too long, or a send to either side that has waited too long (the
    peer stopped reading), ends the call; an agent that stops answering pings is dropped."""
    log = session.log
    while True:
        await asyncio.sleep(WATCH_EVERY_S)
        now = time.monotonic()
        carrier = session.carrier
        if carrier is not None and not session.carrier_gone:
            lv = carrier.liveness
            if carrier.silent_after_s is not None and lv.silent_s(now) > carrier.silent_after_s:
                log.warning("carrier_silent", silent_s=round(lv.silent_s(now), 1))
                await session.caller_left("carrier_silent")
            elif lv.send_stalled_s(now) > carrier.stalled_after_s:
                log.warning("carrier_not_reading", waited_s=round(lv.send_stalled_s(now), 1))
                await session.caller_left("carrier_not_reading")
        agent = session.agent_socket
        if agent is None or session.agent_gone:
            continue
        # A dead agent is dropped in every state: a send stuck on it would stall the uplink
        # (and so the carrier's liveness) even while the call is ending or transferring.
        stalled = agent.liveness.send_stalled_s(now)
        if stalled > agent.stalled_after_s:
            log.warning("agent_not_reading", waited_s=round(stalled, 1))
            session.drop_agent(agent, "agent_not_reading")
        elif not session.busy_leaving and not await agent.keepalive(now):
            log.warning("agent_unresponsive", reason="no pong")
            session.drop_agent(agent, "agent_unresponsive")
