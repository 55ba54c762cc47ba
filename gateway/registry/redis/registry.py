"""`RedisRegistry`: the connections, the lifecycle, and liveness; the rest comes from its parts."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.registry.base import ROUTE_TIMEOUT_S, RegistryUnavailable, RouteHandler, new_instance_id
from gateway.registry.memory import RateWindows
from gateway.registry.redis.core import (
    _UNREACHABLE,
    BACKOFF_MIN_S,
    FORGET_SCRIPT,
    OP_TIMEOUT_S,
    RESTORE_SCRIPT,
    REWRITE_SCRIPT,
    log,
)
from gateway.registry.redis.rates import RATE_SCRIPT, RatesMixin
from gateway.registry.redis.records import RecordsMixin
from gateway.registry.redis.routing import RoutingMixin
from gateway.registry.redis.takeover import TakeoverMixin

SOCKET_TIMEOUT_S = 1.5
CONNECT_TIMEOUT_S = 1.0
HEALTH_CHECK_INTERVAL_S = 5
READY_TIMEOUT_S = 0.5
# Connections: ordinary commands, and blocking BLPOPs (one per route waiting for its reply).
MAX_CONNECTIONS = 32
MAX_BLOCKING_CONNECTIONS = 64


class RedisRegistry(RecordsMixin, RoutingMixin, RatesMixin, TakeoverMixin):
    def __init__(self, url: str, instance_id: str | None = None, *, key_prefix: str = "lgw:") -> None:
        self.instance_id = instance_id or new_instance_id()
        self._prefix = key_prefix
        common: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "health_check_interval": HEALTH_CHECK_INTERVAL_S,
            # One immediate retry on a broken connection (a stale socket after a Redis restart);
            # never on a timeout, which may have run the command already.
            "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        }
        self._pools = [
            BlockingConnectionPool.from_url(
                url, max_connections=MAX_CONNECTIONS, timeout=OP_TIMEOUT_S / 2,
                socket_timeout=SOCKET_TIMEOUT_S, **common,
            ),
            # BLPOP waits up to route_timeout_s server-side: the socket must wait longer.
            BlockingConnectionPool.from_url(
                url, max_connections=MAX_BLOCKING_CONNECTIONS, timeout=ROUTE_TIMEOUT_S,
                socket_timeout=ROUTE_TIMEOUT_S + 2, **common,
            ),
            # The subscriber's one long-lived connection (it pings by itself when idle).
            BlockingConnectionPool.from_url(
                url, max_connections=2, timeout=OP_TIMEOUT_S,
                socket_timeout=SOCKET_TIMEOUT_S, **{**common, "health_check_interval": 0},
            ),
        ]  # fmt: skip
        self._redis = Redis(connection_pool=self._pools[0])
        self._blocking = Redis(connection_pool=self._pools[1])
        self._sub_client = Redis(connection_pool=self._pools[2])
        self._rate_script = self._redis.register_script(RATE_SCRIPT)
        self._restore_script = self._redis.register_script(RESTORE_SCRIPT)
        self._forget_script = self._redis.register_script(FORGET_SCRIPT)
        self._rewrite_script = self._redis.register_script(REWRITE_SCRIPT)
        self._local_rates = RateWindows()
        self._local_claims = RateWindows()

        self._mirror = {}
        self._mirror_tokens = {}
        self._tombstones = {}
        self._version = 0

        self._handler = None
        self._healthy = True
        self._wake = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._beat_task = None
        self._sub_task: asyncio.Task[None] | None = None
        self._inflight = set()
        self._overflow = set()
        self._closed = False

    # Lifecycle

    async def start(self, handler: RouteHandler) -> None:
        if self._beat_task is not None or self._closed:
            raise RuntimeError("registry already started or closed")
        self._handler = handler
        first_beat_ok = await self._beat_once()
        self._beat_task = asyncio.create_task(
            self._heartbeat_loop(self.heartbeat_interval_s if first_beat_ok else BACKOFF_MIN_S),
            name=f"registry-heartbeat-{self.instance_id}",
        )
        self._sub_task = asyncio.create_task(
            self._subscriber_loop(), name=f"registry-subscriber-{self.instance_id}"
        )
        if first_beat_ok:  # Redis is up: be routable before saying we started
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OP_TIMEOUT_S):
                    await self._subscribed.wait()
        if not self._subscribed.is_set():
            log.warning("registry_started_degraded", instance=self.instance_id, reason="redis unreachable")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._handler = None
        tasks = [t for t in (self._beat_task, self._sub_task) if t is not None]
        tasks += [*self._inflight, *self._overflow]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._beat_task = self._sub_task = None
        self._subscribed.clear()
        try:
            async with asyncio.timeout(1.0):
                await self._redis.delete(self._instance_key(self.instance_id))
                await self._redis.srem(self._instances_key(), self.instance_id)  # left, not dead
        except _UNREACHABLE as exc:
            log.warning("registry_heartbeat_not_removed", instance=self.instance_id, error=str(exc))
        for client in (self._redis, self._blocking, self._sub_client):
            with contextlib.suppress(Exception):
                await client.aclose()
        for pool in self._pools:
            with contextlib.suppress(Exception):
                await pool.aclose()

    async def ready(self) -> bool:
        if self._closed:
            return False
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                return bool(await self._redis.ping())
        except Exception:
            return False

    # Liveness

    async def owner_alive(self, instance_id: str) -> bool:
        if instance_id == self.instance_id:
            return self._beat_task is not None and not self._closed
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                return bool(await self._redis.exists(self._instance_key(instance_id)))
        except _UNREACHABLE as exc:
            self._mark_down(exc, "owner_alive")
            raise RegistryUnavailable("the registry cannot be reached") from exc
