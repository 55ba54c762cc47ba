"""The shared outbound store: every instance on one Redis; survives any instance's restart.

Each step that must not be split by a crash or by another instance runs as one Lua script,
kept in ./lua/ beside this module.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from redis.asyncio import BlockingConnectionPool, Redis

from gateway.lua import lua_script
from gateway.outbound.parse import BatchSpec
from gateway.outbound.store import IDEMPOTENCY_TTL_S, SLOT_TTL_S, OutboundStore

# Batches and their progress are kept this long after they finish, for GET /calls/batch/{id}.
BATCH_TTL_S = 7 * 86400
# Connections to Redis for the outbound store; a command waits this long for a free one.
MAX_CONNECTIONS = 32
POOL_WAIT_S = 5.0
SOCKET_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 1.0

_PACE = lua_script(__file__, "pace.lua")
_ACQUIRE = lua_script(__file__, "acquire_slot.lua")
_CLAIM = lua_script(__file__, "claim.lua")
_REQUEUE = lua_script(__file__, "requeue.lua")
_IDEMPOTENT = lua_script(__file__, "remember.lua")
_UPDATE = lua_script(__file__, "update_state.lua")
_TAKE_OVER = lua_script(__file__, "take_over.lua")


class RedisOutboundStore(OutboundStore):
    """Shared by every instance on one Redis; survives any instance's restart."""

    def __init__(self, url: str, key_prefix: str = "lgw:") -> None:
        # A blocking pool: past MAX_CONNECTIONS a command waits up to POOL_WAIT_S for one, where
        # redis-py's default pool raises at once. A burst of status callbacks during a large
        # batch is taken whole, and Twilio does not retry a callback answered 503.
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
        )
        self._redis = Redis(connection_pool=self._pool)
        self._p = key_prefix
        self._pace = self._redis.register_script(_PACE)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._claim = self._redis.register_script(_CLAIM)
        self._update = self._redis.register_script(_UPDATE)
        self._requeue = self._redis.register_script(_REQUEUE)
        self._idempotent = self._redis.register_script(_IDEMPOTENT)
        self._take_over = self._redis.register_script(_TAKE_OVER)

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.aclose()  # a pool handed to Redis() is not closed with it

    def _k(self, *parts: str) -> str:
        return self._p + ":".join(parts)

    async def reserve_start(self, per_second: float) -> float:
        interval_ms = max(1, round(1000 / per_second))
        return int(await self._pace(keys=[self._k("outbound", "pace")], args=[interval_ms])) / 1000

    async def acquire_slot(self, member: str, cap: int) -> bool:
        key = self._k("outbound", "slots")
        return bool(await self._acquire(keys=[key], args=[member, cap, SLOT_TTL_S]))

    async def release_slot(self, member: str) -> None:
        await self._redis.zrem(self._k("outbound", "slots"), member)

    async def active_slots(self) -> int:
        return int(await self._redis.zcard(self._k("outbound", "slots")))

    async def create_batch(self, spec: BatchSpec) -> None:
        bid = spec.batch_id
        if await self._redis.exists(self._k("batch", bid, "spec")):
            return  # a retried request (same Idempotency-Key, same batch id): created already
        pending = {str(i): orjson.dumps({"status": "pending"}) for i in range(len(spec.recipients))}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._k("batch", bid, "spec"), spec.to_json(), ex=BATCH_TTL_S)
            pipe.hset(self._k("batch", bid, "state"), mapping=pending)
            pipe.expire(self._k("batch", bid, "state"), BATCH_TTL_S)
            pipe.rpush(self._k("batch", bid, "pending"), *range(len(spec.recipients)))
            pipe.expire(self._k("batch", bid, "pending"), BATCH_TTL_S)
            pipe.sadd(self._k("batches"), bid)
            await pipe.execute()

    async def batch(self, batch_id: str) -> tuple[BatchSpec, dict[int, dict[str, Any]]] | None:
        spec = await self.spec(batch_id)
        if spec is None:
            return None
        states = await self._redis.hgetall(self._k("batch", batch_id, "state"))
        return spec, {int(i): orjson.loads(s) for i, s in states.items()}

    async def spec(self, batch_id: str) -> BatchSpec | None:
        raw = await self._redis.get(self._k("batch", batch_id, "spec"))
        return None if raw is None else BatchSpec.from_json(raw)

    async def stale_claims(self, batch_id: str, claimed_before: float) -> dict[int, dict[str, Any]]:
        claims = self._k("batch", batch_id, "claims")
        indices = await self._redis.zrangebyscore(claims, "-inf", claimed_before)
        if not indices:
            return {}
        states = await self._redis.hmget(self._k("batch", batch_id, "state"), indices)
        return {int(i): orjson.loads(s) for i, s in zip(indices, states, strict=True) if s is not None}

    async def finished(self, batch_id: str) -> int:
        return int(await self._redis.get(self._k("batch", batch_id, "finished")) or 0)

    async def active_batches(self) -> list[str]:
        return [b.decode() for b in await self._redis.smembers(self._k("batches"))]

    def _batch_keys(self, batch_id: str, *names: str) -> list[str]:
        return [self._k("batch", batch_id, name) for name in names]

    async def claim(self, batch_id: str, owner: str, slot: str) -> int | None:
        now = time.time()
        state = orjson.dumps({"status": "claimed", "owner": owner, "slot": slot, "at": now})
        keys = self._batch_keys(batch_id, "pending", "state", "claims")
        index = await self._claim(keys=keys, args=[state, now, BATCH_TTL_S])
        return None if index is None else int(index)

    async def update(
        self, batch_id: str, index: int, state: dict[str, Any], *, only_from: tuple[str, ...]
    ) -> bool:
        keys = self._batch_keys(batch_id, "state", "claims", "finished")
        args = [index, orjson.dumps(state), BATCH_TTL_S, *only_from]
        return bool(await self._update(keys=keys, args=args))

    async def requeue(self, batch_id: str, index: int) -> None:
        # One script: a crash between marking it pending and queueing it would lose it.
        keys = self._batch_keys(batch_id, "state", "pending", "claims")
        await self._requeue(keys=keys, args=[index, orjson.dumps({"status": "pending"})])

    async def finish_batch(self, batch_id: str) -> None:
        await self._redis.srem(self._k("batches"), batch_id)

    async def remember(self, key: str, value: str) -> str | None:
        result = await self._idempotent(keys=[self._k("idempotency", key)], args=[value, IDEMPOTENCY_TTL_S])
        return None if result is None else (result.decode() if isinstance(result, bytes) else str(result))

    async def take_over(self, key: str, read: str, value: str) -> bool:
        keys = [self._k("idempotency", key)]
        return bool(await self._take_over(keys=keys, args=[read, value, IDEMPOTENCY_TTL_S]))

    async def settle(self, key: str, value: str) -> None:
        await self._redis.set(self._k("idempotency", key), value, ex=IDEMPOTENCY_TTL_S)
