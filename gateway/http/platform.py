"""What the platform asks: liveness, readiness (off while draining) and metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.http.bodies import json_response
from gateway.metrics import CONTENT_TYPE
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
        """Ready, or 503 with every reason why not, so an operator reading the probe's answer
        knows what to fix (both are checked: a draining instance may also have lost Redis)."""
        draining = self.gw.draining
        registry_ok = await self.gw.registry.ready()
        reasons = []
        if draining:
            reasons.append("draining: the gateway is shutting down; live calls are finishing")
        if not registry_ok:
            reasons.append("registry unavailable: the call registry (Redis, REDIS_URL) does not answer")
        body = {
            "ok": not reasons,
            "draining": draining,
            "registry": "ok" if registry_ok else "unavailable",
            "reasons": reasons,
        }
        return json_response(body, status=503 if reasons else 200)

    async def metrics(self, _request: Request) -> Response:
        return PlainTextResponse(self.gw.metrics.render(), media_type=CONTENT_TYPE)
