"""Outbound call events (CALL_EVENTS_URL): signed JSON POSTs, delivered off the call's path.

`emit()` only serialises and queues; one worker task posts the events in order, with bounded
retries. A slow or dead receiver costs dropped events, never a delayed call or growing memory.

Receivers check `X-Gateway-Signature` with `verify()` (HMAC-SHA256 of the raw body) and
dedupe on `X-Gateway-Event-Id`: a retry after a lost response sends the same id again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import structlog

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Gateway-Signature"
EVENT_HEADER = "X-Gateway-Event"
EVENT_ID_HEADER = "X-Gateway-Event-Id"
EVENT_TYPES = frozenset(
    {
        "call.started",
        "call.ended",
        "transfer.started",
        "transfer.completed",
        "transfer.failed",
        "dtmf",
        "agent.custom",
        "recording.completed",
    }
)
WORKER_TASK_NAME = "call-events-worker"

# Waits between attempts (the last repeats if max_attempts is raised). With the defaults one
# event costs at most 4 attempts x 5 s timeout + 0.5 + 1 + 2 s backoff = 23.5 s, or 35 s when the
# receiver asks for Retry-After >= 5 s each time. The single worker is sequential, so that is
# also the longest a dead receiver holds up the events behind it; meanwhile the queue bound
# below drops the oldest, so the cost is lost events, never memory or call latency.
BACKOFF_S = (0.5, 1.0, 2.0)
# A receiver's Retry-After is honoured up to this: a larger value would stall every later event.
RETRY_AFTER_CAP_S = 5.0
# Statuses below 500 that mean "try again" rather than "this event is wrong".
RETRYABLE_4XX = frozenset({408, 429})
# A bigger event is dropped at emit(): with queue_size=1000 the queue then holds at most
# 32 MiB even in the worst case, ~300 KiB for typical ~300-byte events. Agent payloads arrive
# through the control API, capped at 16 KiB, so this leaves room for the envelope.
MAX_EVENT_BYTES = 32 * 1024
# Drops come in bursts while a receiver is down: one warning per interval, with the count.
DROP_LOG_INTERVAL_S = 10.0

_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS  # data={1: "x"} is odd but not worth losing an event


def sign(secret: str, body: bytes) -> str:
    """The signature header value for `body`: "sha256=<lowercase hex HMAC-SHA256>"."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """True if `header` is the signature of exactly `body` under `secret` (constant time)."""
    if not header:
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode())


def retry_after_s(value: str | None, default: float) -> float:
    """A numeric Retry-After capped at RETRY_AFTER_CAP_S; `default` if absent or not numeric."""
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return default  # the HTTP-date form: not worth parsing for a cap of a few seconds
    if not math.isfinite(seconds) or seconds < 0:
        return default
    return min(seconds, RETRY_AFTER_CAP_S)


@dataclass(frozen=True, slots=True)
class _Queued:
    id: str
    type: str
    body: bytes


class CallEvents:
    """The event sender. One per process, started and closed in the app lifespan.

    Counters: `delivered` (2xx), `failed` (attempted, then given up), `dropped` (never
    attempted: queue overflow, unserialisable or oversized, emitted after close, or still
    queued when close() gave up waiting). emit() must be called from the event loop's thread.
    """

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        instance_id: str = "",
        queue_size: int = 1000,
        max_attempts: int = 4,
        timeout_s: float = 5.0,
    ) -> None:
        self.enabled = bool(url)
        parts = urlsplit(url)
        if self.enabled and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError("CALL_EVENTS_URL must be an http(s) URL")  # no URL: it may hold a token
        if self.enabled and not secret:
            raise ValueError("CALL_EVENTS_URL needs CALL_EVENTS_SECRET: receivers must verify events")
        if queue_size < 1 or max_attempts < 1 or timeout_s <= 0:
            raise ValueError("queue_size and max_attempts must be >= 1 and timeout_s > 0")
        self._url = url
        self._host = parts.hostname or ""  # the only part of the URL that is ever logged
        self._secret = secret
        self._instance = instance_id
        self._max_attempts = max_attempts  # total attempts per event, the first included
        self._timeout_s = timeout_s  # per attempt: connect, send, and the response head
        # Bounded: memory is at most queue_size x MAX_EVENT_BYTES; when full the oldest goes.
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue(maxsize=queue_size)
        self._session: aiohttp.ClientSession | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._unlogged_drops = 0
        self._last_drop_log = -math.inf
        self.delivered = 0
        self.failed = 0
        self.dropped = 0

    async def start(self) -> None:
        if not self.enabled or self._closed or self._worker is not None:
            return
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        self._worker = asyncio.create_task(self._work(), name=WORKER_TASK_NAME)
        log.info("call_events_started", host=self._host, queue_size=self._queue.maxsize)

    async def close(self, drain_s: float = 2.0) -> None:
        """Give queued events up to `drain_s` to go out, then stop. Idempotent."""
        if self._closed:
            return
        self._closed = True  # from here emit() drops: nothing new may extend the drain
        if self._worker is not None:
            if drain_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._queue.join(), drain_s)
            self._worker.cancel()
            await asyncio.wait([self._worker])  # unlike `await`, does not re-raise its CancelledError
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
            self._count_drop()
        if self._session is not None:
            await self._session.close()
        if self.enabled:
            log.info(
                "call_events_closed",
                host=self._host,
                delivered=self.delivered,
                failed=self.failed,
                dropped=self.dropped,
                unlogged_drops=self._unlogged_drops,
            )

    def emit(self, event_type: str, call_sid: str, **data: Any) -> None:
        """Queue an event for delivery. Never blocks, never raises, except on an unknown type."""
        if event_type not in EVENT_TYPES:
            raise ValueError(f"unknown call event type {event_type!r}")  # a bug, even when disabled
        if not self.enabled:
            return
        if self._closed:
            self._drop("closed")
            return
        event_id = uuid.uuid4().hex
        event = {
            "id": event_id,
            "type": event_type,
            "call_sid": call_sid,
            "created_at": time.time(),
            "instance": self._instance,
            "data": data,
        }
        try:
            body = orjson.dumps(event, default=str, option=_ORJSON_OPTIONS)
        except (orjson.JSONEncodeError, TypeError, ValueError):  # e.g. an int past 64 bits
            self._drop("unserialisable", event_type=event_type, call_sid=call_sid)
            return
        if len(body) > MAX_EVENT_BYTES:
            self._drop("too_large", event_type=event_type, call_sid=call_sid, size=len(body))
            return
        if self._queue.full():
            self._queue.get_nowait()  # the oldest: a backlog this deep is stale anyway
            self._queue.task_done()
            self._drop("queue_full")
        self._queue.put_nowait(_Queued(event_id, event_type, body))

    def _count_drop(self) -> bool:
        """Count one drop; True when a warning is due (at most one per DROP_LOG_INTERVAL_S)."""
        self.dropped += 1
        self._unlogged_drops += 1
        now = time.monotonic()
        if now - self._last_drop_log < DROP_LOG_INTERVAL_S:
            return False
        self._last_drop_log = now
        return True

    def _drop(self, reason: str, **fields: Any) -> None:
        if self._count_drop():
            log.warning(
                "call_events_dropped",
                reason=reason,
                count=self._unlogged_drops,
                total=self.dropped,
                host=self._host,
                **fields,
            )
            self._unlogged_drops = 0

    async def _work(self) -> None:
        # Sequential on purpose: one call's events reach the receiver in the order emitted.
        while True:
            item = await self._queue.get()
            try:
                await self._deliver(item)
            except Exception:  # a bug here must not stop every later event
                self.failed += 1
                log.exception("call_event_delivery_crashed", event_type=item.type, event_id=item.id)
            finally:
                self._queue.task_done()

    async def _deliver(self, item: _Queued) -> None:
        assert self._session is not None
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._secret, item.body),
            EVENT_HEADER: item.type,
            EVENT_ID_HEADER: item.id,
        }
        bound = log.bind(event_type=item.type, event_id=item.id, host=self._host)
        for attempt in range(1, self._max_attempts + 1):
            delay = BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)]
            try:
                # No redirects: following one would hand the signed event to another URL.
                async with self._session.post(
                    self._url, data=item.body, headers=headers, allow_redirects=False
                ) as resp:
                    status, retry_after = resp.status, resp.headers.get("Retry-After")
            except (TimeoutError, OSError, aiohttp.ClientError) as exc:
                # The type only: aiohttp's messages can quote the URL, and with it a token.
                outcome: dict[str, Any] = {"error": type(exc).__name__}
            else:
                if 200 <= status < 300:
                    self.delivered += 1
                    bound.debug("call_event_delivered", status=status, attempt=attempt)
                    return
                if status < 500 and status not in RETRYABLE_4XX:
                    self.failed += 1
                    bound.warning("call_event_rejected", status=status, attempt=attempt)
                    return
                outcome = {"status": status}
                delay = retry_after_s(retry_after, delay)
            if attempt == self._max_attempts:
                self.failed += 1
                bound.warning("call_event_failed", attempts=attempt, **outcome)
                return
            bound.info("call_event_retry", attempt=attempt, delay_s=delay, **outcome)
            await asyncio.sleep(delay)
