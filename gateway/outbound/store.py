"""Where pacing, concurrency slots, batch progress and Idempotency-Keys live.

MemoryOutboundStore (store_memory.py) serves one instance; RedisOutboundStore (store_redis.py)
is shared by every instance and survives any instance's restart.
"""

from __future__ import annotations

import abc
from typing import Any

from gateway.outbound.parse import BatchSpec

# A slot whose final status never came (a lost callback) is freed after this long, so a
# lost webhook cannot shrink the concurrency cap for ever.
SLOT_TTL_S = 4 * 3600
# A client's Idempotency-Key is honoured this long (a retry after a timeout comes within it).
IDEMPOTENCY_TTL_S = 24 * 3600
# A recipient in one of these is finished (the batch is over when all are).
TERMINAL = frozenset({"done", "failed"})


class OutboundStore(abc.ABC):
    """Pacing, concurrency slots and batch progress, shared by every instance."""

    @abc.abstractmethod
    async def reserve_start(self, per_second: float) -> float:
        """Reserve the next start; seconds to wait before making it (0: now)."""

    @abc.abstractmethod
    async def acquire_slot(self, member: str, cap: int) -> bool: ...

    @abc.abstractmethod
    async def release_slot(self, member: str) -> None: ...

    @abc.abstractmethod
    async def active_slots(self) -> int: ...

    @abc.abstractmethod
    async def create_batch(self, spec: BatchSpec) -> None: ...

    @abc.abstractmethod
    async def batch(self, batch_id: str) -> tuple[BatchSpec, dict[int, dict[str, Any]]] | None:
        """The batch and each recipient's state (index -> state)."""

    @abc.abstractmethod
    async def spec(self, batch_id: str) -> BatchSpec | None:
        """The batch as it was created (it never changes; the dialer keeps it)."""

    @abc.abstractmethod
    async def stale_claims(self, batch_id: str, claimed_before: float) -> dict[int, dict[str, Any]]:
        """Recipients still claimed, claimed before `claimed_before` (time.time()): their states."""

    @abc.abstractmethod
    async def finished(self, batch_id: str) -> int:
        """How many of the batch's recipients are done or failed."""

    @abc.abstractmethod
    async def active_batches(self) -> list[str]: ...

    @abc.abstractmethod
    async def claim(self, batch_id: str, owner: str, slot: str) -> int | None:
        """Take the next pending recipient for `owner`; None when none is left."""

    @abc.abstractmethod
    async def update(
        self, batch_id: str, index: int, state: dict[str, Any], *, only_from: tuple[str, ...]
    ) -> bool:
        """Set a recipient's state if its current status is one of `only_from`."""

    @abc.abstractmethod
    async def requeue(self, batch_id: str, index: int) -> None:
        """Put a claimed-but-never-dialled recipient back at the front of the queue."""

    @abc.abstractmethod
    async def finish_batch(self, batch_id: str) -> None: ...

    @abc.abstractmethod
    async def remember(self, key: str, value: str) -> str | None:
        """Store `value` under an Idempotency-Key unless one is there; the existing value if so."""

    @abc.abstractmethod
    async def take_over(self, key: str, read: str, value: str) -> bool:
        """Replace an Idempotency-Key's value if it is still `read`; False if it changed."""

    @abc.abstractmethod
    async def settle(self, key: str, value: str) -> None:
        """Replace a remembered placeholder with the final answer ("" forgets the key)."""

    async def close(self) -> None:
        return None
