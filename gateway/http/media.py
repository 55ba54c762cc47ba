"""Twilio's media socket (/twilio/media): check it, find its call, and run the call's session.

A bare ASGI app rather than a Starlette endpoint: after the handshake and `start`, the call's
frames go through uvicorn's own `receive` and `send` (gateway.carriers.twilio.media_leg).
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from gateway.agents.cartesia import CartesiaAgent
from gateway.asgi import BareASGI
from gateway.call.session import Session
from gateway.carriers.twilio import codec
from gateway.carriers.twilio.media_leg import TwilioMediaLeg, wait_for_start
from gateway.control.parse import plan_transfer
from gateway.recording import CallRecorder
from gateway.registry.base import (
    LIVE_TTL_S,
    CallRecord,
    RegistryUnavailable,
    control_token,
    digest,
    new_secret,
)
from gateway.services import Gateway

log = structlog.get_logger(__name__)


class MediaSocket:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def routes(self) -> list[BaseRoute]:
        return [WebSocketRoute(codec.MEDIA_PATH + "/{call_sid}", BareASGI(self.handle))]

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gw
        ws = WebSocket(scope, receive, send)
        path_sid = scope.get("path_params", {}).get("call_sid", "")
        # Signed on the URL with the call's SID in it: the signature is good for this call only.
        stream_url = codec.stream_url(gw.settings.public_url, path_sid)
        if not gw.signatures.valid(stream_url, {}, ws.headers.get("x-twilio-signature")):
            log.warning("twilio_signature_rejected", path=codec.MEDIA_PATH)
            await ws.close(1008)  # before accept: the client sees an HTTP 403
            return
        await ws.accept()
        start = await wait_for_start(ws)
        if start is None:
            await ws.close(1008, "no start")
            return
        if start.call_sid != path_sid:
            log.warning("media_session_rejected", reason="start names another call than the URL")
            await ws.close(1008, "wrong call")
            return
        # Every line logged for this socket from here on, in any module and in the call's
        # tasks (they copy this context), carries the call's SID. Not the stream's: after a
        # handover the call's tasks, started under the first stream, would keep its SID.
        structlog.contextvars.bind_contextvars(call_sid=start.call_sid)
        try:
            record = await gw.registry.get(start.call_sid)
        except RegistryUnavailable:
            log.error("media_refused_registry_unavailable")
            await ws.close(1011, "registry unavailable")
            return
        session_ref = start.parameters.get("session", "")
        if record is None or not record.session_hash or digest(session_ref) != record.session_hash:
            log.warning("media_session_rejected", known_call=record is not None)
            await ws.close(1008, "unknown session")
            return
        try:
            first_use = await gw.registry.claim_stream(record.session_hash)
        except Exception as exc:
            log.error("media_refused_registry_unavailable", error=str(exc))
            await ws.close(1011, "registry unavailable")
            return
        if not first_use:
            # The same signed upgrade and `start` again: a replay cannot join the call.
            log.warning("media_session_rejected", reason="stream already used")
            await ws.close(1008, "stream already used")
            return
        leg = TwilioMediaLeg(ws, start.stream_sid, receive, send)
        existing = gw.sessions.get(start.call_sid)
        if existing is not None and not existing.done:
            await existing.adopt(leg, record.session_hash)
            await existing.wait()
            return
        await self._release_elsewhere(record)
        await self._run_call(record, leg)

    async def _release_elsewhere(self, record: CallRecord) -> None:
        """A resumed call whose old session lives on another instance: that one lets go first,
        so that the call never has two agent sessions at once."""
        gw = self.gw
        if not record.resume_reason or record.owner == gw.registry.instance_id:
            return
        try:
            if await gw.registry.owner_alive(record.owner):
                await gw.registry.route(record.owner, {"release": record.call_sid})
        except Exception as exc:  # gone already, or not answering: nothing to wait for
            log.info("release_not_confirmed", owner=record.owner, error=str(exc) or type(exc).__name__)

    async def _run_call(self, record: CallRecord, leg: TwilioMediaLeg) -> None:
        gw, settings = self.gw, self.gw.settings
        if not record.token_salt:
            record.token_salt = new_secret()
        # The same token on every instance and across every resume: the control URL stays.
        token = control_token(gw.control_key, record.call_sid, record.token_salt)
        record.token_hash = digest(token)
        record.owner = gw.registry.instance_id
        resume_reason, record.resume_reason = record.resume_reason, ""
        await gw.registry.put(record, LIVE_TTL_S)
        session = Session(
            record,
            registry=gw.registry,
            control=gw.transfers,
            open_agent=lambda rec, why, open_s: self._open_agent(rec, token, why, open_s),
            plan_transfer=lambda rec, fields: plan_transfer(rec, fields, gw.policy),
            output_format=settings.cartesia_output_format,
            end_call_drain_s=settings.end_call_drain_s,
            emit=gw.events.emit,
            recorder=CallRecorder() if settings.recordings_dir else None,
            recordings_dir=settings.recordings_dir,
            fallback=settings.agent_fallback,
            max_reconnects=settings.agent_reconnects,
            resume_grace_s=settings.stream_resume_grace_s,
            resume_reason=resume_reason,
            metrics=gw.metrics,
        )
        if settings.record_calls and "transfer_failed" not in record.metadata and not resume_reason:
            # Once per call: Twilio's recording runs to the call's end, across agent sessions.
            gw.spawn(self._start_twilio_recording(record.call_sid))
        gw.sessions[record.call_sid] = session
        gw.metrics.calls_active += 1
        started = time.monotonic()
        try:
            await session.run(leg)
        finally:
            gw.metrics.calls_active -= 1
            self._count_call(session, record, started)
            if gw.sessions.get(record.call_sid) is session:
                del gw.sessions[record.call_sid]

    def _count_call(self, session: Session, record: CallRecord, started: float) -> None:
        metrics = self.gw.metrics
        metrics.call_ended(record.direction, session.outcome or "ended")
        if session.playout.first_audio_at:
            metrics.first_audio(session.playout.first_audio_at - started)
        if session.dropped_before_agent:
            metrics.frames_dropped("uplink", "held_over_bound", session.dropped_before_agent)

    async def _open_agent(
        self, record: CallRecord, token: str, resume_reason: str, open_timeout_s: float
    ) -> CartesiaAgent:
        control_url = self.gw.url(f"/control/{token}")
        metadata: dict[str, Any] = {
            **record.metadata,
            "from": record.from_,
            "to": record.to,
            "call_sid": record.call_sid,
            "direction": record.direction,
            "control_url": control_url,
            "vox_session_control_url": control_url,
        }
        if record.sip_headers:
            metadata["sip_headers"] = record.sip_headers
        if resume_reason:
            # A new session of a call already under way: do not greet again. The agent's own
            # state, as its last `custom` event left it, comes back under `agent_state`.
            metadata.update(resumed=True, resume_reason=resume_reason, agent_state=record.agent_state)
        started = time.monotonic()
        agent = await CartesiaAgent.open(
            self.gw.agent_http,
            self.gw.agent_config,
            record.agent_id,
            stream_id=record.call_sid,
            metadata=metadata,
            open_timeout_s=open_timeout_s,
        )
        self.gw.metrics.agent_connected(time.monotonic() - started)
        return agent

    async def _start_twilio_recording(self, call_sid: str) -> None:
        try:
            sid = await self.gw.calls.record(call_sid, self.gw.url("/twilio/recording"))
        except Exception as exc:
            log.error("recording_not_started", call_sid=call_sid, error=str(exc))
            return
        log.info("recording_started", call_sid=call_sid, recording_sid=sid)
