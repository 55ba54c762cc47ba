"""What every handler shares: settings, the registry, the carrier's REST client, this
instance's live calls, and how the gateway starts, drains and stops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import aiohttp
import structlog
from starlette.applications import Starlette

from gateway.agents.cartesia import AgentConfig, agent_http_session
from gateway.audio import DownlinkConverter
from gateway.call.actions import ActionRefused, EndCall
from gateway.call.session import Session
from gateway.call_events import CallEvents
from gateway.carriers.twilio.rest import TwilioCalls
from gateway.carriers.twilio.signatures import SignatureChecker
from gateway.carriers.twilio.transfers import Transfers
from gateway.control.policy import TransferPolicy
from gateway.control.service import ControlService
from gateway.metrics import Metrics
from gateway.outbound.dialer import Dialer
from gateway.outbound.store_memory import MemoryOutboundStore
from gateway.registry.base import SessionRegistry
from gateway.registry.memory import MemoryRegistry
from gateway.settings import Settings

log = structlog.get_logger(__name__)

# Ending calls at shutdown: the agent's drain, then this long for the REST hang-up.
SHUTDOWN_HANGUP_S = 5.0


class Gateway:
    """One running gateway. The REST client, transfers, dialer and control service exist
    between the start and the end of the app's lifespan."""

    def __init__(self, settings: Settings, registry: SessionRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or _registry_from(settings)
        self.signatures = SignatureChecker(settings.twilio_auth_token, settings.twilio_validate_signatures)
        self.policy = TransferPolicy(
            settings.transfer_to, settings.transfer_allow, settings.transfer_caller_id
        )
        self.agent_config = AgentConfig(
            settings.cartesia_url, settings.cartesia_api_key, settings.cartesia_version
        )
        self.sessions: dict[str, Session] = {}
        self.metrics = Metrics()
        self.events = CallEvents(
            settings.call_events_url, settings.call_events_secret, instance_id=self.registry.instance_id
        )
        self.draining = False
        self._started = False
        self._side_jobs: set[asyncio.Task[Any]] = set()
        # Set in the lifespan:
        self.calls: TwilioCalls
        self.agent_http: aiohttp.ClientSession
        self.transfers: Transfers
        self.dialer: Dialer
        self.control: ControlService

    def url(self, path: str, query: str = "") -> str:
        return f"{self.settings.public_url}{path}" + (f"?{query}" if query else "")

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        # The agents' HTTP session is closed however start-up or shutdown goes.
        async with agent_http_session() as self.agent_http, self._running():
            yield

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        s = self.settings
        self.calls = TwilioCalls(s.twilio_account_sid, s.twilio_auth_token, s.twilio_api_base)
        self.transfers = Transfers(self.calls, self.registry, s, self.url)
        self.control = ControlService(self.registry, self.sessions, self.policy, self.transfers)
        self.dialer = Dialer(
            _outbound_store_from(s),
            self.registry,
            self.calls.create_call,
            self.url,
            calls_per_second=s.calls_per_second,
            max_concurrent=s.max_concurrent_calls,
            find_call=self.calls.find_call,
        )
        await self.dialer.start()
        self._started = True
        # Designs the agent format's anti-alias filter now (a few ms, once per process), not
        # on the first call's first audio.
        DownlinkConverter(s.cartesia_output_format)
        if not s.twilio_validate_signatures:
            log.warning("twilio_signature_checks_disabled", hint="never do this in production")
        await self.registry.start(self.control.handle_routed)
        await self.events.start()
        log.info(
            "gateway_started",
            instance=self.registry.instance_id,
            registry=type(self.registry).__name__,
            public_url=s.public_url,
        )
        try:
            yield
        finally:
            await self.drain(grace_s=0)  # normally done already, on SIGTERM (see cli.py)
            await self.dialer.close()
            await self.events.close()
            await self.registry.close()
            await self.calls.close()
            log.info("gateway_stopped")

    async def drain(self, grace_s: float) -> None:
        """Stop for a deploy: report not ready, give live calls `grace_s` to finish on their
        own, then end the rest the way `end_call` does (the agent's last words first)."""
        self.draining = True
        if self._started:
            self.dialer.stop_claiming()
        if self.sessions:
            log.info("draining", calls=len(self.sessions), grace_s=grace_s)
        await self._wait_for_calls(grace_s)
        for session in list(self.sessions.values()):
            with contextlib.suppress(ActionRefused):
                session.submit(EndCall("gateway shutting down"))
        await self._wait_for_calls(self.settings.end_call_drain_s + SHUTDOWN_HANGUP_S)

    async def _wait_for_calls(self, within_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while self.sessions:  # noqa: ASYNC110 (sessions end on their own)
                    await asyncio.sleep(0.05)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A short side job of a call (bounded by its own timeouts), kept until it finishes."""
        task = asyncio.create_task(coro)
        self._side_jobs.add(task)
        task.add_done_callback(self._side_jobs.discard)


def _registry_from(settings: Settings) -> SessionRegistry:
    if settings.redis_url:
        from gateway.registry.redis import RedisRegistry

        return RedisRegistry(settings.redis_url)
    return MemoryRegistry()


def _outbound_store_from(settings: Settings) -> Any:
    if settings.redis_url:
        from gateway.outbound.store_redis import RedisOutboundStore

        return RedisOutboundStore(settings.redis_url)
    return MemoryOutboundStore()
