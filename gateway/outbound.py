"""Outbound calls: one at a time (`POST /calls`) or in batches (`POST /calls/batch`).

Every start is paced at CALLS_PER_SECOND and every live outbound call holds one of
MAX_CONCURRENT_CALLS slots, across all instances (the store is Redis when REDIS_URL is set).

A batch survives an instance restart without losing or ringing anyone twice:
- a recipient is claimed atomically (one instance dials it) and marked `claimed` with its owner;
- the Twilio call's status callback (first `initiated`) marks it `dialled` with its call SID,
  whichever instance receives it, so a call that was created just before its owner died is known;
- a claim whose owner's heartbeat has expired, and that no callback has reached after
  STALE_CLAIM_S, was never dialled, and goes back to the queue for another instance.
"""

from __future__ import annotations

import abc
import asyncio
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson
import structlog
from redis.asyncio import Redis

from gateway.carriers.twilio_rest import TwilioRestError
from gateway.control import error, is_e164, is_sip_uri, normalise_destination
from gateway.registry.base import CallRecord, SessionRegistry, digest, new_secret

log = structlog.get_logger(__name__)

MAX_BATCH_RECIPIENTS = 1000
# A claim with no callback after this long, whose owner is gone, was never dialled. Twilio
# posts `initiated` within a second of creating a call; 15 s leaves room for a slow network.
STALE_CLAIM_S = 15.0
# A slot whose final status never came (a lost callback) is freed after this long, so a
# lost webhook cannot shrink the concurrency cap for ever.
SLOT_TTL_S = 4 * 3600
# Batches and their progress are kept this long after they finish, for GET /calls/batch/{id}.
BATCH_TTL_S = 7 * 86400
# Finished batches the embedded store keeps for GET /calls/batch/{id}, oldest forgotten first.
MAX_FINISHED_BATCHES_IN_MEMORY = 100
# A client's Idempotency-Key is honoured this long (a retry after a timeout comes within it).
IDEMPOTENCY_TTL_S = 24 * 3600
MAX_IDEMPOTENCY_KEYS = 100_000
# An outbound call's record waits this long for its answer: ringing, machine detection
# (DetectMessageEnd waits for the greeting to end) and Twilio's own queueing.
DIALING_TTL_S = 600
# A recipient Twilio turned away for being busy (20429, 429, 503) is tried again after this.
BUSY_RETRY_S = 2.0
# On shutdown, in-flight call creations get this long to finish (each is bounded by the REST
# client's own timeout); they are never cancelled halfway, which could ring someone twice.
CLOSE_WAIT_S = 15.0
# Calls being created at once by one instance's batch worker.
MAX_PARALLEL_CREATES = 8
WORKER_IDLE_S = 0.2
FINAL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
TERMINAL = frozenset({"done", "failed"})


@dataclass
class Recipient:
    to: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchSpec:
    recipients: list[Recipient]
    from_: str
    agent: str
    metadata: dict[str, Any] = field(default_factory=dict)
    machine_detection: str = ""
    batch_id: str = field(default_factory=lambda: "BA" + secrets.token_hex(16))

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "batch_id": self.batch_id,
                "from": self.from_,
                "agent": self.agent,
                "metadata": self.metadata,
                "machine_detection": self.machine_detection,
                "recipients": [{"to": r.to, "metadata": r.metadata} for r in self.recipients],
                "created_at": time.time(),
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> BatchSpec:
        data = orjson.loads(raw)
        return cls(
            recipients=[Recipient(r["to"], r.get("metadata", {})) for r in data["recipients"]],
            from_=data["from"],
            agent=data["agent"],
            metadata=data.get("metadata", {}),
            machine_detection=data.get("machine_detection", ""),
            batch_id=data["batch_id"],
        )


class OutboundStore(abc.ABC):
    """Pacing, concurrency slots and batch progress, shared by every instance."""

    @abc.abstractmethod
    async def reserve_start(self, per_second: float) -> float:
        """Reserve the next start; seconds to wait before making it (0: now)."""

    @abc.abstractmethod
    async def acquire_slot(self, member: str, cap: int) -> bool: ...

    @abc.abstractmethod
    async def release_slot(self, member: str) -> None: ...

    @abc.abstractmethod
    async def active_slots(self) -> int: ...

    @abc.abstractmethod
    async def create_batch(self, spec: BatchSpec) -> None: ...

    @abc.abstractmethod
    async def batch(self, batch_id: str) -> tuple[BatchSpec, dict[int, dict[str, Any]]] | None:
        """The batch and each recipient's state (index -> state)."""

    @abc.abstractmethod
    async def active_batches(self) -> list[str]: ...

    @abc.abstractmethod
    async def claim(self, batch_id: str, owner: str, slot: str) -> int | None:
        """Take the next pending recipient for `owner`; None when none is left."""

    @abc.abstractmethod
    async def update(
        self, batch_id: str, index: int, state: dict[str, Any], *, only_from: tuple[str, ...]
    ) -> bool:
        """Set a recipient's state if its current status is one of `only_from`."""

    @abc.abstractmethod
    async def requeue(self, batch_id: str, index: int) -> None:
        """Put a claimed-but-never-dialled recipient back at the front of the queue."""

    @abc.abstractmethod
    async def finish_batch(self, batch_id: str) -> None: ...

    @abc.abstractmethod
    async def remember(self, key: str, value: str) -> str | None:
        """Store `value` under an Idempotency-Key unless one is there; the existing value if so."""

    @abc.abstractmethod
    async def settle(self, key: str, value: str) -> None:
        """Replace a remembered placeholder with the final answer ("" forgets the key)."""

    async def close(self) -> None:
        return None


class MemoryOutboundStore(OutboundStore):
    """One instance: everything in this process (lost on restart; use Redis for durability)."""

    def __init__(self) -> None:
        self._next_start = 0.0
        self._slots: dict[str, float] = {}
        self._batches: dict[str, BatchSpec] = {}
        self._states: dict[str, dict[int, dict[str, Any]]] = {}
        self._pending: dict[str, deque[int]] = {}
        self._finished: deque[str] = deque()
        self._keys: dict[str, tuple[str, float]] = {}

    async def reserve_start(self, per_second: float) -> float:
        now = time.monotonic()
        start = max(now, self._next_start)
        self._next_start = start + 1.0 / per_second
        return start - now

    async def acquire_slot(self, member: str, cap: int) -> bool:
        now = time.monotonic()
        for stale in [m for m, at in self._slots.items() if now - at > SLOT_TTL_S]:
            del self._slots[stale]
        if len(self._slots) >= cap:
            return False
        self._slots[member] = now
        return True

    async def release_slot(self, member: str) -> None:
        self._slots.pop(member, None)

    async def active_slots(self) -> int:
        return len(self._slots)

    async def create_batch(self, spec: BatchSpec) -> None:
        self._batches[spec.batch_id] = spec
        self._states[spec.batch_id] = {i: {"status": "pending"} for i in range(len(spec.recipients))}
        self._pending[spec.batch_id] = deque(range(len(spec.recipients)))

    async def batch(self, batch_id: str) -> tuple[BatchSpec, dict[int, dict[str, Any]]] | None:
        if batch_id not in self._batches:
            return None
        return self._batches[batch_id], {i: dict(s) for i, s in self._states[batch_id].items()}

    async def active_batches(self) -> list[str]:
        return list(self._pending)

    async def claim(self, batch_id: str, owner: str, slot: str) -> int | None:
        pending = self._pending.get(batch_id)
        if not pending:
            return None
        index = pending.popleft()
        self._states[batch_id][index] = {"status": "claimed", "owner": owner, "slot": slot, "at": time.time()}
        return index

    async def update(
        self, batch_id: str, index: int, state: dict[str, Any], *, only_from: tuple[str, ...]
    ) -> bool:
        states = self._states.get(batch_id)
        if states is None or index not in states or states[index].get("status") not in only_from:
            return False
        states[index] = {**states[index], **state}
        return True

    async def requeue(self, batch_id: str, index: int) -> None:
        if await self.update(batch_id, index, {"status": "pending"}, only_from=("claimed",)):
            self._pending.setdefault(batch_id, deque()).appendleft(index)

    async def finish_batch(self, batch_id: str) -> None:
        self._pending.pop(batch_id, None)
        self._finished.append(batch_id)
        while len(self._finished) > MAX_FINISHED_BATCHES_IN_MEMORY:
            old = self._finished.popleft()
            self._batches.pop(old, None)
            self._states.pop(old, None)

    async def remember(self, key: str, value: str) -> str | None:
        now = time.monotonic()
        for stale in [k for k, (_, at) in self._keys.items() if now - at > IDEMPOTENCY_TTL_S]:
            del self._keys[stale]
        if self._keys.get(key, ("", 0.0))[0]:
            return self._keys[key][0]
        if len(self._keys) >= MAX_IDEMPOTENCY_KEYS:
            del self._keys[next(iter(self._keys))]
        self._keys[key] = (value, now)
        return None

    async def settle(self, key: str, value: str) -> None:
        self._keys[key] = (value, time.monotonic())


_PACE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
local start = math.max(now, nxt)
redis.call('SET', KEYS[1], start + tonumber(ARGV[1]), 'PX', tonumber(ARGV[1]) + 60000)
return start - now
"""
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
return 1
"""
_CLAIM = """
local index = redis.call('LPOP', KEYS[1])
if not index then return nil end
redis.call('HSET', KEYS[2], index, ARGV[1])
return index
"""
_REQUEUE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current or cjson.decode(current)['status'] ~= 'claimed' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
"""
_IDEMPOTENT = """
local existing = redis.call('GET', KEYS[1])
if existing and existing ~= '' then return existing end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return false
"""
_UPDATE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
local status = cjson.decode(current)['status']
for i = 3, #ARGV do
  if ARGV[i] == status then
    local merged = cjson.decode(current)
    for k, v in pairs(cjson.decode(ARGV[2])) do merged[k] = v end
    redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(merged))
    return 1
  end
end
return 0
"""


class RedisOutboundStore(OutboundStore):
    """Shared by every instance on one Redis; survives any instance's restart."""

    def __init__(self, url: str, key_prefix: str = "lgw:") -> None:
        self._redis = Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=1.0, max_connections=16)
        self._p = key_prefix
        self._pace = self._redis.register_script(_PACE)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._claim = self._redis.register_script(_CLAIM)
        self._update = self._redis.register_script(_UPDATE)
        self._requeue = self._redis.register_script(_REQUEUE)
        self._idempotent = self._redis.register_script(_IDEMPOTENT)

    async def close(self) -> None:
        await self._redis.aclose()

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
        raw = await self._redis.get(self._k("batch", batch_id, "spec"))
        if raw is None:
            return None
        states = await self._redis.hgetall(self._k("batch", batch_id, "state"))
        return BatchSpec.from_json(raw), {int(i): orjson.loads(s) for i, s in states.items()}

    async def active_batches(self) -> list[str]:
        return [b.decode() for b in await self._redis.smembers(self._k("batches"))]

    async def claim(self, batch_id: str, owner: str, slot: str) -> int | None:
        state = orjson.dumps({"status": "claimed", "owner": owner, "slot": slot, "at": time.time()})
        keys = [self._k("batch", batch_id, "pending"), self._k("batch", batch_id, "state")]
        index = await self._claim(keys=keys, args=[state])
        return None if index is None else int(index)

    async def update(
        self, batch_id: str, index: int, state: dict[str, Any], *, only_from: tuple[str, ...]
    ) -> bool:
        keys = [self._k("batch", batch_id, "state")]
        return bool(await self._update(keys=keys, args=[index, orjson.dumps(state), *only_from]))

    async def requeue(self, batch_id: str, index: int) -> None:
        # One script: a crash between marking it pending and queueing it would lose it.
        keys = [self._k("batch", batch_id, "state"), self._k("batch", batch_id, "pending")]
        await self._requeue(keys=keys, args=[index, orjson.dumps({"status": "pending"})])

    async def finish_batch(self, batch_id: str) -> None:
        await self._redis.srem(self._k("batches"), batch_id)

    async def remember(self, key: str, value: str) -> str | None:
        result = await self._idempotent(keys=[self._k("idempotency", key)], args=[value, IDEMPOTENCY_TTL_S])
        return None if result is None else (result.decode() if isinstance(result, bytes) else str(result))

    async def settle(self, key: str, value: str) -> None:
        await self._redis.set(self._k("idempotency", key), value, ex=IDEMPOTENCY_TTL_S)


MACHINE_DETECTION = {"true": "Enable", "enable": "Enable", "detectmessageend": "DetectMessageEnd"}


def _destination(value: Any, field_name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise error(400, "bad_field", f"'{field_name}' must be an E.164 number or a sip: URI")
    target = normalise_destination(value)
    if not (is_sip_uri(target) if target.lower().startswith("sip") else is_e164(target)):
        raise error(422, "invalid_destination", f"{field_name} {target!r} is not E.164 or a sip: URI")
    return target


def _metadata(value: Any, field_name: str = "metadata") -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise error(400, "bad_field", f"'{field_name}' must be an object")
    return value


def _machine_detection(value: Any) -> str:
    if value in (None, False, ""):
        return ""
    key = str(value).lower()
    if key not in MACHINE_DETECTION:
        raise error(400, "bad_field", "'machine_detection' must be true, 'Enable' or 'DetectMessageEnd'")
    return MACHINE_DETECTION[key]


def parse_call(payload: Any, *, default_from: str, default_agent: str) -> dict[str, Any]:
    """`POST /calls` body -> arguments of Dialer.dial (400/422 with a clear message otherwise)."""
    if not isinstance(payload, dict):
        raise error(400, "malformed_json", "the body must be a JSON object")
    agent = payload.get("agent") or default_agent
    if not isinstance(agent, str) or not agent:
        raise error(400, "bad_field", "'agent' is required (or set CARTESIA_AGENT_ID)")
    return {
        "to": _destination(payload.get("to"), "to"),
        "from_": _destination(payload.get("from") or default_from, "from"),
        "agent": agent,
        "metadata": _metadata(payload.get("metadata")),
        "machine_detection": _machine_detection(payload.get("machine_detection")),
    }


def parse_batch(payload: Any, *, default_from: str, default_agent: str) -> BatchSpec:
    if not isinstance(payload, dict):
        raise error(400, "malformed_json", "the body must be a JSON object")
    recipients = payload.get("recipients")
    if not isinstance(recipients, list) or not 0 < len(recipients) <= MAX_BATCH_RECIPIENTS:
        raise error(400, "bad_field", f"'recipients' must be a list of 1 to {MAX_BATCH_RECIPIENTS}")
    base = parse_call(
        {**payload, "to": "+10000000000"}, default_from=default_from, default_agent=default_agent
    )
    parsed = []
    for i, item in enumerate(recipients):
        item = {"to": item} if isinstance(item, str) else item
        if not isinstance(item, dict):
            raise error(400, "bad_field", f"recipients[{i}] must be a number or an object with 'to'")
        parsed.append(
            Recipient(_destination(item.get("to"), f"recipients[{i}].to"), _metadata(item.get("metadata")))
        )
    return BatchSpec(
        recipients=parsed,
        from_=base["from_"],
        agent=base["agent"],
        metadata=base["metadata"],
        machine_detection=base["machine_detection"],
    )


def progress(spec: BatchSpec, states: dict[int, dict[str, Any]]) -> dict[str, Any]:
    counts = Counter(s.get("status", "pending") for s in states.values())
    outcomes = Counter(s.get("outcome", "") for s in states.values() if s.get("status") == "done")
    finished = counts["done"] + counts["failed"]
    return {
        "batch_id": spec.batch_id,
        "total": len(spec.recipients),
        "pending": counts["pending"],
        "in_progress": counts["claimed"] + counts["dialled"],
        "done": counts["done"],
        "failed": counts["failed"],
        "outcomes": dict(outcomes),
        "state": "finished" if finished == len(spec.recipients) else "running",
    }


CreateCall = Callable[..., Awaitable[str]]  # TwilioCalls.create_call
UrlBuilder = Callable[[str, str], str]


class Dialer:
    """Starts outbound calls and runs this instance's share of every batch."""

    def __init__(
        self,
        store: OutboundStore,
        registry: SessionRegistry,
        create_call: CreateCall,
        url: UrlBuilder,
        *,
        calls_per_second: float,
        max_concurrent: int,
    ) -> None:
        self.store = store
        self._registry = registry
        self._create_call = create_call
        self._url = url
        self._rate = calls_per_second
        self._cap = max_concurrent
        self._worker: asyncio.Task[None] | None = None
        self._creates = asyncio.Semaphore(MAX_PARALLEL_CREATES)
        self._jobs: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._run_batches(), name="batch-worker")

    def stop_claiming(self) -> None:
        """Draining: this instance takes no more recipients (others carry the batch on)."""
        if self._worker is not None:
            self._worker.cancel()

    async def close(self) -> None:
        self.stop_claiming()
        if self._worker is not None:
            await asyncio.gather(self._worker, return_exceptions=True)
        if self._jobs:
            # Not cancelled: a create cut off after Twilio accepted it would leave a claim
            # that looks undialled, and the recipient would be rung again.
            await asyncio.wait(set(self._jobs), timeout=CLOSE_WAIT_S)
        await self.store.close()

    async def dial(
        self,
        *,
        to: str,
        from_: str,
        agent: str,
        metadata: dict[str, Any],
        machine_detection: str = "",
        slot: str,
        status_query: dict[str, str] | None = None,
    ) -> str:
        """Create the Twilio call and register it so its answer reaches `agent` with `metadata`.

        The caller holds `slot` and has waited for its start; on failure the slot is freed here.
        """
        query = urlencode({"slot": slot, **(status_query or {})})
        fields: dict[str, Any] = {
            "to": to,
            "from_": from_,
            "url": self._url("/twilio/voice", urlencode({"agent": agent})),
            "method": "POST",
            "status_callback": self._url("/twilio/status", query),
            "status_callback_event": ["initiated", "ringing", "answered", "completed"],
            "status_callback_method": "POST",
        }
        if machine_detection:
            fields["machine_detection"] = machine_detection
        try:
            call_sid = await self._create_call(**fields)
        except Exception:
            await self.store.release_slot(slot)
            raise
        record = CallRecord(
            call_sid=call_sid,
            owner=self._registry.instance_id,
            state="dialing",
            from_=from_,
            to=to,
            agent_id=agent,
            direction="outbound-api",
            token_hash=digest(new_secret()),  # the real token is minted when the call answers
            metadata=metadata,
        )
        try:
            await self._registry.put(record, DIALING_TTL_S)
        except Exception as exc:
            log.warning("outbound_record_not_saved", call_sid=call_sid, error=str(exc))
        log.info("outbound_call_started", call_sid=call_sid, agent_id=agent)
        return call_sid

    async def call_status(self, call_sid: str, status: str, query: dict[str, str]) -> None:
        """A status callback for a call we started: progress the batch, free the slot when over."""
        batch_id, index = query.get("batch", ""), query.get("r", "")
        if batch_id and index.isdigit():
            if status in FINAL_STATUSES:
                await self.store.update(
                    batch_id,
                    int(index),
                    {"status": "done", "outcome": status, "call_sid": call_sid},
                    only_from=("claimed", "dialled"),
                )
            else:
                await self.store.update(
                    batch_id, int(index), {"status": "dialled", "call_sid": call_sid}, only_from=("claimed",)
                )
        if status in FINAL_STATUSES and query.get("slot"):
            await self.store.release_slot(query["slot"])

    # Batches

    async def _run_batches(self) -> None:
        backoff = WORKER_IDLE_S
        last_sweep = 0.0
        while True:
            try:
                busy = False
                for batch_id in await self.store.active_batches():
                    if time.monotonic() - last_sweep > 2.0:
                        await self._sweep(batch_id)
                    busy |= await self._dial_next(batch_id)
                if time.monotonic() - last_sweep > 2.0:
                    last_sweep = time.monotonic()
                backoff = WORKER_IDLE_S
                if not busy:
                    await asyncio.sleep(WORKER_IDLE_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is unreachable: try again, slower
                log.warning("batch_worker_error", error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _dial_next(self, batch_id: str) -> bool:
        slot = "b" + secrets.token_hex(8)  # URL-safe as is: it travels in a signed URL
        if not await self.store.acquire_slot(slot, self._cap):
            return False
        index = await self.store.claim(batch_id, self._registry.instance_id, slot)
        if index is None:
            await self.store.release_slot(slot)
            return False
        # Paced only once there is someone to call: an idle batch must not use up the rate.
        wait = await self.store.reserve_start(self._rate)
        if wait > 0:
            await asyncio.sleep(wait)
        found = await self.store.batch(batch_id)
        assert found is not None
        spec = found[0]
        await self._creates.acquire()
        job = asyncio.create_task(self._dial_recipient(spec, index, slot))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        return True

    async def _dial_recipient(self, spec: BatchSpec, index: int, slot: str) -> None:
        recipient = spec.recipients[index]
        try:
            call_sid = await self.dial(
                to=recipient.to,
                from_=spec.from_,
                agent=spec.agent,
                metadata={**spec.metadata, **recipient.metadata, "batch_id": spec.batch_id},
                machine_detection=spec.machine_detection,
                slot=slot,
                status_query={"batch": spec.batch_id, "r": str(index)},
            )
        except TwilioRestError as exc:
            if exc.nothing_created:  # Twilio was too busy: nobody was called, try again later
                log.warning("batch_call_deferred", batch_id=spec.batch_id, index=index, error=str(exc))
                await asyncio.sleep(BUSY_RETRY_S)
                await self.store.requeue(spec.batch_id, index)
            else:
                log.warning("batch_call_failed", batch_id=spec.batch_id, index=index, error=str(exc))
                await self.store.update(
                    spec.batch_id, index, {"status": "failed", "error": str(exc)}, only_from=("claimed",)
                )
        else:
            await self.store.update(
                spec.batch_id, index, {"status": "dialled", "call_sid": call_sid}, only_from=("claimed",)
            )
        finally:
            self._creates.release()

    async def _sweep(self, batch_id: str) -> None:
        """Requeue claims of dead instances that never dialled; close finished batches."""
        found = await self.store.batch(batch_id)
        if found is None:
            await self.store.finish_batch(batch_id)
            return
        spec, states = found
        now = time.time()
        for index, state in states.items():
            if state.get("status") != "claimed" or now - state.get("at", now) < STALE_CLAIM_S:
                continue
            owner = state.get("owner", "")
            if owner != self._registry.instance_id and not await self._registry.owner_alive(owner):
                log.warning("batch_claim_requeued", batch_id=batch_id, index=index)
                await self.store.release_slot(state.get("slot", ""))
                await self.store.requeue(batch_id, index)
        if all(s.get("status") in TERMINAL for s in states.values()):
            await self.store.finish_batch(batch_id)
            log.info("batch_finished", batch_id=batch_id, **progress(spec, states))
