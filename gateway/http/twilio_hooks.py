"""Twilio's webhooks: the voice webhook that answers a call, the call status callback, a blind
transfer's outcome, a warm transfer's legs and conference, and recordings. Every one is signed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import structlog
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.call.actions import ActionRefused
from gateway.call.states import RESUMABLE, State
from gateway.carriers.twilio import streams, twiml
from gateway.carriers.twilio.rest import FINAL_CALL_STATUSES
from gateway.carriers.twilio.transfers import NOT_TAKEN
from gateway.http.bodies import error_response, read_bounded
from gateway.registry.base import CallRecord, RegistryUnavailable
from gateway.services import Gateway

log = structlog.get_logger(__name__)

# How long /twilio/continue waits for the call's instance to notice its stream has ended.
CONTINUE_WAIT_S = 2.0
# Twilio's webhooks are a few KiB of form fields; anything far larger is not Twilio.
MAX_WEBHOOK_BYTES = 64 * 1024
TWIML = "application/xml"


def route_for(routes: Mapping[str, dict[str, Any]], called: str) -> dict[str, Any]:
    """AGENT_ROUTES entry for the number or SIP URI called: exact, then without SIP parameters."""
    if not routes or not called:
        return {}
    bare = called.split(";", 1)[0]
    for key in (called, bare, bare.lower()):
        if key in routes:
            return routes[key]
    return {}


def _twiml(text: str) -> Response:
    return Response(text, media_type=TWIML)


class TwilioHooks:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/twilio/voice", self.voice, methods=["POST"]),
            Route(streams.CONTINUE_PATH, self.continue_call, methods=["POST"]),
            Route("/twilio/status", self.status, methods=["POST"]),
            Route("/twilio/dial-action", self.dial_action, methods=["POST"]),
            Route("/twilio/warm-status", self.warm_status, methods=["POST"]),
            Route("/twilio/conference", self.conference_status, methods=["POST"]),
            Route("/twilio/recording", self.recording_status, methods=["POST"]),
        ]

    async def _signed_form(self, request: Request) -> Mapping[str, str] | Response:
        try:
            body = await read_bounded(request, MAX_WEBHOOK_BYTES)
        except ActionRefused as exc:  # 413, or 408 for a body that did not come in time
            return error_response(exc)
        # Read whole and bounded before parsing: an unsigned request must not cost memory.
        params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        url = self.gw.url(request.url.path, request.url.query)
        if not self.gw.signatures.valid(url, params, request.headers.get("x-twilio-signature")):
            log.warning("twilio_signature_rejected", path=request.url.path)
            return PlainTextResponse("invalid Twilio signature\n", status_code=403)
        return params

    async def voice(self, request: Request) -> Response:
        form = await self._signed_form(request)
        if isinstance(form, Response):
            return form
        gw = self.gw
        call_sid = form.get("CallSid", "")
        if not call_sid:
            return PlainTextResponse("CallSid is required\n", status_code=400)
        bound = log.bind(call_sid=call_sid)
        try:
            known = await gw.registry.get(call_sid)
        except RegistryUnavailable:
            known = None
            bound.warning("call_lookup_unavailable")
        if known is not None and known.state not in (State.DIALING, State.RINGING):
            # A replay (or a repeat) of the webhook for a call already connected: it must not
            # start a second session nor touch the live one.
            bound.warning("voice_webhook_repeated", state=known.state)
            return PlainTextResponse("call already connected\n", status_code=409)
        # An outbound call we started ourselves, with its agent and metadata.
        dialled = known if known is not None and known.state == State.DIALING else None
        route = route_for(gw.settings.agent_routes, form.get("To", ""))
        fallback = list(route.get("fallback") or gw.settings.agent_fallback)
        if len(gw.sessions) >= gw.settings.max_calls:
            bound.error(
                "call_refused", reason="MAX_CALLS reached", calls=len(gw.sessions), fallback=fallback[0]
            )
            gw.metrics.fallback(f"max_calls_{fallback[0]}")
            caller_id = gw.settings.transfer_caller_id
            return _twiml(twiml.fallback_twiml(fallback[0], fallback[1], caller_id))
        agent_id = (
            request.query_params.get("agent")
            or (dialled.agent_id if dialled else "")
            or route.get("agent", "")
            or gw.settings.cartesia_agent_id
        )
        if not agent_id:
            bound.error("call_refused", reason="no agent: set CARTESIA_AGENT_ID or ?agent= or AGENT_ROUTES")
            return _twiml(twiml.hangup_twiml())
        metadata = {**route.get("metadata", {}), **(dialled.metadata if dialled else {})}
        if form.get("AnsweredBy"):
            metadata["answered_by"] = form["AnsweredBy"]
        record = CallRecord(
            call_sid=call_sid,
            owner=gw.registry.instance_id,
            state=State.RINGING,
            from_=form.get("From", ""),
            to=form.get("To", ""),
            agent_id=agent_id,
            direction=form.get("Direction", "inbound"),
            token_hash="",
            account_sid=form.get("AccountSid", ""),
            sip_headers={k[len("SipHeader_") :]: v for k, v in form.items() if k.startswith("SipHeader_")},
            metadata=metadata,
            fallback=fallback,
        )
        gw.metrics.calls_answered += 1
        bound.info("call_state", state=State.RINGING, agent_id=agent_id, direction=record.direction)
        return _twiml(await streams.connect_stream(gw.registry, record, gw.settings.public_url))

    async def continue_call(self, request: Request) -> Response:
        """Twilio runs the `<Redirect>` after `</Connect>` when a call's stream has ended with
        the call still up: a new stream if the call is live (its stream dropped, or we closed it
        to move the call), else a hang-up (the call was ending anyway)."""
        form = await self._signed_form(request)
        if isinstance(form, Response):
            return form
        call_sid = form.get("CallSid", "")
        bound = log.bind(call_sid=call_sid)
        try:
            record = await self.gw.registry.get(call_sid) if call_sid else None
        except RegistryUnavailable:
            bound.error("stream_not_resumed", reason="registry unavailable")
            return _twiml(twiml.hangup_twiml())
        if record is None or record.state not in RESUMABLE:
            bound.info("stream_ended", state=record.state if record else None)
            return _twiml(twiml.hangup_twiml())
        try:
            why = await self._stream_down(record)
        except RegistryUnavailable:
            bound.error("stream_not_resumed", reason="registry unavailable")
            return _twiml(twiml.hangup_twiml())
        if not why:
            # Its instance still has the stream: a replay of an old continue request, which must
            # not be given a stream of this call.
            bound.warning("continue_refused", reason="the call's stream is up")
            return PlainTextResponse("the call's stream is up\n", status_code=409)
        answer = await streams.resume_stream(self.gw.registry, record, self.gw.settings.public_url, why)
        if answer is None:
            bound.error("stream_not_resumed", reason="too many new streams", resumes=record.resumes)
            return _twiml(twiml.hangup_twiml())
        bound.info("stream_resuming", reason=why, resumes=record.resumes)
        return _twiml(answer)

    async def _stream_down(self, record: CallRecord) -> str:
        """Why the call's stream is down ("" when it is up, as far as can be told within
        CONTINUE_WAIT_S): its instance marks a dropped or moving stream in the record, and a dead
        instance's streams are down with it."""
        deadline = time.monotonic() + CONTINUE_WAIT_S
        while True:
            if record.resume_reason:
                return record.resume_reason
            if not await self.gw.registry.owner_alive(record.owner):
                return "instance_failed"
            if time.monotonic() >= deadline:
                return ""
            # Twilio may ask before the instance has noticed the socket close.
            await asyncio.sleep(0.1)
            record = await self.gw.registry.get(record.call_sid) or record

    async def status(self, request: Request) -> Response:
        form = await self._signed_form(request)
        if isinstance(form, Response):
            return form
        gw = self.gw
        call_sid, call_status = form.get("CallSid", ""), form.get("CallStatus", "")
        try:
            if call_sid and call_status in FINAL_CALL_STATUSES:
                log.info("call_status_final", call_sid=call_sid, status=call_status)
                session = gw.sessions.get(call_sid)
                if session is not None:
                    session.carrier_ended(call_status)
                else:
                    await gw.transfers.caller_left(call_sid)
                    await gw.registry.delete(call_sid)
            if "slot" in request.query_params:
                await gw.dialer.call_status(call_sid, call_status, dict(request.query_params))
        except (RegistryUnavailable, RedisError, OSError) as exc:
            # Twilio does not retry status callbacks; say so loudly, and keep the call alive.
            log.error("call_status_not_recorded", call_sid=call_sid, status=call_status, error=str(exc))
            return Response(status_code=503)
        return Response(status_code=204)

    async def dial_action(self, request: Request) -> Response:
        """Twilio posts a blind transfer's outcome here when its `<Dial>` ends."""
        form = await self._signed_form(request)
        if isinstance(form, Response):
            return form
        events = self.gw.events
        call_sid, status = form.get("CallSid", ""), form.get("DialCallStatus", "")
        destination = request.query_params.get("to", "")
        taken = status not in NOT_TAKEN
        if not taken and form.get("CallStatus") == "completed":  # the caller hung up while it rang
            events.emit("transfer.failed", call_sid, destination=destination, status="caller-hung-up")
            return _twiml(twiml.hangup_twiml())
        # A bridged call that then ended (DialCallStatus=completed) was taken, whoever hung up.
        events.emit(
            "transfer.completed" if taken else "transfer.failed",
            call_sid,
            destination=destination,
            status=status,
            mode="blind",
        )
        return _twiml(await self.gw.transfers.after_dial(call_sid, status, destination))

    async def warm_status(self, request: Request) -> Response:
        """Status of the human's leg of a warm transfer."""
        form = await self._signed_form(request)
        if isinstance(form, Response):
            return form
        caller = request.query_params.get("caller", "")
        destination = request.query_params.get("to", "")
        status = form.get("CallStatus", "")
        ended = status in NOT_TAKEN or status == "completed"
        if caller and ended and await self.gw.transfers.human_left(caller, status, destination):
            self.gw.events.emit(
                "transfer.failed", caller, destination=destination, status=status, mode="warm"
            )
        return Response(status_code=204)

    async def conference_status(self, request: Request) -> Response:
        """The warm-transfer conference: the human joining completes the transfer."""
        form = await self._signed_form(request)
        if isinstance(form, Response):
            return form
        caller = request.query_params.get("caller", "")
        joined = form.get("StatusCallbackEvent") == "participant-join"
        if caller and joined and await self.gw.transfers.human_joined(caller, form.get("CallSid", "")):
            destination = request.query_params.get("to", "")
            self.gw.events.emit("transfer.completed", caller, destination=destination, mode="warm")
        return Response(status_code=204)

    async def recording_status(self, request: Request) -> Response:
        """Twilio's recording status callback: report where the finished recording is."""
        form = await self._signed_form(request)
        if isinstance(form, Response):
            return form
        call_sid = form.get("CallSid", "")
        report = {
            "recording_sid": form.get("RecordingSid", ""),
            "recording_url": form.get("RecordingUrl", ""),
            "status": form.get("RecordingStatus", ""),
            "duration_s": form.get("RecordingDuration", ""),
            "channels": form.get("RecordingChannels", ""),
        }
        log.info("recording_reported", call_sid=call_sid, **report)
        if report["status"] == "completed":
            self.gw.events.emit("recording.completed", call_sid, **report)
        return Response(status_code=204)
