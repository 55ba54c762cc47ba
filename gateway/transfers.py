"""Transfers on Twilio: blind (`<Dial>` with an outcome URL) and warm (a conference with a whisper),
and what happens when nobody takes the call: back to an agent, or a message and a hang-up.

This is the session's `CallControl`: the session decides when; this module decides how.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

import structlog

from gateway.carriers import twilio
from gateway.carriers.twilio_rest import TwilioCalls
from gateway.session import TransferPlan
from gateway.settings import Settings

log = structlog.get_logger(__name__)

# Twilio's DialCallStatus / CallStatus values that mean the human never took the call.
NOT_TAKEN = frozenset({"busy", "no-answer", "failed", "canceled"})
WARM_WHISPER_DEFAULT = "Incoming transfer from the voice agent."

UrlBuilder = Callable[[str, str], str]  # (path, query) -> public URL
Reconnect = Callable[[str, dict[str, str]], Awaitable[str | None]]  # (call_sid, why) -> TwiML


def conference_name(call_sid: str) -> str:
    return f"warm-{call_sid}"


class Transfers:
    def __init__(
        self,
        calls: TwilioCalls,
        settings: Settings,
        url: UrlBuilder,
        reconnect: Reconnect,
    ) -> None:
        self._calls = calls
        self._settings = settings
        self._url = url
        self._reconnect = reconnect

    async def hangup(self, call_sid: str) -> bool:
        return await self._calls.hangup(call_sid)

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
        twiml = twilio.dial_twiml(
            plan.target,
            plan.caller_id,
            headers=plan.headers,
            timeout_s=self._settings.transfer_timeout_s,
            action_url=action,
            sip_credentials=self._sip_credentials(plan.target),
        )
        await self._calls.redirect(call_sid, twiml)

    async def _warm(self, call_sid: str, plan: TransferPlan) -> None:
        """Caller on hold in a conference; the human is dialled, hears the summary, then joins.

        The whisper is the first verb of the human's own call, before it joins the conference,
        so the caller never hears it.
        """
        name = conference_name(call_sid)
        hold = twilio.conference_twiml(
            name, starts_conference=False, wait_url=self._settings.transfer_hold_url
        )
        await self._calls.redirect(call_sid, hold)
        human = twilio.conference_twiml(
            name, starts_conference=True, whisper=plan.summary or WARM_WHISPER_DEFAULT
        )
        status_url = self._url("/twilio/warm-status", urlencode({"caller": call_sid, "to": plan.target}))
        try:
            human_sid = await self._calls.create_call(
                to=plan.target,
                from_=plan.caller_id,
                twiml=human,
                timeout=self._settings.transfer_timeout_s,
                status_callback=status_url,
                status_callback_event=["answered", "completed"],
                status_callback_method="POST",
            )
        except Exception as exc:
            log.error("warm_transfer_dial_failed", call_sid=call_sid, error=str(exc))
            await self.return_caller(call_sid, "failed", plan.target)
            return
        log.info("warm_transfer_dialling", call_sid=call_sid, human_call_sid=human_sid, target=plan.target)

    async def after_dial(self, call_sid: str, status: str, destination: str) -> str:
        """TwiML for the caller once a blind transfer's `<Dial>` is over."""
        if status not in NOT_TAKEN:
            return twilio.hangup_twiml()  # the human took the call and it is over now
        return await self._fallback_twiml(call_sid, status, destination)

    async def return_caller(self, call_sid: str, status: str, destination: str) -> None:
        """A warm transfer was not taken: take the caller off hold."""
        twiml = await self._fallback_twiml(call_sid, status, destination)
        try:
            await self._calls.redirect(call_sid, twiml)
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
            twiml = await self._reconnect(call_sid, {"status": status, "destination": destination})
            if twiml is not None:
                return twiml
        return twilio.say_and_hangup_twiml(self._settings.transfer_fallback_message)
