"""The embedded outbound store: one instance, everything in this process."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from gateway.outbound.parse import BatchSpec
from gateway.outbound.store import IDEMPOTENCY_TTL_S, SLOT_TTL_S, TERMINAL, OutboundStore

# Finished batches the embedded store keeps for GET /calls/batch/{id}, oldest forgotten first.
MAX_FINISHED_BATCHES_IN_MEMORY = 100
MAX_IDEMPOTENCY_KEYS = 100_000


class MemoryOutboundStore(OutboundStore):
    """One instance: everything in this process (lost on restart; use Redis for durability)."""

    def __init__(self) -> None:
        self._next_start = 0.0
        self._slots: dict[str, float] = {}
        self._batches: dict[str, BatchSpec] = {}
        self._states: dict[str, dict[int, dict[str, Any]]] = {}
        self._pending: dict[str, deque[int]] = {}
        self._claims: dict[str, dict[int, float]] = {}  # batch -> index -> when claimed
        self._done: dict[str, int] = {}  # batch -> recipients done or failed
        self._finished: deque[str] = deque()
        self._keys: dict[str, tuple[str, float]] = {}

    async def reserve_start(self, per_second: float) -> float:
        now = time.monotonic()
        start = max(now, self._next_start)
        self._next_start = start + 1.0 / per_second
        return start - now

    async def acquire_slot(self, member: str, cap: int) -> bool:
        now = time.monotonic()
        for stale in [m for m, at in self._slots.items() if now - at > SLOT_TTL_S]:
            del self._slots[stale]
        if len(self._slots) >= cap:
            return False
        self._slots[member] = now
        return True

    async def release_slot(self, member: str) -> None:
        self._slots.pop(member, None)

    async def active_slots(self) -> int:
        return len(self._slots)

    async def create_batch(self, spec: BatchSpec) -> None:
        if spec.batch_id in self._batches:
            return  # a retried request (same Idempotency-Key, same batch id): created already
        self._batches[spec.batch_id] = spec
        self._states[spec.batch_id] = {i: {"status": "pending"} for i in range(len(spec.recipients))}
        self._pending[spec.batch_id] = deque(range(len(spec.recipients)))

    async def batch(self, batch_id: str) -> tuple[BatchSpec, dict[int, dict[str, Any]]] | None:
        if batch_id not in self._batches:
            return None
        return self._batches[batch_id], {i: dict(s) for i, s in self._states[batch_id].items()}

    async def spec(self, batch_id: str) -> BatchSpec | None:
        return self._batches.get(batch_id)

    async def stale_claims(self, batch_id: str, claimed_before: float) -> dict[int, dict[str, Any]]:
        claims, states = self._claims.get(batch_id, {}), self._states.get(batch_id, {})
        return {i: dict(states[i]) for i, at in claims.items() if at <= claimed_before and i in states}

    async def finished(self, batch_id: str) -> int:
        return self._done.get(batch_id, 0)

    async def active_batches(self) -> list[str]:
        return list(self._pending)

    async def claim(self, batch_id: str, owner: str, slot: str) -> int | None:
        pending = self._pending.get(batch_id)
        if not pending:
            return None
        index = pending.popleft()
        now = time.time()
        self._states[batch_id][index] = {"status": "claimed", "owner": owner, "slot": slot, "at": now}
        self._claims.setdefault(batch_id, {})[index] = now
        return index

    async def update(
        self, batch_id: str, index: int, state: dict[str, Any], *, only_from: tuple[str, ...]
    ) -> bool:
        states = self._states.get(batch_id)
        if states is None or index not in states or states[index].get("status") not in only_from:
            return False
        was, states[index] = states[index].get("status"), {**states[index], **state}
        now = states[index].get("status")
        if was == "claimed" and now != "claimed":
            self._claims.get(batch_id, {}).pop(index, None)
        if now in TERMINAL:
            self._done[batch_id] = self._done.get(batch_id, 0) + 1
        return True

    async def requeue(self, batch_id: str, index: int) -> None:
        if await self.update(batch_id, index, {"status": "pending"}, only_from=("claimed",)):
            self._pending.setdefault(batch_id, deque()).appendleft(index)

    async def finish_batch(self, batch_id: str) -> None:
        self._pending.pop(batch_id, None)
        self._finished.append(batch_id)
        while len(self._finished) > MAX_FINISHED_BATCHES_IN_MEMORY:
            old = self._finished.popleft()
            self._batches.pop(old, None)
            self._states.pop(old, None)
            self._claims.pop(old, None)
            self._done.pop(old, None)

    async def remember(self, key: str, value: str) -> str | None:
        now = time.monotonic()
        for stale in [k for k, (_, at) in self._keys.items() if now - at > IDEMPOTENCY_TTL_S]:
            del self._keys[stale]
        if self._keys.get(key, ("", 0.0))[0]:
            return self._keys[key][0]
        if len(self._keys) >= MAX_IDEMPOTENCY_KEYS:
            del self._keys[next(iter(self._keys))]
        self._keys[key] = (value, now)
        return None

    async def take_over(self, key: str, read: str, value: str) -> bool:
        if self._keys.get(key, ("", 0.0))[0] != read:
            return False
        self._keys[key] = (value, time.monotonic())
        return True

    async def settle(self, key: str, value: str) -> None:
        self._keys[key] = (value, time.monotonic())
