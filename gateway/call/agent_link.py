"""Bringing a call's agent up, and back when its socket drops: retries within bounds, which
drops are worth a new session, and the agent's own state handed back to that session.

The session asks; the opener (gateway.http.media) opens a Calls API socket with the call's
metadata plus, on a resume, `resumed: true`, why, and the agent's last `custom` metadata.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from gateway.agents.calls_api import ended_by_agent
from gateway.call.legs import AgentLeg, AgentUnavailable, CallMetrics
from gateway.registry.base import CallRecord

# A refused (429, 5xx) or unreachable agent is retried for this long, the first attempt
# included; then the fallback. With the fallback's REST update that keeps the caller's silence
# under 3 s. An agent that accepts but never acks costs its ack wait (5 s) instead.
CONNECT_BUDGET_S = 2.5
RETRY_PAUSES_S = (0.1, 0.2, 0.4, 0.8)
# No attempt is given less than this to open (TCP, TLS and the upgrade).
MIN_OPEN_S = 0.5
# Close codes after which the agent is worth reopening: no close frame at all, going away (a
# restart), abnormal closure, an internal error, service restart, try again later.
RECONNECT_CODES = frozenset({None, 1001, 1006, 1011, 1012, 1013})
IDLE_TIMEOUT_REASON = "connection idle timeout"  # Cartesia's close after 180 s without a frame
# The agent's `custom` metadata kept for a resume; larger is not kept (and that is logged).
MAX_AGENT_STATE_BYTES = 8 * 1024

# (record, resume reason or "", how long the open may take) -> an acknowledged agent socket
AgentOpener = Callable[[CallRecord, str, float], Awaitable[AgentLeg]]


def drop_reason(code: int | None, reason: str | None) -> str:
    """Why a closed agent socket is worth reopening ("" when it is not: the agent hung up, or
    closed on purpose)."""
    if ended_by_agent(code, reason):
        return ""
    if code in RECONNECT_CODES:
        return "agent_dropped"
    if code == 1000 and (reason or "") == IDLE_TIMEOUT_REASON:
        return "agent_idle_timeout"
    return ""


def bounded_state(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The agent's `custom` metadata if it is small enough to keep; None if not."""
    try:
        size = len(orjson.dumps(metadata))
    except TypeError:
        return None
    return metadata if size <= MAX_AGENT_STATE_BYTES else None


class AgentLink:
    """One call's way to its agent: `connect` for the first session and for each resume."""

    def __init__(
        self,
        record: CallRecord,
        open_agent: AgentOpener,
        log: Any,
        max_reconnects: int,
        metrics: CallMetrics | None = None,
    ) -> None:
        self._record = record
        self._open = open_agent
        self._log = log
        self._metrics = metrics
        self.reconnects_left = max_reconnects
        self.attempts = 0  # sockets opened or tried, for this call

    async def connect(self, resume_reason: str) -> AgentLeg | None:
        """An acknowledged agent, retried within CONNECT_BUDGET_S; None when it cannot be had."""
        deadline = time.monotonic() + CONNECT_BUDGET_S
        for attempt in range(len(RETRY_PAUSES_S) + 1):
            self.attempts += 1
            started = time.monotonic()
            try:
                open_s = max(MIN_OPEN_S, deadline - started)
                agent = await self._open(self._record, resume_reason, open_s)
            except AgentUnavailable as exc:
                if not exc.retry:
                    self._log.error("agent_misconfigured", error=str(exc), status=exc.status)
                    return None
                pause = RETRY_PAUSES_S[min(attempt, len(RETRY_PAUSES_S) - 1)]
                if time.monotonic() + pause >= deadline or attempt == len(RETRY_PAUSES_S):
                    self._log.error("agent_unavailable", error=str(exc), attempts=attempt + 1)
                    return None
                self._log.warning("agent_connect_retry", error=str(exc), attempt=attempt + 1)
                await asyncio.sleep(pause)
                continue
            self._log.info(
                "agent_connected",
                resumed=bool(resume_reason),
                reason=resume_reason or None,
                connect_ms=round((time.monotonic() - started) * 1000, 1),
            )
            return agent
        return None

    def reconnect_reason(self, agent: AgentLeg) -> str:
        """Why to open the agent again after its socket closed; "" to let the call go on without."""
        why = drop_reason(agent.close_code, agent.close_reason)
        if not why:
            return ""
        if self.reconnects_left <= 0:
            self._log.error("agent_reconnects_exhausted", close_code=agent.close_code)
            return ""
        self.reconnects_left -= 1
        if self._metrics is not None:
            self._metrics.agent_reconnect(why)
        self._log.warning(
            "agent_reconnecting",
            reason=why,
            close_code=agent.close_code,
            close_reason=agent.close_reason,
            left=self.reconnects_left,
        )
        return why
