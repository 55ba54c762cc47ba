"""Control requests for a call held on another instance, routed over pub/sub.

The requester publishes `{"reply_to": key, "request": {...}}` on `route:{owner}` and BLPOPs
`key`; the owner's subscriber runs its handler and LPUSHes the reply there.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.registry.base import OwnerGone, RouteHandler
from gateway.registry.redis.core import (
    _UNREACHABLE,
    BACKOFF_MAX_S,
    BACKOFF_MIN_S,
    OP_TIMEOUT_S,
    RedisCore,
    log,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

# Routed requests handled at once; one more is answered 503 straight away.
MAX_INFLIGHT_ROUTES = 64
# 503 answers being sent at once; beyond this a flood is dropped (the requesters time out).
MAX_OVERFLOW_REPLIES = 256
REPLY_TTL_S = 10
# The subscriber pings when idle this long, and reconnects when it hears nothing for twice that.
SUBSCRIBER_IDLE_PING_S = 5.0


class RoutingMixin(RedisCore):
    _blocking: Redis  # BLPOPs, on their own pool: each holds a connection while it waits
    _sub_client: Redis
    _handler: RouteHandler | None
    _subscribed: asyncio.Event
    _inflight: set[asyncio.Task[None]]
    _overflow: set[asyncio.Task[None]]

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
                    # Its subscription is gone with its connection: the process has died.
                    log.info("route_no_listener", owner=owner)
                    raise OwnerGone(owner)
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


def _error_reply(status: int, code: str, message: str) -> dict[str, Any]:
    return {"status": status, "body": {"ok": False, "error": {"code": code, "message": message}}}
