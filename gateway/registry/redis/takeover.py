"""Which instances are alive, and the calls of one that died: found once, by one survivor.

Every instance that has beaten is in the `instances` set. An instance whose heartbeat key is
gone (6 s without a beat) is dead: the first survivor to claim `takeover:{id}` scans the call
records once, takes the dead instance's live calls, and removes it from the set.
"""

from __future__ import annotations

import asyncio

import orjson

from gateway.call.states import RESUMABLE
from gateway.registry.base import LIVE_TTL_S, CallRecord
from gateway.registry.memory import RateWindows
from gateway.registry.redis.core import _UNREACHABLE, OP_TIMEOUT_S, RedisCore, _ms, log

# One survivor takes a dead instance's calls; the claim outlives the scan and the REST updates.
TAKEOVER_CLAIM_S = 60.0
# Record keys read at once while looking for a dead instance's calls.
SCAN_BATCH = 500


class TakeoverMixin(RedisCore):
    _local_claims: RateWindows  # stream claims made while Redis was down

    def _instances_key(self) -> str:
        return f"{self._prefix}instances"

    def _stream_key(self, session_hash: str) -> str:
        return f"{self._prefix}stream:{session_hash}"

    async def claim_stream(self, session_hash: str) -> bool:
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                key = self._stream_key(session_hash)
                return bool(await self._redis.set(key, "1", nx=True, px=_ms(LIVE_TTL_S)))
        except _UNREACHABLE as exc:
            # Redis is down: new calls are still answered (a replay is refused on this
            # instance only until it is back).
            self._mark_down(exc, "claim_stream")
            return self._local_claims.hit(session_hash, 1, LIVE_TTL_S)

    async def peers_alive(self) -> bool:
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                members = await self._redis.smembers(self._instances_key())
                others = [m.decode() for m in members if m.decode() != self.instance_id]
                if not others:
                    return False
                return bool(await self._redis.exists(*(self._instance_key(i) for i in others)))
        except _UNREACHABLE:
            return False

    async def orphaned_calls(self) -> list[CallRecord]:
        found: list[CallRecord] = []
        try:
            async with asyncio.timeout(OP_TIMEOUT_S * 5):
                members = [m.decode() for m in await self._redis.smembers(self._instances_key())]
                for instance in members:
                    if instance == self.instance_id or await self._redis.exists(self._instance_key(instance)):
                        continue
                    claim = f"{self._prefix}takeover:{instance}"
                    if not await self._redis.set(claim, self.instance_id, nx=True, px=_ms(TAKEOVER_CLAIM_S)):
                        continue  # another survivor has it
                    calls = await self._calls_of(instance)
                    await self._redis.srem(self._instances_key(), instance)
                    log.warning(
                        "instance_dead", instance=instance, calls=len(calls), taken_by=self.instance_id
                    )
                    found += calls
        except _UNREACHABLE as exc:
            log.warning("takeover_scan_failed", error=str(exc) or type(exc).__name__)
        return found

    async def _calls_of(self, instance: str) -> list[CallRecord]:
        calls: list[CallRecord] = []
        keys: list[bytes] = []
        async for key in self._redis.scan_iter(match=self._call_key("*"), count=SCAN_BATCH):
            keys.append(key)
        for start in range(0, len(keys), SCAN_BATCH):
            batch = keys[start : start + SCAN_BATCH]
            for raw in await self._redis.mget(batch):
                if raw is None:
                    continue
                try:
                    record = CallRecord.from_dict(orjson.loads(raw))
                except (orjson.JSONDecodeError, TypeError, KeyError):
                    continue
                if record.owner == instance and record.state in RESUMABLE:
                    calls.append(record)
        return calls
