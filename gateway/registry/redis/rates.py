"""Rate limits: a sliding window kept in Redis, or in memory while Redis is unreachable."""

from __future__ import annotations

import asyncio
import secrets
from typing import TYPE_CHECKING

from gateway.lua import lua_script
from gateway.registry.redis.core import _UNREACHABLE, OP_TIMEOUT_S, RedisCore, _ms

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from gateway.registry.memory import RateWindows

RATE_SCRIPT = lua_script(__file__, "rate.lua")


class RatesMixin(RedisCore):
    _rate_script: AsyncScript
    _local_rates: RateWindows  # counts hits while Redis is away (per instance, not shared)

    async def hit(self, key: str, limit: int, window_s: float) -> bool:
        if self._deferring():
            return self._local_rates.hit(key, limit, window_s)
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                allowed = await self._rate_script(
                    keys=[f"{self._prefix}rate:{key}"],
                    args=[_ms(window_s), int(limit), secrets.token_hex(8)],
                )
        except _UNREACHABLE as exc:
            self._mark_down(exc, "hit")
            return self._local_rates.hit(key, limit, window_s)
        return bool(allowed)
