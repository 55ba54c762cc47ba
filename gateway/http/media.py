"""Twilio's media socket (/twilio/media): check it, find its call, and run the call's session.

A bare ASGI app rather than a Starlette endpoint: after the handshake and `start`, the call's
frames go through uvicorn's own `receive` and `send` (gateway.carriers.twilio.media_leg).
"""

from __future__ import annotations

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
from gateway.registry.base import LIVE_TTL_S, CallRecord, RegistryUnavailable, digest, new_secret
from gateway.services import Gateway

log = structlog.get_logger(__name__)


class MediaSocket:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def routes(self) -> list[BaseRoute]:
        return [WebSocketRoute(codec.MEDIA_PATH, BareASGI(self.handle))]

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gw
        ws = WebSocket(scope, receive, send)
        stream_url = codec.stream_url(gw.settings.public_url)
        if not gw.signatures.valid(stream_url, {}, ws.headers.get("x-twilio-signature")):
            log.warning("twilio_signature_rejected", path=codec.MEDIA_PATH)
            await ws.close(1008)  # before accept: the client sees an HTTP 403
            return
        await ws.accept()
        start = await wait_for_start(ws)
        if start is None:
            await ws.close(1008, "no start")
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
        leg = TwilioMediaLeg(ws, start.stream_sid, receive, send)
        existing = gw.sessions.get(start.call_sid)
        if existing is not None and not existing.done:
            await existing.adopt(leg)
            await existing.wait()
            return
        await self._run_call(record, leg)

    async def _run_call(self, record: CallRecord, leg: TwilioMediaLeg) -> None:
        gw, settings = self.gw, self.gw.settings
        token = new_secret()
        record.token_hash = digest(token)
        record.owner = gw.registry.instance_id
        await gw.registry.put(record, LIVE_TTL_S)
        session = Session(
            record,
            registry=gw.registry,
            control=gw.transfers,
            open_agent=lambda rec: self._open_agent(rec, token),
            plan_transfer=lambda rec, fields: plan_transfer(rec, fields, gw.policy),
            output_format=settings.cartesia_output_format,
            end_call_drain_s=settings.end_call_drain_s,
            emit=gw.events.emit,
            recorder=CallRecorder() if settings.recordings_dir else None,
            recordings_dir=settings.recordings_dir,
        )
        if settings.record_calls and "transfer_failed" not in record.metadata:
            # Once per call: Twilio's recording runs to the call's end, across agent sessions.
            gw.spawn(self._start_twilio_recording(record.call_sid))
        gw.sessions[record.call_sid] = session
        gw.metrics.calls_active += 1
        try:
            await session.run(leg)
        finally:
            gw.metrics.calls_active -= 1
            if gw.sessions.get(record.call_sid) is session:
                del gw.sessions[record.call_sid]

    async def _open_agent(self, record: CallRecord, token: str) -> CartesiaAgent:
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
        return await CartesiaAgent.open(
            self.gw.agent_http,
            self.gw.agent_config,
            record.agent_id,
            stream_id=record.call_sid,
            metadata=metadata,
        )

    async def _start_twilio_recording(self, call_sid: str) -> None:
        try:
            sid = await self.gw.calls.record(call_sid, self.gw.url("/twilio/recording"))
        except Exception as exc:
            log.error("recording_not_started", call_sid=call_sid, error=str(exc))
            return
        log.info("recording_started", call_sid=call_sid, recording_sid=sid)
