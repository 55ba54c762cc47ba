"""What every handler shares: settings, the registry, the carrier's REST client, this
instance's live calls, and how the gateway starts, drains and stops."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
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
from gateway.carriers.twilio.streams import resume_stream
from gateway.carriers.twilio.transfers import Transfers
from gateway.control.policy import TransferPolicy
from gateway.control.service import ControlService
from gateway.metrics import Metrics
from gateway.outbound.dialer import Dialer
from gateway.outbound.store_memory import MemoryOutboundStore
from gateway.registry.base import CallRecord, SessionRegistry
from gateway.registry.memory import MemoryRegistry
from gateway.settings import Settings

log = structlog.get_logger(__name__)

# Ending calls at shutdown: the agent's drain, then this long for the REST hang-up.
SHUTDOWN_HANGUP_S = 5.0
# A draining instance moves again, this often, a call whose new stream came back to it.
MOVE_AGAIN_S = 1.0
# How often an instance looks for calls whose instance has died (they are found once that
# instance's heartbeat has expired: registry/base.HEARTBEAT_TTL_S).
TAKEOVER_EVERY_S = 1.0


class Gateway:
    """One running gateway. The REST client, transfers, dialer and control service exist
    between the start and the end of the app's lifespan."""

    def __init__(self, settings: Settings, registry: SessionRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or _registry_from(settings)
        self.metrics = Metrics()
        self.signatures = SignatureChecker(
            settings.twilio_auth_token, settings.twilio_validate_signatures, self.metrics.signature_rejected
        )
        self.policy = TransferPolicy(
            settings.transfer_to, settings.transfer_allow, settings.transfer_caller_id
        )
        self.agent_config = AgentConfig(
            settings.cartesia_url, settings.cartesia_api_key, settings.cartesia_version
        )
        self.sessions: dict[str, Session] = {}
        self.events = CallEvents(
            settings.call_events_url, settings.call_events_secret, instance_id=self.registry.instance_id
        )
        self.draining = False
        # Control tokens are derived under this key (registry/base.control_token): all instances
        # share the auth token, so a call keeps its control URL when it moves between them.
        self.control_key = settings.twilio_auth_token or secrets.token_hex(32)
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
        self.calls = TwilioCalls(
            s.twilio_account_sid,
            s.twilio_auth_token,
            s.twilio_api_base,
            region=s.twilio_region or None,
            edge=s.twilio_edge or None,
        )
        self.calls.on_error = self.metrics.rest_error
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
        takeover = asyncio.create_task(self._take_over_orphans(), name="takeover")
        log.info(
            "gateway_started",
            instance=self.registry.instance_id,
            registry=type(self.registry).__name__,
            public_url=s.public_url,
        )
        try:
            yield
        finally:
            takeover.cancel()
            await asyncio.gather(takeover, return_exceptions=True)
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
        deadline = asyncio.get_running_loop().time() + grace_s
        if self.sessions:
            log.info("draining", calls=len(self.sessions), grace_s=grace_s)
            if grace_s > 0 and await self.registry.peers_alive():
                await self._move_calls(deadline)
        await self._wait_for_calls(deadline - asyncio.get_running_loop().time())
        for session in list(self.sessions.values()):
            with contextlib.suppress(ActionRefused):
                session.submit(EndCall("gateway shutting down"))
        await self._wait_for_calls(self.settings.end_call_drain_s + SHUTDOWN_HANGUP_S)

    async def _move_calls(self, deadline: float) -> None:
        """Another instance is up: the calls move there (each at a quiet moment) rather than
        wait for their end, which a platform's stop timeout would not allow. A router that does
        not read /readyz (nginx's passive checks) may send a call's new stream back here: it is
        moved again, until the grace ends."""
        loop = asyncio.get_running_loop()
        while self.sessions and loop.time() < deadline:
            moves = [s.move() for s in list(self.sessions.values()) if not s.moving and not s.done]
            await asyncio.gather(*moves, return_exceptions=True)
            await asyncio.sleep(min(MOVE_AGAIN_S, max(0.0, deadline - loop.time())))

    async def _wait_for_calls(self, within_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while self.sessions:  # noqa: ASYNC110 (sessions end on their own)
                    await asyncio.sleep(0.05)

    async def _take_over_orphans(self) -> None:
        """Calls whose instance died: a REST update points each at a new stream, which resumes
        it (agent told `resumed`) wherever it lands."""
        while True:
            await asyncio.sleep(TAKEOVER_EVERY_S)
            if self.draining:
                continue
            try:
                orphans = await self.registry.orphaned_calls()
            except Exception:  # never let a bug end the loop: dead instances' calls need it
                log.exception("takeover_failed")
                continue
            await asyncio.gather(*(self._take_over(record) for record in orphans))

    async def _take_over(self, record: CallRecord) -> None:
        bound = log.bind(call_sid=record.call_sid)
        answer = await resume_stream(self.registry, record, self.settings.public_url, "instance_failed")
        try:
            if answer is None:
                await self.calls.hangup(record.call_sid)
                return
            await self.calls.redirect(record.call_sid, answer)
            bound.warning("call_taken_over", dead_instance=record.owner)
        except Exception as exc:  # the call has ended meanwhile, or Twilio refused
            bound.error("call_not_taken_over", dead_instance=record.owner, error=str(exc))
            with contextlib.suppress(Exception):
                await self.registry.delete(record.call_sid)

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
