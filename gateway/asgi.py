"""ASGI plumbing shared by the gateway and the benchmark's floor (kept free of the gateway's
heavier imports, so the floor loads only what it runs)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import Receive, Scope, Send


class BareASGI:
    """A bound `async (scope, receive, send)` method as a route's ASGI app: Starlette wraps
    plain functions and methods in a WebSocket session of its own."""

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._handler(scope, receive, send)
