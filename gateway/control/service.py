"""Carrying out a control request: on this instance's session, on the instance that holds the
call (routed through the registry), or, when that instance is gone, through the carrier's REST
API alone.
"""

from __future__ import annotations

from typing import Any

import structlog

from gateway.call.actions import Action, ActionRefused, EndCall, SendDtmf, TransferPlan, admit
from gateway.call.legs import CallControl
from gateway.call.session import Session
from gateway.call.states import FINAL, State, check_transition
from gateway.carriers.twilio.rest import TwilioRestError
from gateway.control import parse
from gateway.control.policy import TransferPolicy
from gateway.registry.base import CallRecord, OwnerGone, SessionRegistry

log = structlog.get_logger(__name__)


class ControlService:
    def __init__(
        self,
        registry: SessionRegistry,
        sessions: dict[str, Session],
        policy: TransferPolicy,
        control: CallControl,
    ) -> None:
        self._registry = registry
        self._sessions = sessions
        self._policy = policy
        self._control = control

    async def call_for(self, token_hash: str) -> CallRecord:
        """The live call a control token belongs to (404), if its rate allows (429)."""
        record = await self._registry.by_token(token_hash)
        if record is None or record.state in FINAL:
            raise parse.error(404, "not_found", "unknown or expired control URL")
        if not await self._registry.hit(token_hash, parse.RATE_LIMIT, parse.RATE_WINDOW_S):
            raise parse.error(429, "rate_limited", "too many requests for this call; slow down")
        return record

    def _session_of(self, record: CallRecord) -> Session | None:
        """This instance's session of the call, if it is the one the record (its token) names:
        after a handover an old session here may linger a few seconds, and must not act."""
        session = self._sessions.get(record.call_sid)
        same = session is not None and session.record.session_hash == record.session_hash
        return session if same else None

    def snapshot(self, record: CallRecord) -> dict[str, Any]:
        session = self._session_of(record)
        return session.snapshot() if session else record.public()

    async def execute(self, record: CallRecord, payload: dict[str, Any]) -> dict[str, Any]:
        """Carry out a parsed body (`parse.parse_body`); the reply body, or ActionRefused."""
        action = parse.build_action(record, payload, self._policy)
        session = self._session_of(record)
        if session is not None:
            session.submit(action)
            return parse.ok_body(action, record.call_sid)
        if record.owner != self._registry.instance_id and await self._registry.owner_alive(record.owner):
            try:
                return await self._route(record, payload)
            except OwnerGone:
                # Nobody listens for it: the process died, before its heartbeat expired.
                log.warning("owner_gone", call_sid=record.call_sid, owner=record.owner)
        return await self._act_without_owner(record, action)

    async def _route(self, record: CallRecord, payload: dict[str, Any]) -> dict[str, Any]:
        reply = await self._registry.route(record.owner, {"call_sid": record.call_sid, "payload": payload})
        if reply is None:
            raise parse.error(503, "owner_unavailable", "the instance holding the call did not answer")
        if reply.get("status") != 200:
            err = reply.get("body", {}).get("error", {})
            raise parse.error(reply.get("status", 500), err.get("code", "error"), err.get("message", ""))
        return reply["body"]

    async def handle_routed(self, request: dict[str, Any]) -> dict[str, Any]:
        """A control request another instance forwarded to us, the call's owner; or, from the
        instance a moved call's new stream reached, the request to let that call go."""
        if "release" in request:
            released = self._sessions.get(str(request["release"]))
            if released is not None and not released.done:
                await released.release()
            return {"status": 200, "body": {"ok": True}}
        session = self._sessions.get(request.get("call_sid", ""))
        try:
            if session is None:
                raise parse.error(404, "not_found", "unknown or expired control URL")
            action = parse.build_action(session.record, request.get("payload", {}), self._policy)
            session.submit(action)
        except ActionRefused as exc:
            return {"status": exc.status, "body": parse.error_body(exc)}
        return {"status": 200, "body": parse.ok_body(action, session.call_sid)}

    async def _act_without_owner(self, record: CallRecord, action: Action) -> dict[str, Any]:
        """The owner is gone: do what the REST API can do alone (hang up, transfer)."""
        bound = log.bind(call_sid=record.call_sid)
        if not admit(record.state, action):
            return parse.ok_body(action, record.call_sid)  # a repeated end_call
        if isinstance(action, SendDtmf):
            raise parse.error(503, "owner_unavailable", "the call's media is on an instance that is gone")
        leaving = State.TRANSFERRING if isinstance(action, TransferPlan) else State.ENDING
        check_transition(record.call_sid, record.state, leaving)
        await self._registry.set_state(record.call_sid, leaving)
        try:
            if isinstance(action, TransferPlan):
                await self._control.transfer(record.call_sid, action)
                # Kept, not deleted: a transfer nobody takes brings the caller back to an agent.
                await self._registry.set_state(record.call_sid, State.TRANSFERRED)
                bound.info("orphan_call_transferred", target=action.target)
            else:
                assert isinstance(action, EndCall)
                await self._control.hangup(record.call_sid)
                await self._registry.delete(record.call_sid)
                bound.info("orphan_call_hung_up")
        except TwilioRestError as exc:
            await self._registry.set_state(record.call_sid, record.state)  # as it was
            bound.error("orphan_call_action_failed", error=str(exc))
            raise parse.error(502, "twilio_refused", str(exc)) from None
        return parse.ok_body(action, record.call_sid)
