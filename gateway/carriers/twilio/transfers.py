"""Transfers on Twilio: blind (`<Dial>` with an outcome URL) and warm (a conference with a whisper),
and what happens when nobody takes the call: back to an agent, or a message and a hang-up.

This is the session's `CallControl`: the session decides when; this module decides how.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from urllib.parse import urlencode

import structlog

from gateway.call.actions import TransferPlan
from gateway.carriers.twilio import streams, twiml
from gateway.carriers.twilio.rest import TwilioCalls
from gateway.registry.base import LIVE_TTL_S, TRANSFERRED_TTL_S, SessionRegistry
from gateway.settings import Settings

log = structlog.get_logger(__name__)

# Twilio's DialCallStatus / CallStatus values that mean the human never took the call.
NOT_TAKEN = frozenset({"busy", "no-answer", "failed", "canceled"})
WARM_WHISPER_DEFAULT = "Incoming transfer from the voice agent."

UrlBuilder = Callable[[str, str], str]  # (path, query) -> public URL


def conference_name(call_sid: str) -> str:
    return f"warm-{call_sid}"


class Transfers:
    def __init__(
        self,
        calls: TwilioCalls,
        registry: SessionRegistry,
        settings: Settings,
        url: UrlBuilder,
    ) -> None:
        self._calls = calls
        self._registry = registry
        self._settings = settings
        self._url = url
        self._ttl_s = TRANSFERRED_TTL_S

    async def hangup(self, call_sid: str) -> bool:
        return await self._calls.hangup(call_sid)

    async def fall_back(self, call_sid: str, fallback: Sequence[str]) -> None:
        kind, argument = fallback[0], fallback[1] if len(fallback) > 1 else ""
        if kind == "hangup":
            await self._calls.hangup(call_sid)
            return
        caller_id = self._settings.transfer_caller_id
        await self._calls.redirect(call_sid, twiml.fallback_twiml(kind, argument, caller_id))

    def _sip_credentials(self, target: str) -> tuple[str, str] | None:
        if not target.lower().startswith("sip"):
            return None
        host = target.split("@", 1)[-1].split(";", 1)[0].split("?", 1)[0].split(":", 1)[0]
        for pattern, username, password in self._settings.transfer_sip_credentials:
            if fnmatch.fnmatchcase(host, pattern):
                return username, password
        return None

    async def transfer(self, call_sid: str, plan: TransferPlan) -> None:
        if plan.mode == "warm":
            await self._warm(call_sid, plan)
            return
        action = self._url("/twilio/dial-action", urlencode({"to": plan.target, "mode": "blind"}))
        dial = twiml.dial_twiml(
            plan.target,
            plan.caller_id,
            headers=plan.headers,
            timeout_s=self._settings.transfer_timeout_s,
            action_url=action,
            sip_credentials=self._sip_credentials(plan.target),
        )
        await self._calls.redirect(call_sid, dial)

    async def _warm(self, call_sid: str, plan: TransferPlan) -> None:
        """The human is dialled first; only when Twilio has accepted that call is the caller put
        on hold in the conference, so a refused dial leaves the caller with the agent.

        The whisper is the first verb of the human's own call, before it joins the conference,
        so the caller never hears it. The human's joining (the conference's `join` callback) is
        what completes the transfer; their leg ending before that returns the caller.
        """
        name = conference_name(call_sid)
        query = urlencode({"caller": call_sid, "to": plan.target})
        # On both participants: Twilio may keep the conference's callback from whichever joins
        # first (the caller), and `human_joined` tells the two apart by CallSid.
        conference_events = self._url("/twilio/conference", query)
        human = twiml.conference_twiml(
            name,
            starts_conference=True,
            whisper=plan.summary or WARM_WHISPER_DEFAULT,
            status_callback=conference_events,
        )
        target = plan.target
        extra: dict[str, str] = {}
        if target.lower().startswith("sip"):
            target = twiml.sip_uri_with_headers(target, plan.headers)
            credentials = self._sip_credentials(plan.target)
            if credentials:
                extra = {"sip_auth_username": credentials[0], "sip_auth_password": credentials[1]}
        human_sid = await self._calls.create_call(
            to=target,
            from_=plan.caller_id,
            twiml=human,
            timeout=self._settings.transfer_timeout_s,
            status_callback=self._url("/twilio/warm-status", query),
            status_callback_event=["answered", "completed"],
            status_callback_method="POST",
            **extra,
        )
        await self._note_transfer(
            call_sid, {"target": plan.target, "human_call_sid": human_sid, "joined": False}
        )
        hold = twiml.conference_twiml(
            name,
            starts_conference=False,
            wait_url=self._settings.transfer_hold_url,
            status_callback=conference_events,
        )
        try:
            await self._calls.redirect(call_sid, hold)
        except Exception:
            # The caller stays with the agent: the human's leg, the note and the record's
            # short transferred lifetime all go, so that leg's last status moves nobody.
            await self._hang_up_quietly(human_sid)
            await self._note_transfer(call_sid, {}, LIVE_TTL_S)
            raise
        log.info("warm_transfer_dialling", call_sid=call_sid, human_call_sid=human_sid, target=plan.target)

    async def _note_transfer(self, call_sid: str, transfer: dict[str, object], ttl_s: float = 0.0) -> None:
        record = await self._registry.get(call_sid)
        if record is not None:
            record.transfer = dict(transfer)
            await self._registry.put(record, ttl_s or self._ttl_s)

    async def _hang_up_quietly(self, call_sid: str) -> None:
        try:
            await self._calls.hangup(call_sid)
        except Exception as exc:
            log.warning("hangup_failed", call_sid=call_sid, error=str(exc))

    async def human_joined(self, caller_sid: str, participant_sid: str) -> bool:
        """The conference says someone joined; True if it is the human (the transfer is done)."""
        record = await self._registry.get(caller_sid)
        if record is None or record.transfer.get("human_call_sid") != participant_sid:
            return False
        record.transfer["joined"] = True
        await self._registry.put(record, self._ttl_s)
        return True

    async def human_left(self, caller_sid: str, status: str, destination: str) -> bool:
        """The human's leg ended. If it never joined (busy, no answer, or hung up during the
        whisper), take the caller off hold; True when that happened."""
        record = await self._registry.get(caller_sid)
        if record is None or not record.transfer or record.transfer.get("joined"):
            return False  # over, taken, or a warm transfer that never put the caller on hold
        await self.return_caller(caller_sid, status, destination)
        return True

    async def caller_left(self, caller_sid: str) -> None:
        """The caller hung up: a human still ringing or hearing the whisper is hung up too."""
        record = await self._registry.get(caller_sid)
        human = record.transfer.get("human_call_sid") if record is not None else None
        if human and not record.transfer.get("joined"):  # type: ignore[union-attr]
            log.info("warm_transfer_abandoned", call_sid=caller_sid, human_call_sid=human)
            await self._hang_up_quietly(human)

    async def after_dial(self, call_sid: str, status: str, destination: str) -> str:
        """TwiML for the caller once a blind transfer's `<Dial>` is over."""
        if status not in NOT_TAKEN:
            return twiml.hangup_twiml()  # the human took the call and it is over now
        return await self._fallback_twiml(call_sid, status, destination)

    async def return_caller(self, call_sid: str, status: str, destination: str) -> None:
        """A warm transfer was not taken: take the caller off hold."""
        answer = await self._fallback_twiml(call_sid, status, destination)
        try:
            await self._calls.redirect(call_sid, answer)
        except Exception as exc:
            log.error("warm_transfer_return_failed", call_sid=call_sid, error=str(exc))

    async def _fallback_twiml(self, call_sid: str, status: str, destination: str) -> str:
        log.info(
            "transfer_not_taken",
            call_sid=call_sid,
            status=status,
            target=destination,
            fallback=self._settings.transfer_fallback,
        )
        if self._settings.transfer_fallback == "agent":
            why = {"status": status, "destination": destination}
            answer = await streams.reconnect(self._registry, call_sid, why, self._settings.public_url)
            if answer is not None:
                return answer
        return twiml.say_and_hangup_twiml(self._settings.transfer_fallback_message)
