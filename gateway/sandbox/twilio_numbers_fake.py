"""The account and phone-number part of the Twilio REST fake (what `doctor` and
`setup-number` use), and a record of the Host every request to the fake was meant for.

Follows Twilio's REST reference: `GET /2010-04-01/Accounts/{AC}.json` (the account, with its
`status`: active, suspended or closed), `GET .../IncomingPhoneNumbers.json` (filtered by
`PhoneNumber`), `GET`/`POST .../IncomingPhoneNumbers/{PN}.json` (fetch, update `VoiceUrl`,
`VoiceMethod`, `StatusCallback`, `StatusCallbackMethod`, `VoiceApplicationSid`). Bad
credentials answer 401 with code 20003, an unknown number 404 with code 20404.
"""

from __future__ import annotations

import email.utils
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from gateway.sandbox.twilio_rest_fake import TwilioRestFake

BASE = "/2010-04-01/Accounts/{account}"
METHODS = {"GET", "POST"}
UPDATABLE = {
    "VoiceUrl": "voice_url",
    "VoiceMethod": "voice_method",
    "StatusCallback": "status_callback",
    "StatusCallbackMethod": "status_callback_method",
    "VoiceApplicationSid": "voice_application_sid",
    "FriendlyName": "friendly_name",
}


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    host: str  # the Host header: the Twilio host the client meant the request for
    at: float = field(default_factory=time.monotonic)


class RecordHosts:
    """ASGI middleware: notes the method, path and Host of every HTTP request."""

    def __init__(self, app: ASGIApp, seen: list[SeenRequest]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            host = headers.get(b"host", b"").decode("latin-1")
            self.seen.append(SeenRequest(scope["method"], scope["path"], host))
        await self.app(scope, receive, send)


class AccountFake:
    """The account and its incoming phone numbers, sharing the fake's credentials."""

    def __init__(self, rest: TwilioRestFake) -> None:
        self.rest = rest
        self.status = "active"  # Twilio's account status: active, suspended, closed
        self.numbers: dict[str, dict[str, Any]] = {}  # PN sid -> the resource as Twilio shows it
        self.updates: list[tuple[str, dict[str, str]]] = []  # (PN sid, form) of each update

    def routes(self) -> list[Route]:
        return [
            Route(BASE + ".json", self._fetch_account, methods=["GET"]),
            Route(BASE + "/IncomingPhoneNumbers.json", self._list_numbers, methods=["GET"]),
            Route(BASE + "/IncomingPhoneNumbers/{sid}.json", self._fetch_number, methods=["GET"]),
            Route(BASE + "/IncomingPhoneNumbers/{sid}.json", self._update_number, methods=["POST"]),
        ]

    def add_number(self, phone_number: str, **fields: str) -> str:
        """A number on the account; `fields` as Twilio names them (voice_url=..., ...)."""
        sid = "PN" + secrets.token_hex(16)
        now = email.utils.formatdate(usegmt=True)
        self.numbers[sid] = {
            "sid": sid,
            "account_sid": self.rest.account_sid,
            "phone_number": phone_number,
            "friendly_name": phone_number,
            "voice_url": "",
            "voice_method": "POST",
            "status_callback": "",
            "status_callback_method": "POST",
            "voice_application_sid": "",
            "trunk_sid": None,
            "capabilities": {"voice": True, "sms": True, "mms": False, "fax": False},
            "date_created": now,
            "date_updated": now,
            "api_version": "2010-04-01",
            "uri": f"/2010-04-01/Accounts/{self.rest.account_sid}/IncomingPhoneNumbers/{sid}.json",
            **fields,
        }
        return sid

    def number(self, phone_number: str) -> dict[str, Any]:
        return next(n for n in self.numbers.values() if n["phone_number"] == phone_number)

    def _refused(self, request: Request) -> Response | None:
        if not self.rest._authorised(request) or request.path_params["account"] != self.rest.account_sid:
            return self.rest._error(401, 20003, "Authenticate")
        return None

    async def _fetch_account(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        sid = self.rest.account_sid
        return JSONResponse(
            {
                "sid": sid,
                "owner_account_sid": sid,
                "friendly_name": "Sandbox account",
                "status": self.status,
                "type": "Full",
                "auth_token": self.rest.auth_token,  # Twilio returns it: nothing may print it
                "date_created": email.utils.formatdate(usegmt=True),
                "uri": f"/2010-04-01/Accounts/{sid}.json",
            }
        )

    async def _list_numbers(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        wanted = request.query_params.get("PhoneNumber")
        rows = [n for n in self.numbers.values() if wanted in (None, n["phone_number"])]
        path = request.url.path
        page = {"incoming_phone_numbers": rows, "end": max(0, len(rows) - 1), "first_page_uri": path,
                "next_page_uri": None, "page": 0, "page_size": 50, "previous_page_uri": None,
                "start": 0, "uri": path}  # fmt: skip
        return JSONResponse(page)

    async def _fetch_number(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        number = self.numbers.get(request.path_params["sid"])
        if number is None:
            return self.rest._error(404, 20404, f"The requested resource {request.url.path} was not found")
        return JSONResponse(number)

    async def _update_number(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        number = self.numbers.get(request.path_params["sid"])
        if number is None:
            return self.rest._error(404, 20404, f"The requested resource {request.url.path} was not found")
        for name in ("VoiceMethod", "StatusCallbackMethod"):
            if name in form and form[name].upper() not in METHODS:
                return self.rest._error(400, 21205, f"{name} must be GET or POST")
        self.updates.append((number["sid"], form))
        for name, key in UPDATABLE.items():
            if name in form:
                number[key] = form[name]
        number["date_updated"] = email.utils.formatdate(usegmt=True)
        return JSONResponse(number)
