"""The outbound API: `POST /calls`, `POST /calls/batch`, `GET /calls/batch/{id}`, behind
GATEWAY_API_KEY, with Idempotency-Key so that a client's retry never rings anyone twice."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.call.actions import ActionRefused
from gateway.control.parse import error
from gateway.http.bodies import error_response, json_body, json_response, read_bounded
from gateway.outbound import parse
from gateway.registry.base import RegistryUnavailable
from gateway.services import Gateway

MAX_API_BODY_BYTES = 16 * 1024
MAX_BATCH_BODY_BYTES = 1024 * 1024  # 1,000 recipients with some metadata each
MAX_IDEMPOTENCY_KEY_CHARS = 128

Starter = Callable[[Any], Awaitable[tuple[int, dict[str, Any]]]]


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
        instead of ringing someone twice.
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
                raise error(
                    400, "bad_field", f"Idempotency-Key is at most {MAX_IDEMPOTENCY_KEY_CHARS} characters"
                )
            payload = json_body(await read_bounded(request, limit))
            if key:
                earlier = await store.remember(remembered, "pending")
                if earlier == "pending":
                    raise error(409, "in_progress", "a request with this Idempotency-Key is under way")
                if earlier:
                    status, body = orjson.loads(earlier)
                    return json_response(body, status)
            try:
                status, body = await start(payload)
            except BaseException:
                if key:
                    await store.settle(remembered, "")
                raise
            if key:
                await store.settle(remembered, orjson.dumps([status, body]).decode())
        except ActionRefused as exc:
            return error_response(exc)
        except (RegistryUnavailable, RedisError, OSError):
            return error_response(error(503, "store_unavailable", "the shared store is unreachable; retry"))
        return json_response(body, status)

    def _defaults(self) -> dict[str, str]:
        s = self.gw.settings
        return {"default_from": s.outbound_from or s.transfer_caller_id, "default_agent": s.cartesia_agent_id}

    async def _start_call(self, payload: Any) -> tuple[int, dict[str, Any]]:
        args = parse.parse_call(payload, **self._defaults())
        call_sid = await self.gw.dialer.start_call(args)
        return 201, {"ok": True, "call_sid": call_sid}

    async def _start_batch(self, payload: Any) -> tuple[int, dict[str, Any]]:
        spec = parse.parse_batch(payload, **self._defaults())
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
