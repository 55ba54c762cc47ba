"""The outbound API: `POST /calls`, `POST /calls/batch`, `GET /calls/batch/{id}`, behind
GATEWAY_API_KEY, with Idempotency-Key so that a client's retry never rings anyone twice."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.call.actions import ActionRefused
from gateway.carriers.twilio.rest import TwilioRestError
from gateway.control.parse import error
from gateway.http.bodies import error_response, json_body, json_response, read_bounded
from gateway.outbound import parse
from gateway.outbound.dialer import CallOutcomeUnknown
from gateway.registry.base import RegistryUnavailable
from gateway.services import Gateway

MAX_API_BODY_BYTES = 16 * 1024
MAX_BATCH_BODY_BYTES = 1024 * 1024  # 1,000 recipients with some metadata each
MAX_IDEMPOTENCY_KEY_CHARS = 128

Starter = Callable[[Any, str], Awaitable[tuple[int, dict[str, Any]]]]
# A request still `pending` after this long died with its instance (the longest takes ~25 s:
# its turn under CALLS_PER_SECOND, then Twilio's answer).
PENDING_STALE_S = 60.0
# An unanswered create is taken as not made only when no call shows up this long after it.
SETTLE_AFTER_S = 15.0


def _unknown_body() -> dict[str, Any]:
    return {
        "ok": True,
        "call_sid": None,
        "status": "unknown",
        "message": "Twilio did not answer in time, so the call may exist; retry with the same "
        "Idempotency-Key to learn its SID (it will not ring twice)",
    }


class OutboundApi:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/calls", self.call, methods=["POST"]),
            Route("/calls/batch", self.batch, methods=["POST"]),
            Route("/calls/batch/{batch_id}", self.batch_progress, methods=["GET"]),
        ]

    def _refusal(self, request: Request) -> ActionRefused | None:
        key = self.gw.settings.gateway_api_key
        if not key:
            return error(404, "outbound_disabled", "outbound calls need GATEWAY_API_KEY")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return error(401, "unauthorized", "a valid 'Authorization: Bearer <GATEWAY_API_KEY>' is needed")
        return None

    async def call(self, request: Request) -> Response:
        return await self._start(request, MAX_API_BODY_BYTES, self._start_call)

    async def batch(self, request: Request) -> Response:
        return await self._start(request, MAX_BATCH_BODY_BYTES, self._start_batch)

    async def _start(self, request: Request, limit: int, start: Starter) -> Response:
        """Auth, body, draining, store errors and Idempotency-Key, for POST /calls and /calls/batch.

        With an Idempotency-Key, a client retrying after a timeout gets the first answer back
        instead of ringing someone twice: when that first attempt's outcome is unknown (Twilio
        did not answer the create), or the instance handling it died, the retry settles it.
        """
        store = self.gw.dialer.store
        key = request.headers.get("idempotency-key", "")
        remembered = f"{request.url.path}:{key}"
        try:
            refused = self._refusal(request)
            if refused:
                raise refused
            if self.gw.draining:
                raise error(503, "draining", "this instance is shutting down; retry")
            if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
                too_long = f"Idempotency-Key is at most {MAX_IDEMPOTENCY_KEY_CHARS} characters"
                raise error(400, "bad_field", too_long)
            payload = json_body(await read_bounded(request, limit))
            if key:
                pending = orjson.dumps({"pending": time.time()}).decode()
                earlier = await store.remember(remembered, pending)
                if earlier:
                    answer = await self._earlier(remembered, earlier, payload)
                    if answer is not None:
                        return json_response(answer[1], answer[0])
                    if not await store.take_over(remembered, earlier, pending):  # one retry goes on
                        raise error(409, "in_progress", "a request with this Idempotency-Key is under way")
            try:
                status, body = await start(payload, remembered if key else "")
                stored: list[Any] = [status, body]
            except CallOutcomeUnknown as unknown:
                status, body = 202, _unknown_body()
                stored = [status, body, unknown.attempt]
            except BaseException:
                if key:
                    await store.settle(remembered, "")
                raise
            if key:
                await store.settle(remembered, orjson.dumps(stored).decode())
        except ActionRefused as exc:
            return error_response(exc)
        except TwilioRestError as exc:  # a lookup that settles an earlier attempt failed
            return error_response(error(503, "twilio_unreachable", f"{exc}; retry"))
        except (RegistryUnavailable, RedisError, OSError):
            return error_response(error(503, "store_unavailable", "the shared store is unreachable; retry"))
        return json_response(body, status)

    async def _earlier(self, remembered: str, earlier: str, payload: Any) -> tuple[int, Any] | None:
        """The answer for a retried Idempotency-Key, or None when this request must carry on
        (the earlier one made no call, or died before it could)."""
        value = orjson.loads(earlier)
        if isinstance(value, list) and len(value) == 2:
            return value[0], value[1]  # settled
        dialer = self.gw.dialer
        if isinstance(value, list):  # Twilio did not answer the create: did it make the call?
            attempt = value[2]
            call_sid = await dialer.settle(attempt["to"], attempt["from"], attempt["at"])
            if call_sid is None and time.time() - attempt["at"] < SETTLE_AFTER_S:
                return 202, _unknown_body()  # too early to say no: its callback may still come
            if call_sid is None:
                await dialer.store.release_slot(attempt["slot"])
                return None
            return await self._settled(remembered, call_sid)
        since = value.get("pending", 0.0) if isinstance(value, dict) else 0.0
        if time.time() - since < PENDING_STALE_S:
            raise error(409, "in_progress", "a request with this Idempotency-Key is under way")
        # The instance handling it died. A batch is created under an id the key decides, so it
        # cannot be created twice; a call is looked up before it is dialled again.
        if remembered.startswith("/calls:") and isinstance(payload, dict):
            args = parse.parse_call(payload, **self._defaults())
            call_sid = await dialer.settle(args["to"], args["from_"], since)
            if call_sid is not None:
                return await self._settled(remembered, call_sid)
        return None

    async def _settled(self, remembered: str, call_sid: str) -> tuple[int, Any]:
        """The call an earlier attempt made, found: that is the key's answer from now on."""
        answer: tuple[int, Any] = (201, {"ok": True, "call_sid": call_sid})
        await self.gw.dialer.store.settle(remembered, orjson.dumps(answer).decode())
        return answer

    def _defaults(self) -> dict[str, str]:
        s = self.gw.settings
        return {"default_from": s.outbound_from or s.transfer_caller_id, "default_agent": s.cartesia_agent_id}

    async def _start_call(self, payload: Any, _key: str) -> tuple[int, dict[str, Any]]:
        args = parse.parse_call(payload, **self._defaults())
        call_sid = await self.gw.dialer.start_call(args)
        return 201, {"ok": True, "call_sid": call_sid}

    async def _start_batch(self, payload: Any, key: str) -> tuple[int, dict[str, Any]]:
        spec = parse.parse_batch(payload, **self._defaults())
        if key:  # a retry after a crash creates the same batch, not a second one
            spec.batch_id = "BA" + hashlib.sha256(key.encode()).hexdigest()[:32]
        await self.gw.dialer.start_batch(spec)
        return 202, {"ok": True, "batch_id": spec.batch_id, "total": len(spec.recipients)}

    async def batch_progress(self, request: Request) -> Response:
        refused = self._refusal(request)
        if refused:
            return error_response(refused)
        try:
            found = await self.gw.dialer.store.batch(request.path_params["batch_id"])
        except (RedisError, OSError):
            return error_response(error(503, "store_unavailable", "the shared store is unreachable"))
        if found is None:
            return error_response(error(404, "not_found", "no such batch"))
        return json_response({"ok": True, **parse.progress(*found)})
