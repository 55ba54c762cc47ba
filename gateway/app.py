"""The Starlette app: the shared services (gateway.services) and the routes (gateway.http)."""

from __future__ import annotations

from starlette.applications import Starlette

from gateway.http.control import ControlApi
from gateway.http.media import MediaSocket
from gateway.http.outbound import OutboundApi
from gateway.http.platform import Platform
from gateway.http.twilio_hooks import TwilioHooks
from gateway.logging import redactor
from gateway.registry.base import SessionRegistry
from gateway.services import Gateway
from gateway.settings import Settings


def create_app(settings: Settings | None = None, registry: SessionRegistry | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    for secret in settings.secrets:
        redactor.add(secret)
    gateway = Gateway(settings, registry)
    handlers = (TwilioHooks, MediaSocket, ControlApi, Platform, OutboundApi)
    app = Starlette(
        routes=[route for handler in handlers for route in handler(gateway).routes()],
        lifespan=gateway.lifespan,
    )
    app.state.gateway = gateway
    return app
