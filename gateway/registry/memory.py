"""The embedded registry: one process, no Redis. Every call is owned by this instance."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace
from typing import Any

from gateway.registry.base import (
    LIVE_TTL_S,
    RINGING_TTL_S,
    CallRecord,
    OwnerGone,
    RouteHandler,
    SessionRegistry,
    new_instance_id,
)

# Rate-limit windows kept at once; older keys are swept so a flood of tokens cannot grow memory.
MAX_RATE_KEYS = 10_000


class RateWindows:
    """Sliding-window request counts per key, bounded in keys and in entries per key."""

    def __init__(self) -> None:
        self._hits: dict[str, deque[float]] = {}

    def hit(self, key: str, limit: int, window_s: float, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        hits = self._hits.get(key)
        if hits is None:
            if len(self._hits) >= MAX_RATE_KEYS:
                self._sweep(now, window_s)
            hits = self._hits[key] = deque(maxlen=limit + 1)
        while hits and now - hits[0] >= window_s:
            hits.popleft()
        hits.append(now)
        return len(hits) <= limit

    def _sweep(self, now: float, window_s: float) -> None:
        stale = [k for k, h in self._hits.items() if not h or now - h[-1] >= window_s]
        for key in stale:
            del self._hits[key]
        while len(self._hits) >= MAX_RATE_KEYS:
            del self._hits[next(iter(self._hits))]


class MemoryRegistry(SessionRegistry):
    def __init__(self, instance_id: str | None = None) -> None:
        self.instance_id = instance_id or new_instance_id()
        self._calls: dict[str, tuple[CallRecord, float]] = {}
        self._tokens: dict[str, str] = {}
        self._rates = RateWindows()
        self._streams: dict[str, float] = {}  # claimed stream references -> until when
        self._handler: RouteHandler | None = None

    async def start(self, handler: RouteHandler) -> None:
        self._handler = handler

    async def close(self) -> None:
        self._handler = None

    async def ready(self) -> bool:
        return True

    async def put(self, record: CallRecord, ttl_s: float = RINGING_TTL_S) -> None:
        self._sweep()
        previous = self._calls.get(record.call_sid)
        if previous is not None and previous[0].token_hash != record.token_hash:
            self._tokens.pop(previous[0].token_hash, None)  # a new token retires the old one
        self._calls[record.call_sid] = (replace(record), time.monotonic() + ttl_s)
        self._tokens[record.token_hash] = record.call_sid

    async def get(self, call_sid: str) -> CallRecord | None:
        entry = self._calls.get(call_sid)
        if entry is None:
            return None
        record, expires = entry
        if time.monotonic() >= expires:
            self._forget(call_sid)
            return None
        return replace(record)

    async def by_token(self, token_hash: str) -> CallRecord | None:
        call_sid = self._tokens.get(token_hash)
        record = None if call_sid is None else await self.get(call_sid)
        return record if record is not None and record.token_hash == token_hash else None

    async def update(self, call_sid: str, **fields: Any) -> None:
        entry = self._calls.get(call_sid)
        if entry is not None:
            for name, value in fields.items():
                setattr(entry[0], name, value)

    async def refresh(self, call_sid: str, ttl_s: float) -> None:
        entry = self._calls.get(call_sid)
        if entry is not None:
            self._calls[call_sid] = (entry[0], time.monotonic() + ttl_s)

    async def delete(self, call_sid: str, session_hash: str | None = None) -> None:
        entry = self._calls.get(call_sid)
        if session_hash is not None and entry is not None and entry[0].session_hash != session_hash:
            return  # a newer session of the call has it now (and keeps its control token)
        self._forget(call_sid)

    async def claim_stream(self, session_hash: str) -> bool:
        now = time.monotonic()
        if len(self._streams) >= MAX_RATE_KEYS:
            self._streams = {h: t for h, t in self._streams.items() if t > now}
        if self._streams.get(session_hash, 0.0) > now:
            return False
        self._streams[session_hash] = now + LIVE_TTL_S
        return True

    async def owner_alive(self, instance_id: str) -> bool:
        return instance_id == self.instance_id

    async def route(self, owner: str, request: dict[str, Any]) -> dict[str, Any] | None:
        if owner != self.instance_id:
            raise OwnerGone(owner)
        if self._handler is None:
            return None
        return await self._handler(request)

    async def hit(self, key: str, limit: int, window_s: float) -> bool:
        return self._rates.hit(key, limit, window_s)

    def _forget(self, call_sid: str) -> None:
        entry = self._calls.pop(call_sid, None)
        if entry is not None:
            self._tokens.pop(entry[0].token_hash, None)

    def _sweep(self) -> None:
        now = time.monotonic()
        for call_sid in [sid for sid, (_, exp) in self._calls.items() if now >= exp]:
            self._forget(call_sid)
