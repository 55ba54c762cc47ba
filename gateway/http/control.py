"""The control API (/control/{token}): what an agent's tools POST to hang up, transfer or send
DTMF, and GET to see the call. Parsing and carrying out live in gateway.control."""

from __future__ import annotations

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.call.actions import ActionRefused
from gateway.control.parse import MAX_BODY_BYTES, error
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
        control = self.gw.control
        try:
            record = await control.call_for(digest(request.path_params["token"]))
            if request.method == "GET":
                return json_response(control.snapshot(record))
            body = await control.execute(record, await read_bounded(request, MAX_BODY_BYTES))
        except RegistryUnavailable:
            return self._refused(
                error(503, "registry_unavailable", "the call registry cannot be reached; retry")
            )
        except ActionRefused as exc:
            return self._refused(exc)
        self.gw.metrics.control(200)
        log.info("control_accepted", call_sid=record.call_sid, action=body.get("action"))
        return json_response(body)

    def _refused(self, exc: ActionRefused) -> Response:
        self.gw.metrics.control(exc.status)
        return error_response(exc)
