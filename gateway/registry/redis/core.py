"""What every part of the Redis registry shares: key names, the record codec, and Redis health."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import orjson
import structlog
from redis.exceptions import RedisError

from gateway.lua import lua_script
from gateway.registry.base import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_TTL_S,
    ROUTE_TIMEOUT_S,
    CallRecord,
    SessionRegistry,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

log = structlog.get_logger("gateway.registry.redis")

# What "Redis is unreachable" looks like. The builtin TimeoutError (asyncio.timeout) is an OSError.
_UNREACHABLE = (RedisError, OSError)

# Hard ceiling on any one registry operation against Redis, whatever the client does inside.
OP_TIMEOUT_S = 2.0
# Reconnect backoff after a failure: 0.25 s doubling up to 2 s, so an outage's end is noticed
# (and the instance's calls re-registered) well within 5 s.
BACKOFF_MIN_S = 0.25
BACKOFF_MAX_S = 2.0


# Read once at import; each client registers them, and runs them by SHA.
RESTORE_SCRIPT = lua_script(__file__, "restore.lua")
FORGET_SCRIPT = lua_script(__file__, "forget.lua")
REWRITE_SCRIPT = lua_script(__file__, "rewrite.lua")


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisCore(SessionRegistry):
    """The state and helpers the registry's parts (records, mirror, routing, rates) build on.

    `RedisRegistry.__init__` sets every attribute; the parts are mixins over this one class.
    """

    # Tunables, per instance (tests shorten them); the defaults are in registry/base.py.
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    heartbeat_ttl_s: float = HEARTBEAT_TTL_S
    route_timeout_s: float = ROUTE_TIMEOUT_S

    _prefix: str
    _redis: Redis
    _restore_script: AsyncScript  # RESTORE_SCRIPT: write a record unless another owns the call
    _forget_script: AsyncScript  # FORGET_SCRIPT: delete a record only if it is still ours
    _rewrite_script: AsyncScript  # REWRITE_SCRIPT: update a record only if it is still ours
    _healthy: bool  # False from a failed Redis call until the next successful resync
    _wake: asyncio.Event
    _beat_task: asyncio.Task[None] | None
    _closed: bool

    # Keys

    def _call_key(self, call_sid: str) -> str:
        return f"{self._prefix}call:{call_sid}"

    def _token_key(self, token_hash: str) -> str:
        return f"{self._prefix}token:{token_hash}"

    def _instance_key(self, instance_id: str) -> str:
        return f"{self._prefix}instance:{instance_id}"

    def _route_channel(self, instance_id: str) -> str:
        return f"{self._prefix}route:{instance_id}"

    def _reply_prefix(self) -> str:
        return f"{self._prefix}reply:"

    # Health

    def _deferring(self) -> bool:
        """Redis is known to be down and the heartbeat loop will resync: skip it for now."""
        return not self._healthy and self._beat_task is not None and not self._beat_task.done()

    def _mark_down(self, exc: BaseException, op: str) -> None:
        if self._healthy:
            self._healthy = False
            log.warning("redis_unavailable", op=op, error=str(exc) or type(exc).__name__)
            self._wake.set()  # start retrying now rather than at the next heartbeat

    def _write_failed(self, op: str, call_sid: str, exc: BaseException, *, deferred: bool) -> None:
        """Deferred: the heartbeat loop replays it from the mirror. Otherwise it is lost."""
        self._mark_down(exc, op)
        log.warning(
            "registry_write_deferred" if deferred else "registry_write_failed",
            op=op,
            call_sid=call_sid,
            error=str(exc) or type(exc).__name__,
        )

    # Records as stored

    @staticmethod
    def _encode(record: CallRecord) -> bytes:
        return orjson.dumps(record.to_dict())

    @staticmethod
    def _decode(raw: bytes | None, call_sid: str) -> CallRecord | None:
        if raw is None:
            return None
        try:
            data = orjson.loads(raw)
            return CallRecord.from_dict(data)
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
            log.error("registry_record_corrupt", call_sid=call_sid, error=str(exc))
            return None

    async def _delete_keys(self, call_sid: str, session_hash: str | None) -> None:
        """Delete the call's record and token keys; with a `session_hash`, only while the record
        carries it (a stream moved to another instance leaves that instance's record alone)."""
        keys, args = [self._call_key(call_sid)], [session_hash or "", self._token_key("")]
        if not await self._forget_script(keys=keys, args=args):
            log.info("registry_call_moved", call_sid=call_sid, kept="the new owner's record")
