"""The control API (/control/{token}): what an agent's tools POST to hang up, transfer or send
DTMF, and GET to see the call. Parsing and carrying out live in gateway.control."""

from __future__ import annotations

import time

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.call.actions import ActionRefused
from gateway.control.parse import ACTIONS, MAX_BODY_BYTES, error, parse_body
from gateway.http.bodies import error_response, json_response, read_bounded
from gateway.registry.base import RegistryUnavailable, digest
from gateway.services import Gateway

log = structlog.get_logger(__name__)


class ControlApi:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def routes(self) -> list[BaseRoute]:
        return [Route("/control/{token}", self.handle, methods=["GET", "POST"])]

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        # The metrics' labels: the action is canonical once the body names a known one; a
        # handler that raises counts as 500.
        action, status = ("state" if request.method == "GET" else "unknown"), 500
        control = self.gw.control
        try:
            try:
                record = await control.call_for(digest(request.path_params["token"]))
                if request.method == "GET":
                    response = json_response(control.snapshot(record))
                else:
                    payload = parse_body(await read_bounded(request, MAX_BODY_BYTES))
                    action = ACTIONS[payload["action"]]
                    body = await control.execute(record, payload)
                    log.info("control_accepted", call_sid=record.call_sid, action=body.get("action"))
                    response = json_response(body)
            except RegistryUnavailable:
                response = error_response(
                    error(503, "registry_unavailable", "the call registry cannot be reached; retry")
                )
            except ActionRefused as exc:
                response = error_response(exc)
            status = response.status_code
            return response
        finally:
            self.gw.metrics.control_request(action, status, time.perf_counter() - started)
