"""The mirror of the records this instance owns, the heartbeat, and the resync after an outage.

The mirror answers reads for owned records while Redis is away; writes made meanwhile are
deferred, deletes are kept as tombstones, and the heartbeat loop replays both once Redis answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

from gateway.registry.base import LIVE_TTL_S, CallRecord
from gateway.registry.redis.core import (
    _UNREACHABLE,
    BACKOFF_MAX_S,
    BACKOFF_MIN_S,
    OP_TIMEOUT_S,
    RedisCore,
    _ms,
    log,
)

# Deletes that could not be made during an outage, replayed when Redis returns.
MAX_TOMBSTONES = 10_000


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


class MirrorMixin(RedisCore):
    _mirror: dict[str, _Owned]
    _mirror_tokens: dict[str, str]  # token_hash -> call_sid, for mirrored records
    # call_sid -> (token_hash, session_hash) of a deferred delete; session_hash None: whatever
    # record is there
    _tombstones: dict[str, tuple[str | None, str | None]]
    _version: int

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

    def _tombstone(self, call_sid: str, token_hash: str | None, session_hash: str | None) -> None:
        if call_sid not in self._tombstones and len(self._tombstones) >= MAX_TOMBSTONES:
            del self._tombstones[next(iter(self._tombstones))]  # its keys expire by TTL anyway
        previous = self._tombstones.get(call_sid, (None, None))
        self._tombstones[call_sid] = (token_hash or previous[0], session_hash or previous[1])

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
            call_sid = next((sid for sid, (th, _) in self._tombstones.items() if th == token_hash), None)
        return call_sid

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

    # Heartbeat and resync

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
        # XX: only renewed while it exists. When it is gone, our records may be gone with it,
        # and until they are restored the missing key is what tells our reads to trust the
        # mirror (`_lost_our_keys`); so it comes back only after the resync, below.
        heartbeat = self._instance_key(self.instance_id)
        pipe.set(heartbeat, "1", px=_ms(self.heartbeat_ttl_s), get=True, xx=True)
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
            await self._redis.set(heartbeat, "1", px=_ms(self.heartbeat_ttl_s))
        # Listed among the instances only once its heartbeat key is there: a survivor takes the
        # calls of a listed instance without one (registry/redis/takeover.py).
        await self._redis.sadd(f"{self._prefix}instances", self.instance_id)

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
            for call_sid, grave in graves.items():
                if call_sid not in self._mirror:
                    await self._delete_keys(call_sid, grave[1])
                if self._tombstones.get(call_sid) == grave:
                    del self._tombstones[call_sid]
            pipe = self._redis.pipeline(transaction=False)
            for _, _, record, remaining, _ in snapshot:
                await self._queue_restore(pipe, record, remaining)
            written = await pipe.execute()
            # Writes that raced the snapshot: deleted since (undo ours) or changed since (redo).
            for (call_sid, version, record, _, _), restored in zip(snapshot, written, strict=True):
                entry = self._mirror.get(call_sid)
                if not restored:
                    self._moved(call_sid, entry)
                elif entry is None:
                    await self._delete_keys(call_sid, record.session_hash)
                elif entry.version != version:
                    pipe = self._redis.pipeline(transaction=True)
                    await self._queue_restore(pipe, entry.record, entry.remaining_s(time.monotonic()))
                    if not (await pipe.execute())[0]:
                        self._moved(call_sid, entry)
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

    async def _queue_restore(self, pipe: Any, record: CallRecord, remaining_s: float) -> None:
        """Write back a record we own, unless the call has another owner now (its record carries
        another session_hash: the stream moved, or a ringing call's media landed elsewhere)."""
        keys = [self._call_key(record.call_sid), self._token_key(record.token_hash)]
        args = [self._encode(record), record.session_hash, _ms(remaining_s), record.call_sid]
        await self._restore_script(keys=keys, args=args, client=pipe)  # queued, run by execute()

    def _moved(self, call_sid: str, entry: _Owned | None) -> None:
        """Another instance owns the call now: stop holding (and restoring) our old copy."""
        if entry is not None and self._mirror.get(call_sid) is entry:
            self._unmirror(call_sid)
        log.info("registry_call_moved", call_sid=call_sid, kept="the new owner's record")

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
