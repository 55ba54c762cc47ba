"""The Starlette app: routes, lifespan, shared clients. Handlers are thin."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import orjson
import structlog
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from gateway import control, outbound
from gateway.agents.cartesia import AgentConfig, CartesiaAgent, agent_http_session
from gateway.asgi import BareASGI
from gateway.call_events import CallEvents
from gateway.carriers import twilio
from gateway.carriers.twilio_media import TwilioMediaLeg, wait_for_start
from gateway.carriers.twilio_rest import TwilioCalls, TwilioRestError
from gateway.logging import redactor
from gateway.metrics import Metrics
from gateway.outbound import Dialer, MemoryOutboundStore, RedisOutboundStore
from gateway.recording import CallRecorder
from gateway.registry import (
    CallRecord,
    MemoryRegistry,
    RegistryUnavailable,
    SessionRegistry,
    digest,
    new_secret,
)
from gateway.registry.base import LIVE_TTL_S
from gateway.session import ActionRefused, EndCall, SendDtmf, Session, State, TransferPlan
from gateway.settings import Settings
from gateway.transfers import NOT_TAKEN, Transfers

log = structlog.get_logger(__name__)

# Twilio's webhooks are a few KiB of form fields; anything far larger is not Twilio.
MAX_WEBHOOK_BYTES = 64 * 1024
MAX_API_BODY_BYTES = 16 * 1024
MAX_BATCH_BODY_BYTES = 1024 * 1024  # 1,000 recipients with some metadata each
# Ending calls at shutdown: the agent's drain, then this long for the REST hang-up.
SHUTDOWN_HANGUP_S = 5.0
# POST /calls waits at most this long for its turn under CALLS_PER_SECOND, then answers 429.
MAX_START_WAIT_S = 10.0
FINAL_CALL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
TWIML = "application/xml"


class Gateway:
    """What the handlers share: settings, registry, REST client and this instance's calls."""

    def __init__(self, settings: Settings, registry: SessionRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or self._registry_from(settings)
        self.signatures = twilio.SignatureChecker(
            settings.twilio_auth_token, settings.twilio_validate_signatures
        )
        self.policy = control.TransferPolicy(
            settings.transfer_to, settings.transfer_allow, settings.transfer_caller_id
        )
        self.agent_config = AgentConfig(
            settings.cartesia_url, settings.cartesia_api_key, settings.cartesia_version
        )
        self.calls: TwilioCalls | None = None
        self.agent_http: aiohttp.ClientSession | None = None
        self.transfers: Transfers | None = None
        self.dialer: Dialer | None = None
        self.sessions: dict[str, Session] = {}
        self._side_jobs: set[asyncio.Task[Any]] = set()
        self.metrics = Metrics()
        self.events = CallEvents(
            settings.call_events_url, settings.call_events_secret, instance_id=self.registry.instance_id
        )
        self.draining = False

    @staticmethod
    def _registry_from(settings: Settings) -> SessionRegistry:
        if settings.redis_url:
            from gateway.registry.redis import RedisRegistry

            return RedisRegistry(settings.redis_url)
        return MemoryRegistry()

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        # The agents' HTTP session is closed however start-up or shutdown goes.
        async with agent_http_session() as self.agent_http, self._running():
            yield

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        s = self.settings
        self.calls = TwilioCalls(s.twilio_account_sid, s.twilio_auth_token, s.twilio_api_base)
        self.transfers = Transfers(self.calls, self.registry, s, self.url, self._reconnect)
        store = RedisOutboundStore(s.redis_url) if s.redis_url else MemoryOutboundStore()
        self.dialer = Dialer(
            store,
            self.registry,
            self.calls.create_call,
            self.url,
            calls_per_second=s.calls_per_second,
            max_concurrent=s.max_concurrent_calls,
        )
        await self.dialer.start()
        if not s.twilio_validate_signatures:
            log.warning("twilio_signature_checks_disabled", hint="never do this in production")
        await self.registry.start(self.handle_routed)
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
        if self.dialer is not None:
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

    def url(self, path: str, query: str = "") -> str:
        return f"{self.settings.public_url}{path}" + (f"?{query}" if query else "")

    def control_url(self, token: str) -> str:
        return self.url(f"/control/{token}")

    # Twilio webhooks

    async def _signed_form(self, request: Request) -> Mapping[str, str] | Response:
        try:
            body = await _read_bounded(request, MAX_WEBHOOK_BYTES)
        except ActionRefused:
            return PlainTextResponse("request too large\n", status_code=413)
        # Read whole and bounded before parsing: an unsigned request must not cost memory.
        params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        url = self.url(request.url.path, request.url.query)
        if not self.signatures.valid(url, params, request.headers.get("x-twilio-signature")):
            log.warning("twilio_signature_rejected", path=request.url.path)
            return PlainTextResponse("invalid Twilio signature\n", status_code=403)
        return params

    async def voice(self, request: Request) -> Response:
        form = await self._signed_form(request)
        if isinstance(form, Response):
            return form
        call_sid = form.get("CallSid", "")
        if not call_sid:
            return PlainTextResponse("CallSid is required\n", status_code=400)
        bound = log.bind(call_sid=call_sid)
        dialled = None  # an outbound call we started ourselves, with its agent and metadata
        if form.get("Direction", "").startswith("outbound"):
            try:
                dialled = await self.registry.get(call_sid)
            except RegistryUnavailable:
                bound.warning("outbound_metadata_unavailable")
            if dialled is not None and dialled.state != State.DIALING:
                dialled = None
        route = route_for(self.settings.agent_routes, form.get("To", ""))
        agent_id = (
            request.query_params.get("agent")
            or (dialled.agent_id if dialled else "")
            or route.get("agent", "")
            or self.settings.cartesia_agent_id
        )
        if not agent_id:
            bound.error("call_refused", reason="no agent: set CARTESIA_AGENT_ID or ?agent= or AGENT_ROUTES")
            return Response(twilio.hangup_twiml(), media_type=TWIML)
        metadata = {**route.get("metadata", {}), **(dialled.metadata if dialled else {})}
        if form.get("AnsweredBy"):
            metadata["answered_by"] = form["AnsweredBy"]
        record = CallRecord(
            call_sid=call_sid,
            owner=self.registry.instance_id,
            state=State.RINGING,
            from_=form.get("From", ""),
            to=form.get("To", ""),
            agent_id=agent_id,
            direction=form.get("Direction", "inbound"),
            token_hash="",
            account_sid=form.get("AccountSid", ""),
            sip_headers={k[len("SipHeader_") :]: v for k, v in form.items() if k.startswith("SipHeader_")},
            metadata=metadata,
        )
        self.metrics.calls_answered += 1
        bound.info("call_state", state=State.RINGING, agent_id=agent_id, direction=record.direction)
        return Response(await self._stream_twiml(record), media_type=TWIML)

    async def _stream_twiml(self, record: CallRecord) -> str:
        """Register a fresh agent session for the call and the TwiML that connects its stream."""
        session = new_secret()
        record.session_hash = digest(session)
        # The control token is minted where the media lands (it goes to the agent from there);
        # until then the call answers to no token at all.
        record.token_hash = digest(new_secret())
        record.owner = self.registry.instance_id
        record.state = State.RINGING
        await self.registry.put(record)
        return twilio.connect_stream_twiml(twilio.stream_url(self.settings.public_url), {"session": session})

    async def _reconnect(self, call_sid: str, why: dict[str, str]) -> str | None:
        """A transfer was not taken: the caller goes back to an agent that is told why."""
        record = await self.registry.get(call_sid)
        if record is None:
            return None
        record.metadata = {**record.metadata, "transfer_failed": why}
        record.transfer = {}
        return await self._stream_twiml(record)

    async def dial_action(self, request: Request) -> Response:
        """Twilio posts a blind transfer's outcome here when its `<Dial>` ends."""
        form = await self._signed_form(request)
        if isinstance(form, Response):
            return form
        call_sid, status = form.get("CallSid", ""), form.get("DialCallStatus", "")
        destination = request.query_params.get("to", "")
        taken = status not in NOT_TAKEN
        if form.get("CallStatus") == "completed":  # the caller hung up while it rang
            self.events.emit("transfer.failed", call_sid, destination=destination, status="caller-hung-up")
            return Response(twilio.hangup_twiml(), media_type=TWIML)
        self.events.emit(
            "transfer.completed" if taken else "transfer.failed",
            call_sid,
            destination=destination,
            status=status,
            mode="blind",
        )
        return Response(await self.transfers.after_dial(call_sid, status, destination), media_type=TWIML)

    async def warm_status(self, request: Request) -> Response:
        """Status of the human's leg of a warm transfer."""
        form = await self._signed_form(request)
        if isinstance(form, Response):
            return form
        assert self.transfers is not None
        caller = request.query_params.get("caller", "")
        destination = request.query_params.get("to", "")
        status = form.get("CallStatus", "")
        ended = status in NOT_TAKEN or status == "completed"
        if caller and ended and await self.transfers.human_left(caller, status, destination):
            self.events.emit("transfer.failed", caller, destination=destination, status=status, mode="warm")
        return Response(status_code=204)

    async def conference_status(self, request: Request) -> Response:
        """The warm-transfer conference: the human joining completes the transfer."""
        form = await self._signed_form(request)
        if isinstance(form, Response):
            return form
        assert self.transfers is not None
        caller = request.query_params.get("caller", "")
        joined = form.get("StatusCallbackEvent") == "participant-join"
        if caller and joined and await self.transfers.human_joined(caller, form.get("CallSid", "")):
            destination = request.query_params.get("to", "")
            self.events.emit("transfer.completed", caller, destination=destination, mode="warm")
        return Response(status_code=204)

    async def status(self, request: Request) -> Response:
        form = await self._signed_form(request)
        if isinstance(form, Response):
            return form
        call_sid, call_status = form.get("CallSid", ""), form.get("CallStatus", "")
        assert self.transfers is not None and self.dialer is not None
        try:
            if call_sid and call_status in FINAL_CALL_STATUSES:
                log.info("call_status_final", call_sid=call_sid, status=call_status)
                session = self.sessions.get(call_sid)
                if session is not None:
                    session.carrier_ended(call_status)
                else:
                    await self.transfers.caller_left(call_sid)
                    await self.registry.delete(call_sid)
            if "slot" in request.query_params:
                await self.dialer.call_status(call_sid, call_status, dict(request.query_params))
        except (RegistryUnavailable, RedisError, OSError) as exc:
            # Twilio does not retry status callbacks; say so loudly, and keep the call alive.
            log.error("call_status_not_recorded", call_sid=call_sid, status=call_status, error=str(exc))
            return Response(status_code=503)
        return Response(status_code=204)

    # Media

    async def media(self, scope: Scope, receive: Receive, send: Send) -> None:
        """/twilio/media, as a bare ASGI app: see gateway.carriers.twilio_media."""
        ws = WebSocket(scope, receive, send)
        stream_url = twilio.stream_url(self.settings.public_url)
        if not self.signatures.valid(stream_url, {}, ws.headers.get("x-twilio-signature")):
            log.warning("twilio_signature_rejected", path="/twilio/media")
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
            record = await self.registry.get(start.call_sid)
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
        existing = self.sessions.get(start.call_sid)
        if existing is not None and not existing.done:
            await existing.adopt(leg)
            await existing.wait()
            return
        token = new_secret()
        record.token_hash = digest(token)
        record.owner = self.registry.instance_id
        await self.registry.put(record, LIVE_TTL_S)
        session = Session(
            record,
            registry=self.registry,
            control=self.transfers,  # type: ignore[arg-type]
            open_agent=lambda rec: self._open_agent(rec, token),
            plan_transfer=lambda rec, fields: control.plan_transfer(rec, fields, self.policy),
            output_format=self.settings.cartesia_output_format,
            end_call_drain_s=self.settings.end_call_drain_s,
            emit=self.events.emit,
            recorder=CallRecorder() if self.settings.recordings_dir else None,
            recordings_dir=self.settings.recordings_dir,
        )
        if self.settings.record_calls and "transfer_failed" not in record.metadata:
            # Once per call: Twilio's recording runs to the call's end, across agent sessions.
            self._spawn(self._start_twilio_recording(start.call_sid))
        self.sessions[start.call_sid] = session
        self.metrics.calls_active += 1
        try:
            await session.run(leg)
        finally:
            self.metrics.calls_active -= 1
            if self.sessions.get(start.call_sid) is session:
                del self.sessions[start.call_sid]

    def _spawn(self, coro: Any) -> None:
        """A short side job of a call (bounded by its own timeouts), kept until it finishes."""
        task = asyncio.create_task(coro)
        self._side_jobs.add(task)
        task.add_done_callback(self._side_jobs.discard)

    async def _start_twilio_recording(self, call_sid: str) -> None:
        assert self.calls is not None
        try:
            sid = await self.calls.record(call_sid, self.url("/twilio/recording"))
        except Exception as exc:
            log.error("recording_not_started", call_sid=call_sid, error=str(exc))
            return
        log.info("recording_started", call_sid=call_sid, recording_sid=sid)

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
            self.events.emit("recording.completed", call_sid, **report)
        return Response(status_code=204)

    async def _open_agent(self, record: CallRecord, token: str) -> CartesiaAgent:
        control_url = self.control_url(token)
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
        assert self.agent_http is not None
        return await CartesiaAgent.open(
            self.agent_http, self.agent_config, record.agent_id, stream_id=record.call_sid, metadata=metadata
        )

    # Control

    async def control(self, request: Request) -> Response:
        token_hash = digest(request.path_params["token"])
        try:
            record = await self.registry.by_token(token_hash)
            if record is None or record.state in State.FINAL:
                raise control.error(404, "not_found", "unknown or expired control URL")
            if not await self.registry.hit(token_hash, control.RATE_LIMIT, control.RATE_WINDOW_S):
                raise control.error(429, "rate_limited", "too many requests for this call; slow down")
            if request.method == "GET":
                session = self.sessions.get(record.call_sid)
                return JSONResponse(session.snapshot() if session else record.public())
            payload = control.parse_body(await _read_bounded(request, control.MAX_BODY_BYTES))
            action = control.build_action(record, payload, self.policy)
            body = await self._execute(record, payload, action)
        except RegistryUnavailable:
            exc = control.error(503, "registry_unavailable", "the call registry cannot be reached; retry")
            self.metrics.control(exc.status)
            return Response(control.dumps(control.error_body(exc)), exc.status, media_type="application/json")
        except ActionRefused as exc:
            self.metrics.control(exc.status)
            return Response(control.dumps(control.error_body(exc)), exc.status, media_type="application/json")
        self.metrics.control(200)
        log.info("control_accepted", call_sid=record.call_sid, action=body.get("action"))
        return Response(control.dumps(body), media_type="application/json")

    async def _execute(self, record: CallRecord, payload: dict[str, Any], action: Any) -> dict[str, Any]:
        session = self.sessions.get(record.call_sid)
        if session is not None:
            session.submit(action)
            return control.ok_body(action, record.call_sid)
        if record.owner != self.registry.instance_id and await self.registry.owner_alive(record.owner):
            reply = await self.registry.route(record.owner, {"call_sid": record.call_sid, "payload": payload})
            if reply is None:
                raise control.error(503, "owner_unavailable", "the instance holding the call did not answer")
            if reply.get("status") != 200:
                err = reply.get("body", {}).get("error", {})
                raise control.error(
                    reply.get("status", 500), err.get("code", "error"), err.get("message", "")
                )
            return reply["body"]
        return await self._act_without_owner(record, action)

    async def _act_without_owner(self, record: CallRecord, action: Any) -> dict[str, Any]:
        """The owner is gone: do what the REST API can do alone (hang up, transfer)."""
        assert self.calls is not None and self.transfers is not None
        bound = log.bind(call_sid=record.call_sid)
        if record.state in (State.ENDING, State.TRANSFERRING):
            if isinstance(action, EndCall) and record.state == State.ENDING:
                return control.ok_body(action, record.call_sid)  # a repeated end_call
            raise control.error(409, f"call_{record.state}", f"the call is already {record.state}")
        if isinstance(action, SendDtmf):
            raise control.error(503, "owner_unavailable", "the call's media is on an instance that is gone")
        leaving = State.TRANSFERRING if isinstance(action, TransferPlan) else State.ENDING
        await self.registry.set_state(record.call_sid, leaving)
        try:
            if isinstance(action, TransferPlan):
                await self.transfers.transfer(record.call_sid, action)
                # Kept, not deleted: a transfer nobody takes brings the caller back to an agent.
                await self.registry.set_state(record.call_sid, State.TRANSFERRED)
                bound.info("orphan_call_transferred", target=action.target)
            else:
                await self.calls.hangup(record.call_sid)
                await self.registry.delete(record.call_sid)
                bound.info("orphan_call_hung_up")
        except TwilioRestError as exc:
            await self.registry.set_state(record.call_sid, record.state)
            bound.error("orphan_call_action_failed", error=str(exc))
            raise control.error(502, "twilio_refused", str(exc)) from None
        return control.ok_body(action, record.call_sid)

    async def handle_routed(self, request: dict[str, Any]) -> dict[str, Any]:
        """A control request another instance forwarded to us, the call's owner."""
        session = self.sessions.get(request.get("call_sid", ""))
        try:
            if session is None:
                raise control.error(404, "not_found", "unknown or expired control URL")
            action = control.build_action(session.record, request.get("payload", {}), self.policy)
            session.submit(action)
        except ActionRefused as exc:
            return {"status": exc.status, "body": control.error_body(exc)}
        return {"status": 200, "body": control.ok_body(action, session.call_sid)}

    # Outbound

    def _api_key_ok(self, request: Request) -> ActionRefused | None:
        key = self.settings.gateway_api_key
        if not key:
            return control.error(404, "outbound_disabled", "outbound calls need GATEWAY_API_KEY")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return control.error(
                401, "unauthorized", "a valid 'Authorization: Bearer <GATEWAY_API_KEY>' is needed"
            )
        return None

    async def outbound_call(self, request: Request) -> Response:
        return await self._outbound(request, MAX_API_BODY_BYTES, self._start_call)

    async def outbound_batch(self, request: Request) -> Response:
        return await self._outbound(request, MAX_BATCH_BODY_BYTES, self._start_batch)

    async def _outbound(
        self, request: Request, limit: int, start: Callable[[Any], Awaitable[tuple[int, dict[str, Any]]]]
    ) -> Response:
        """Auth, body, draining, store errors and Idempotency-Key, for POST /calls and /calls/batch.

        With an Idempotency-Key, a client retrying after a timeout gets the first answer back
        instead of ringing someone twice.
        """
        assert self.dialer is not None
        store = self.dialer.store
        key = request.headers.get("idempotency-key", "")
        try:
            refused = self._api_key_ok(request)
            if refused:
                raise refused
            if self.draining:
                raise control.error(503, "draining", "this instance is shutting down; retry")
            if len(key) > 128:
                raise control.error(400, "bad_field", "Idempotency-Key is at most 128 characters")
            payload = _json(await _read_bounded(request, limit))
            if key:
                earlier = await store.remember(f"{request.url.path}:{key}", "pending")
                if earlier == "pending":
                    raise control.error(
                        409, "in_progress", "a request with this Idempotency-Key is under way"
                    )
                if earlier:
                    status, body = orjson.loads(earlier)
                    return JSONResponse(body, status_code=status)
            try:
                status, body = await start(payload)
            except BaseException:
                if key:
                    await store.settle(f"{request.url.path}:{key}", "")
                raise
            if key:
                await store.settle(f"{request.url.path}:{key}", orjson.dumps([status, body]).decode())
        except ActionRefused as exc:
            return _error_response(exc)
        except (RegistryUnavailable, RedisError, OSError):
            return _error_response(
                control.error(503, "store_unavailable", "the shared store is unreachable; retry")
            )
        return JSONResponse(body, status_code=status)

    async def _start_call(self, payload: Any) -> tuple[int, dict[str, Any]]:
        assert self.dialer is not None
        store = self.dialer.store
        args = outbound.parse_call(
            payload, default_from=self._default_from(), default_agent=self.settings.cartesia_agent_id
        )
        slot = "c" + secrets.token_hex(8)
        if not await store.acquire_slot(slot, self.settings.max_concurrent_calls):
            raise control.error(429, "too_many_calls", "MAX_CONCURRENT_CALLS outbound calls are live")
        try:
            wait = await store.reserve_start(self.settings.calls_per_second)
            if wait > MAX_START_WAIT_S:
                raise control.error(429, "rate_limited", f"CALLS_PER_SECOND reached; retry in {wait:.0f} s")
            await asyncio.sleep(wait)
        except BaseException:
            await store.release_slot(slot)
            raise
        try:
            call_sid = await self.dialer.dial(**args, slot=slot)  # frees the slot if it fails
        except TwilioRestError as exc:
            raise control.error(502, "twilio_refused", str(exc)) from None
        return 201, {"ok": True, "call_sid": call_sid}

    async def _start_batch(self, payload: Any) -> tuple[int, dict[str, Any]]:
        assert self.dialer is not None
        spec = outbound.parse_batch(
            payload, default_from=self._default_from(), default_agent=self.settings.cartesia_agent_id
        )
        await self.dialer.store.create_batch(spec)
        log.info("batch_created", batch_id=spec.batch_id, total=len(spec.recipients))
        return 202, {"ok": True, "batch_id": spec.batch_id, "total": len(spec.recipients)}

    def _default_from(self) -> str:
        return self.settings.outbound_from or self.settings.transfer_caller_id

    async def batch_progress(self, request: Request) -> Response:
        assert self.dialer is not None
        refused = self._api_key_ok(request)
        if refused:
            return _error_response(refused)
        try:
            found = await self.dialer.store.batch(request.path_params["batch_id"])
        except (RedisError, OSError):
            return _error_response(control.error(503, "store_unavailable", "the shared store is unreachable"))
        if found is None:
            return _error_response(control.error(404, "not_found", "no such batch"))
        return JSONResponse({"ok": True, **outbound.progress(*found)})

    # Platform

    async def healthz(self, _request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def readyz(self, _request: Request) -> Response:
        ready = not self.draining and await self.registry.ready()
        return JSONResponse({"ok": ready, "draining": self.draining}, status_code=200 if ready else 503)

    async def metrics_endpoint(self, _request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")


def _error_response(exc: ActionRefused) -> Response:
    return Response(control.dumps(control.error_body(exc)), exc.status, media_type="application/json")


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise control.error(400, "malformed_json", "the body is not valid JSON") from None


async def _read_bounded(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (not after reading it all)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise control.error(413, "body_too_large", f"the body is over {limit // 1024} KiB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise control.error(413, "body_too_large", f"the body is over {limit // 1024} KiB")
        chunks.append(chunk)
    return b"".join(chunks)


def route_for(routes: Mapping[str, dict[str, Any]], called: str) -> dict[str, Any]:
    """AGENT_ROUTES entry for the number or SIP URI called: exact, then without SIP parameters."""
    if not routes or not called:
        return {}
    bare = called.split(";", 1)[0]
    for key in (called, bare, bare.lower()):
        if key in routes:
            return routes[key]
    return {}


def create_app(settings: Settings | None = None, registry: SessionRegistry | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    for secret in settings.secrets:
        redactor.add(secret)
    gateway = Gateway(settings, registry)
    app = Starlette(
        routes=[
            Route("/twilio/voice", gateway.voice, methods=["POST"]),
            Route("/twilio/status", gateway.status, methods=["POST"]),
            Route("/twilio/dial-action", gateway.dial_action, methods=["POST"]),
            Route("/twilio/warm-status", gateway.warm_status, methods=["POST"]),
            Route("/twilio/conference", gateway.conference_status, methods=["POST"]),
            Route("/twilio/recording", gateway.recording_status, methods=["POST"]),
            WebSocketRoute("/twilio/media", BareASGI(gateway.media)),
            Route("/control/{token}", gateway.control, methods=["GET", "POST"]),
            Route("/healthz", gateway.healthz, methods=["GET"]),
            Route("/readyz", gateway.readyz, methods=["GET"]),
            Route("/metrics", gateway.metrics_endpoint, methods=["GET"]),
            Route("/calls", gateway.outbound_call, methods=["POST"]),
            Route("/calls/batch", gateway.outbound_batch, methods=["POST"]),
            Route("/calls/batch/{batch_id}", gateway.batch_progress, methods=["GET"]),
        ],
        lifespan=gateway.lifespan,
    )
    app.state.gateway = gateway
    return app
