"""Call records: put, get, by_token, update, refresh, delete.

Records this instance owns are mirrored (see `mirror`): their writes are deferred while Redis is
down, and their reads are answered from memory. Records owned elsewhere live only in Redis.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from redis.exceptions import WatchError

from gateway.registry.base import RINGING_TTL_S, CallRecord, RegistryUnavailable
from gateway.registry.redis.core import _UNREACHABLE, OP_TIMEOUT_S, _ms, log
from gateway.registry.redis.mirror import MirrorMixin, _copy, _Owned


class RecordsMixin(MirrorMixin):
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

    async def update(self, call_sid: str, **fields: Any) -> None:
        entry = self._mirrored(call_sid)
        try:
            if entry is not None:
                expected = entry.record.session_hash  # ours, before a resume gives it a new one
                for name, value in fields.items():
                    setattr(entry.record, name, value)
                entry.version = self._next_version()
                if self._deferring():
                    return
                record = entry.record
                async with asyncio.timeout(OP_TIMEOUT_S):
                    keys, args = [self._call_key(call_sid)], [self._encode(record), expected]
                    if await self._rewrite_script(keys=keys, args=args) == -1:
                        self._moved(call_sid, entry)
            else:
                async with asyncio.timeout(OP_TIMEOUT_S):
                    await self._update_remote(call_sid, fields)
        except _UNREACHABLE as exc:
            self._write_failed("update", call_sid, exc, deferred=entry is not None)

    async def _update_remote(self, call_sid: str, fields: dict[str, Any]) -> None:
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
                    data.update(fields)
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

    async def delete(self, call_sid: str, session_hash: str | None = None) -> None:
        entry = self._mirror.get(call_sid)
        token_hash = None
        if session_hash is None or (entry is not None and entry.record.session_hash == session_hash):
            entry = self._unmirror(call_sid)  # ours to forget (a newer session's stays)
            token_hash = entry.record.token_hash if entry is not None else None
        if self._deferring():
            self._tombstone(call_sid, token_hash, session_hash)
            return
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                await self._delete_keys(call_sid, session_hash)
        except _UNREACHABLE as exc:
            self._tombstone(call_sid, token_hash, session_hash)
            self._write_failed("delete", call_sid, exc, deferred=True)
