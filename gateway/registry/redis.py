"""The Redis registry: many instances share calls, heartbeats, rate limits and control routing.

Keys (all under `key_prefix`, default `lgw:`):

- `call:{call_sid}`      the call's record as JSON, with the record's TTL
- `token:{token_hash}`   the call SID, with the same TTL (the token itself is never stored)
- `instance:{id}`        `1` with a 6 s TTL, rewritten every 2 s while the instance lives
- `rate:{key}`           a sorted set of recent hits (sliding window, server clock)
- `reply:{id}:{nonce}`   a list holding one routed reply, for the requester's BLPOP

Control requests for a call held elsewhere are published on `route:{owner}` as
`{"reply_to": key, "request": {...}}`; the owner runs its handler and LPUSHes the reply.

A Redis outage never drops a live call: the instance keeps a mirror of the records it owns,
answers reads for them from memory while Redis is away, defers its writes, and re-registers every
mirrored record (and replays deletes it could not make) within a few seconds of Redis answering
again. Needs Redis >= 6.2 (`SET ... GET`, `KEEPTTL`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError

from gateway.registry.base import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_TTL_S,
    LIVE_TTL_S,
    RINGING_TTL_S,
    ROUTE_TIMEOUT_S,
    CallRecord,
    RegistryUnavailable,
    RouteHandler,
    SessionRegistry,
    new_instance_id,
)
from gateway.registry.memory import RateWindows

log = structlog.get_logger(__name__)

# What "Redis is unreachable" looks like. The builtin TimeoutError (asyncio.timeout) is an OSError.
_UNREACHABLE = (RedisError, OSError)

SOCKET_TIMEOUT_S = 1.5
CONNECT_TIMEOUT_S = 1.0
HEALTH_CHECK_INTERVAL_S = 5
# Hard ceiling on any one registry operation against Redis, whatever the client does inside.
OP_TIMEOUT_S = 2.0
READY_TIMEOUT_S = 0.5
# Reconnect backoff after a failure: 0.25 s doubling up to 2 s, so an outage's end is noticed
# (and the instance's calls re-registered) well within 5 s.
BACKOFF_MIN_S = 0.25
BACKOFF_MAX_S = 2.0
# Routed requests handled at once; one more is answered 503 straight away.
MAX_INFLIGHT_ROUTES = 64
# 503 answers being sent at once; beyond this a flood is dropped (the requesters time out).
MAX_OVERFLOW_REPLIES = 256
REPLY_TTL_S = 10
# Connections: ordinary commands, and blocking BLPOPs (one per route waiting for its reply).
MAX_CONNECTIONS = 32
MAX_BLOCKING_CONNECTIONS = 64
# The subscriber pings when idle this long, and reconnects when it hears nothing for twice that.
SUBSCRIBER_IDLE_PING_S = 5.0
# Deletes that could not be made during an outage, replayed when Redis returns.
MAX_TOMBSTONES = 10_000

_RATE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[3])
local n = redis.call('ZCARD', KEYS[1])
if n > limit + 1 then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - limit - 2)
  n = limit + 1
end
redis.call('PEXPIRE', KEYS[1], window)
if n <= limit then return 1 end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _copy(record: CallRecord) -> CallRecord:
    """A deep copy: the mirror never shares dicts with callers."""
    return CallRecord.from_dict(record.to_dict())


@dataclass(slots=True)
class _Owned:
    """A record this instance owns, as it should be in Redis."""

    record: CallRecord
    ttl_s: float
    expires: float  # time.monotonic()
    version: int

    def remaining_s(self, now: float) -> float:
        return self.expires - now


class RedisRegistry(SessionRegistry):
    # Tunables, per instance (tests shorten them); the defaults are the contract in DESIGN.md.
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    heartbeat_ttl_s: float = HEARTBEAT_TTL_S
    route_timeout_s: float = ROUTE_TIMEOUT_S

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
        self._rate_script = self._redis.register_script(_RATE_SCRIPT)
        self._local_rates = RateWindows()

        self._mirror: dict[str, _Owned] = {}
        self._mirror_tokens: dict[str, str] = {}  # token_hash -> call_sid, for mirrored records
        self._tombstones: dict[str, str | None] = {}  # call_sid -> token_hash (None: look it up)
        self._version = 0

        self._handler: RouteHandler | None = None
        self._healthy = True  # False from a failed Redis call until the next successful resync
        self._wake = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._beat_task: asyncio.Task[None] | None = None
        self._sub_task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._overflow: set[asyncio.Task[None]] = set()
        self._closed = False

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

    # Mirror of owned records

    def _mirrored(self, call_sid: str, now: float | None = None) -> _Owned | None:
        entry = self._mirror.get(call_sid)
        if entry is None:
            return None
        if entry.remaining_s(time.monotonic() if now is None else now) <= 0:
            self._unmirror(call_sid)
            return None
        return entry

    def _unmirror(self, call_sid: str) -> _Owned | None:
        entry = self._mirror.pop(call_sid, None)
        if entry is not None and self._mirror_tokens.get(entry.record.token_hash) == call_sid:
            del self._mirror_tokens[entry.record.token_hash]
        return entry

    def _sweep_mirror(self, now: float) -> None:
        for call_sid in [sid for sid, e in self._mirror.items() if e.remaining_s(now) <= 0]:
            self._unmirror(call_sid)

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    def _tombstone(self, call_sid: str, token_hash: str | None) -> None:
        if call_sid not in self._tombstones and len(self._tombstones) >= MAX_TOMBSTONES:
            del self._tombstones[next(iter(self._tombstones))]  # its keys expire by TTL anyway
        self._tombstones[call_sid] = token_hash or self._tombstones.get(call_sid)

    # Records

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

    async def put(self, record: CallRecord, ttl_s: float = RINGING_TTL_S) -> None:
        encoded = self._encode(record)  # an unserialisable record fails here, touching nothing
        now = time.monotonic()
        self._sweep_mirror(now)
        call_sid = record.call_sid
        stale_token: str | None = None
        owned = record.owner == self.instance_id
        previous = self._unmirror(call_sid)
        if previous is not None and previous.record.token_hash != record.token_hash:
            stale_token = previous.record.token_hash
        if owned:
            self._mirror[call_sid] = _Owned(_copy(record), ttl_s, now + ttl_s, self._next_version())
            self._mirror_tokens[record.token_hash] = call_sid
            self._tombstones.pop(call_sid, None)
            if self._deferring():
                return  # the resync writes it when Redis is back
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                pipe = self._redis.pipeline(transaction=True)
                pipe.set(self._call_key(call_sid), encoded, px=_ms(ttl_s))
                pipe.set(self._token_key(record.token_hash), call_sid, px=_ms(ttl_s))
                if stale_token is not None:
                    pipe.delete(self._token_key(stale_token))
                await pipe.execute()
        except _UNREACHABLE as exc:
            if not owned:
                self._mark_down(exc, "put")
                raise RegistryUnavailable("the registry cannot be reached") from exc
            self._write_failed("put", call_sid, exc, deferred=True)

    def _known_locally(self, call_sid: str | None) -> tuple[bool, CallRecord | None]:
        """What this instance knows without Redis: the records it owns and those it deleted."""
        if call_sid is not None:
            entry = self._mirrored(call_sid)
            if entry is not None:
                return True, _copy(entry.record)
            if call_sid in self._tombstones:
                return True, None
        return False, None

    def _local_sid(self, token_hash: str) -> str | None:
        call_sid = self._mirror_tokens.get(token_hash)
        if call_sid is None and self._tombstones:
            call_sid = next((sid for sid, th in self._tombstones.items() if th == token_hash), None)
        return call_sid

    async def get(self, call_sid: str) -> CallRecord | None:
        if self._deferring():
            known, record = self._known_locally(call_sid)
            if known:
                return record
        entry = self._mirrored(call_sid)
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                raw = await self._redis.get(self._call_key(call_sid))
                if raw is None and entry is not None:
                    if await self._lost_our_keys():
                        return _copy(entry.record)
                    self._forget_deleted(call_sid, entry)
        except _UNREACHABLE as exc:
            self._mark_down(exc, "get")
            known, record = self._known_locally(call_sid)
            if known:
                return record
            raise RegistryUnavailable("the registry cannot be reached") from exc
        return self._decode(raw, call_sid)

    async def by_token(self, token_hash: str) -> CallRecord | None:
        if self._deferring():
            known, record = self._known_locally(self._local_sid(token_hash))
            if known:
                return record
        mirrored_sid = self._mirror_tokens.get(token_hash)
        entry = None if mirrored_sid is None else self._mirrored(mirrored_sid)
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                raw_sid = await self._redis.get(self._token_key(token_hash))
                if raw_sid is None:
                    if entry is not None and mirrored_sid is not None:
                        if await self._lost_our_keys():
                            return _copy(entry.record)
                        self._forget_deleted(mirrored_sid, entry)
                    return None
                call_sid = raw_sid.decode()
                raw = await self._redis.get(self._call_key(call_sid))
        except _UNREACHABLE as exc:
            self._mark_down(exc, "by_token")
            known, record = self._known_locally(self._local_sid(token_hash))
            if known:
                return record
            raise RegistryUnavailable("the registry cannot be reached") from exc
        record = self._decode(raw, call_sid)
        # A replaced token may outlive its record's new token for a moment: never answer for it.
        return record if record is not None and record.token_hash == token_hash else None

    async def set_state(self, call_sid: str, state: str) -> None:
        entry = self._mirrored(call_sid)
        try:
            if entry is not None:
                entry.record.state = state
                entry.version = self._next_version()
                if self._deferring():
                    return
                async with asyncio.timeout(OP_TIMEOUT_S):
                    await self._redis.set(
                        self._call_key(call_sid), self._encode(entry.record), xx=True, keepttl=True
                    )
            else:
                async with asyncio.timeout(OP_TIMEOUT_S):
                    await self._set_state_remote(call_sid, state)
        except _UNREACHABLE as exc:
            self._write_failed("set_state", call_sid, exc, deferred=entry is not None)

    async def _set_state_remote(self, call_sid: str, state: str) -> None:
        """Rewrite a record someone else owns, keeping its TTL, unless it changed under us."""
        key = self._call_key(call_sid)
        async with self._redis.pipeline(transaction=True) as pipe:
            for _ in range(3):
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        return
                    data = orjson.loads(raw)
                    data["state"] = state
                    pipe.multi()
                    pipe.set(key, orjson.dumps(data), xx=True, keepttl=True)
                    await pipe.execute()
                    return
                except WatchError:
                    continue
        log.warning("registry_state_contended", call_sid=call_sid)

    async def refresh(self, call_sid: str, ttl_s: float) -> None:
        entry = self._mirrored(call_sid)
        token_hash: str | None = None
        if entry is not None:
            entry.ttl_s = ttl_s
            entry.expires = time.monotonic() + ttl_s
            token_hash = entry.record.token_hash
            if self._deferring():
                return
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                if token_hash is None:
                    record = self._decode(await self._redis.get(self._call_key(call_sid)), call_sid)
                    if record is None:
                        return
                    token_hash = record.token_hash
                pipe = self._redis.pipeline(transaction=True)
                pipe.pexpire(self._call_key(call_sid), _ms(ttl_s))
                pipe.pexpire(self._token_key(token_hash), _ms(ttl_s))
                await pipe.execute()
        except _UNREACHABLE as exc:
            self._write_failed("refresh", call_sid, exc, deferred=entry is not None)

    async def delete(self, call_sid: str) -> None:
        entry = self._unmirror(call_sid)
        token_hash = entry.record.token_hash if entry is not None else None
        if self._deferring():
            self._tombstone(call_sid, token_hash)
            return
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                await self._delete_keys(call_sid, token_hash)
        except _UNREACHABLE as exc:
            self._tombstone(call_sid, token_hash)
            self._write_failed("delete", call_sid, exc, deferred=True)

    async def _delete_keys(self, call_sid: str, token_hash: str | None) -> None:
        if token_hash is None:
            record = self._decode(await self._redis.get(self._call_key(call_sid)), call_sid)
            token_hash = record.token_hash if record is not None else None
        keys = [self._call_key(call_sid)]
        if token_hash is not None:
            keys.append(self._token_key(token_hash))
        await self._redis.delete(*keys)

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

    async def _lost_our_keys(self) -> bool:
        """Redis lacks a record we own: did it lose its data (restart, failover, flush), or did
        someone delete the record? Our heartbeat key tells: it is only missing in the first case.
        Then the mirror answers, and the heartbeat loop re-registers everything right away."""
        if self._beat_task is None or self._beat_task.done():
            return False
        if await self._redis.exists(self._instance_key(self.instance_id)):
            return False
        self._wake.set()
        return True

    def _forget_deleted(self, call_sid: str, entry: _Owned) -> None:
        """Redis answered that a record we own is gone (another instance ended the call)."""
        if self._mirror.get(call_sid) is entry:
            self._unmirror(call_sid)

    async def _beat_once(self) -> bool:
        """One heartbeat (and resync when needed); False when Redis did not answer."""
        try:
            async with asyncio.timeout(OP_TIMEOUT_S * 2):
                await self._beat()
            return True
        except _UNREACHABLE as exc:
            self._mark_down(exc, "heartbeat")
            return False

    async def _beat(self) -> None:
        now = time.monotonic()
        self._sweep_mirror(now)
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self._instance_key(self.instance_id), "1", px=_ms(self.heartbeat_ttl_s), get=True)
        # A live call's entry lives as long as its owner does.
        for call_sid, entry in self._mirror.items():
            if entry.ttl_s >= LIVE_TTL_S:
                entry.expires = now + entry.ttl_s
                pipe.pexpire(self._call_key(call_sid), _ms(entry.ttl_s))
                pipe.pexpire(self._token_key(entry.record.token_hash), _ms(entry.ttl_s))
        previous = (await pipe.execute())[0]
        # Our heartbeat key was gone before its TTL: Redis restarted, failed over or was flushed,
        # so our records may be gone too. After an outage our deferred writes are due as well.
        if not self._healthy or previous is None:
            await self._resync(was_healthy=self._healthy)

    async def _resync(self, *, was_healthy: bool) -> None:
        """Write every owned record (remaining TTL) and replay deferred deletes."""
        self._healthy = True  # from here on writes go straight to Redis; we reconcile below
        try:
            now = time.monotonic()
            self._sweep_mirror(now)
            snapshot = [
                (sid, e.version, _copy(e.record), e.remaining_s(now), e.ttl_s)
                for sid, e in self._mirror.items()
            ]
            graves = dict(self._tombstones)
            for call_sid, token_hash in graves.items():
                if call_sid not in self._mirror:
                    await self._delete_keys(call_sid, token_hash)
                if call_sid in self._tombstones and self._tombstones[call_sid] == token_hash:
                    del self._tombstones[call_sid]
            pipe = self._redis.pipeline(transaction=False)
            for _, _, record, remaining, ttl_s in snapshot:
                self._queue_restore(pipe, record, remaining, ttl_s)
            await pipe.execute()
            # Writes that raced the snapshot: deleted since (undo ours) or changed since (redo).
            for call_sid, version, record, _, _ in snapshot:
                entry = self._mirror.get(call_sid)
                if entry is None:
                    await self._delete_keys(call_sid, record.token_hash)
                elif entry.version != version:
                    remaining = entry.remaining_s(time.monotonic())
                    pipe = self._redis.pipeline(transaction=True)
                    self._queue_restore(pipe, entry.record, remaining, entry.ttl_s)
                    await pipe.execute()
        except BaseException:
            self._healthy = False
            raise
        if snapshot or graves or not was_healthy:
            log.info(
                "registry_resynced",
                instance=self.instance_id,
                calls=len(snapshot),
                deletes=len(graves),
                after_outage=not was_healthy,
            )

    def _queue_restore(self, pipe: Any, record: CallRecord, remaining_s: float, ttl_s: float) -> None:
        # A call that only rang here (put with a ringing TTL) may have had its media socket land
        # on another instance, which then owns it: restore it only if Redis has nothing newer
        # (NX). A call whose media is here (put with the live TTL) is ours, and our copy wins.
        nx = ttl_s < LIVE_TTL_S
        pipe.set(self._call_key(record.call_sid), self._encode(record), px=_ms(remaining_s), nx=nx)
        pipe.set(self._token_key(record.token_hash), record.call_sid, px=_ms(remaining_s), nx=nx)

    async def _heartbeat_loop(self, first_delay: float) -> None:
        backoff = BACKOFF_MIN_S
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(first_delay):
                await self._wake.wait()
        while True:
            started = loop.time()
            self._wake.clear()
            try:
                beat_ok = await self._beat_once()
            except Exception:  # a bug must not stop the heartbeat: peers would think us dead
                log.exception("registry_heartbeat_failed")
                beat_ok = False
            if beat_ok:
                backoff = BACKOFF_MIN_S
                delay = max(0.0, self.heartbeat_interval_s - (loop.time() - started))
            else:  # retry attempts start at most `backoff` apart, however long one took to fail
                delay = max(0.0, backoff - (loop.time() - started))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    # Routing

    async def route(self, owner: str, request: dict[str, Any]) -> dict[str, Any] | None:
        if owner == self.instance_id:
            handler = self._handler
            if handler is None:
                return None
            try:
                async with asyncio.timeout(self.route_timeout_s):
                    return await handler(request)
            except TimeoutError:
                return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.route_timeout_s
        reply_key = f"{self._reply_prefix()}{self.instance_id}:{secrets.token_hex(12)}"
        message = orjson.dumps({"reply_to": reply_key, "request": request})
        try:
            # The BLPOP's own timeout ends it on time; this is the backstop.
            async with asyncio.timeout_at(deadline + 0.5):
                receivers = await self._redis.publish(self._route_channel(owner), message)
                if not receivers:
                    log.info("route_no_listener", owner=owner)
                    return None
                remaining = deadline - loop.time()
                if remaining < 0.01:
                    return None
                popped = await self._blocking.blpop([reply_key], timeout=round(remaining, 3))
        except TimeoutError:
            log.warning("route_timed_out", owner=owner)
            return None
        except _UNREACHABLE as exc:
            self._mark_down(exc, "route")
            return None
        if popped is None:
            log.warning("route_timed_out", owner=owner)
            return None
        try:
            reply = orjson.loads(popped[1])
        except orjson.JSONDecodeError:
            reply = None
        if not isinstance(reply, dict):
            log.error("route_reply_malformed", owner=owner)
            return None
        return reply

    async def _subscriber_loop(self) -> None:
        backoff = BACKOFF_MIN_S
        channel = self._route_channel(self.instance_id)
        while True:
            pubsub: PubSub = self._sub_client.pubsub(ignore_subscribe_messages=False)
            try:
                async with asyncio.timeout(OP_TIMEOUT_S):
                    await pubsub.subscribe(channel)
                await self._listen(pubsub, channel)
            except _UNREACHABLE as exc:
                if self._subscribed.is_set():
                    backoff = BACKOFF_MIN_S  # it worked until now: retry soon
                    log.warning("route_subscriber_lost", error=str(exc) or type(exc).__name__)
                self._mark_down(exc, "subscribe")
            except Exception:  # a bug must not leave the instance deaf for good
                log.exception("route_subscriber_failed")
            finally:
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _listen(self, pubsub: PubSub, channel: str) -> None:
        """Take messages until the connection fails (raises); ping when idle to notice that."""
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        while True:
            message = await pubsub.get_message(timeout=1.0)
            now = loop.time()
            if message is None:
                if now - last_heard > 2 * SUBSCRIBER_IDLE_PING_S:
                    raise RedisConnectionError("route subscriber heard nothing, not even a pong")
                if now - last_heard > SUBSCRIBER_IDLE_PING_S:
                    async with asyncio.timeout(OP_TIMEOUT_S):
                        await pubsub.ping()
                continue
            last_heard = now
            kind = message.get("type")
            if kind == "subscribe":
                self._subscribed.set()
                log.debug("route_subscribed", channel=channel)
            elif kind == "message":
                self._dispatch(message.get("data"))

    def _dispatch(self, data: Any) -> None:
        try:
            message = orjson.loads(data)
            reply_to = message["reply_to"]
            request = message["request"]
            if not isinstance(reply_to, str) or not reply_to.startswith(self._reply_prefix()):
                raise ValueError("reply_to is not a reply key")
            if not isinstance(request, dict):
                raise ValueError("request is not an object")
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
            log.warning("route_message_malformed", error=str(exc))
            return
        handler = self._handler
        if handler is None:
            return
        if len(self._inflight) < MAX_INFLIGHT_ROUTES:
            task = asyncio.create_task(self._serve(handler, reply_to, request))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        elif len(self._overflow) < MAX_OVERFLOW_REPLIES:
            log.warning("route_overloaded", inflight=len(self._inflight))
            busy = _error_reply(503, "owner_busy", "the instance holding the call is overloaded; retry")
            task = asyncio.create_task(self._reply(reply_to, busy))
            self._overflow.add(task)
            task.add_done_callback(self._overflow.discard)
        else:
            log.warning("route_dropped", inflight=len(self._inflight))

    async def _serve(self, handler: RouteHandler, reply_to: str, request: dict[str, Any]) -> None:
        try:
            async with asyncio.timeout(self.route_timeout_s):
                reply = await handler(request)
            if not isinstance(reply, dict):
                raise TypeError(f"route handler returned {type(reply).__name__}, not a dict")
        except TimeoutError:
            log.warning("route_handler_timed_out", call_sid=request.get("call_sid"))
            return  # the requester has stopped waiting
        except Exception:
            log.exception("route_handler_failed", call_sid=request.get("call_sid"))
            reply = _error_reply(500, "internal_error", "the instance holding the call failed to act")
        await self._reply(reply_to, reply)

    async def _reply(self, reply_to: str, reply: dict[str, Any]) -> None:
        try:
            body = orjson.dumps(reply)
        except TypeError as exc:
            log.error("route_reply_unserialisable", error=str(exc))
            body = orjson.dumps(_error_reply(500, "internal_error", "unserialisable reply"))
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                pipe = self._redis.pipeline(transaction=True)
                pipe.lpush(reply_to, body)
                pipe.expire(reply_to, REPLY_TTL_S)
                await pipe.execute()
        except _UNREACHABLE as exc:
            self._mark_down(exc, "route_reply")
            log.warning("route_reply_failed", error=str(exc))

    # Rate limiting

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


def _error_reply(status: int, code: str, message: str) -> dict[str, Any]:
    return {"status": status, "body": {"ok": False, "error": {"code": code, "message": message}}}
