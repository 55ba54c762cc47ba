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

Modules: `core` (key names, the record codec, Redis health), `records` (the calls), `mirror` (owned
records, tombstones, heartbeat and resync), `routing` (control requests over pub/sub), `rates`
(rate limits; the script is `lua/rate.lua`), and `registry` (`RedisRegistry`, which combines them).
"""

from gateway.registry.redis.registry import RedisRegistry
from gateway.registry.redis.routing import MAX_INFLIGHT_ROUTES

__all__ = ["MAX_INFLIGHT_ROUTES", "RedisRegistry"]
