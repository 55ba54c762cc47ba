"""What the platform asks: liveness, readiness (off while draining) and metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.http.bodies import json_response
from gateway.services import Gateway


class Platform:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]

    async def healthz(self, _request: Request) -> Response:
        return json_response({"ok": True})

    async def readyz(self, _request: Request) -> Response:
        draining = self.gw.draining
        ready = not draining and await self.gw.registry.ready()
        return json_response({"ok": ready, "draining": draining}, status=200 if ready else 503)

    async def metrics(self, _request: Request) -> Response:
        return PlainTextResponse(self.gw.metrics.render(), media_type="text/plain; version=0.0.4")
