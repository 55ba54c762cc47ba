"""Outbound calls: one at a time (`POST /calls`) or in batches (`POST /calls/batch`).

Every start is paced at CALLS_PER_SECOND and every live outbound call holds one of
MAX_CONCURRENT_CALLS slots, across all instances (the store is Redis when REDIS_URL is set).

A batch survives an instance restart without losing or ringing anyone twice:
- a recipient is claimed atomically (one instance dials it) and marked `claimed` with its owner;
- the Twilio call's status callback (first `initiated`) marks it `dialled` with its call SID,
  whichever instance receives it, so a call that was created just before its owner died is known;
- a claim whose owner's heartbeat has expired, and that no callback has reached after
  STALE_CLAIM_S, was never dialled, and goes back to the queue for another instance.

Modules:
- parse.py         request bodies -> Recipient / BatchSpec; a batch's progress
- dialer.py        Dialer: starting calls, the batch worker, the stale-claim sweep, status callbacks
- store.py         OutboundStore, the interface both stores implement
- store_memory.py  MemoryOutboundStore (one instance)
- store_redis.py   RedisOutboundStore (every instance), with its Lua scripts in lua/

Tunables live in the module that reads them (e.g. dialer.STALE_CLAIM_S); patch them there.
"""
