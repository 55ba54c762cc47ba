"""A Twilio REST API fake for call control: records requests, answers like Twilio.

Follows PROTOCOLS.md section 4: `POST /2010-04-01/Accounts/{AC}/Calls/{CA}.json` with form
`Status=completed` or `Twiml=...`. Unknown calls answer 404 with code 20404; a call that is
already over answers 400 with code 21220. Any update ends the call's media stream, as on Twilio:
the fake tells the simulator through `on_update` so it can send `stop`.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

UpdateHook = Callable[[str, dict[str, str]], Awaitable[None]]


@dataclass
class RestRequest:
    method: str
    path: str
    call_sid: str
    form: dict[str, str]
    account_sid: str
    authorised: bool
    at: float = field(default_factory=time.monotonic)


class TwilioRestFake:
    def __init__(self, account_sid: str, auth_token: str) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.requests: list[RestRequest] = []
        self.calls: dict[str, str] = {}  # call_sid -> status
        self.on_update: UpdateHook | None = None
        self.app = Starlette(
            routes=[
                Route(
                    "/2010-04-01/Accounts/{account}/Calls/{call}.json",
                    self._update,
                    methods=["POST"],
                )
            ]
        )

    def add_call(self, call_sid: str) -> None:
        self.calls[call_sid] = "in-progress"

    def hangups(self, call_sid: str | None = None) -> list[RestRequest]:
        return [
            r for r in self.requests if r.form.get("Status") == "completed" and call_sid in (None, r.call_sid)
        ]

    def redirects(self, call_sid: str | None = None) -> list[RestRequest]:
        return [r for r in self.requests if "Twiml" in r.form and call_sid in (None, r.call_sid)]

    def _authorised(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        return header == f"Basic {expected}"

    @staticmethod
    def _error(status: int, code: int, message: str) -> Response:
        return JSONResponse(
            {
                "code": code,
                "message": message,
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status,
            },
            status_code=status,
        )

    async def _update(self, request: Request) -> Response:
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        call_sid = request.path_params["call"]
        account = request.path_params["account"]
        authorised = self._authorised(request) and account == self.account_sid
        self.requests.append(RestRequest("POST", request.url.path, call_sid, form, account, authorised))
        if not authorised:
            return self._error(401, 20003, "Authenticate")
        status = self.calls.get(call_sid)
        if status is None:
            return self._error(404, 20404, f"The requested resource {request.url.path} was not found")
        if status != "in-progress":
            return self._error(400, 21220, "Call is not in-progress. Cannot redirect.")
        if form.get("Status") == "completed":
            self.calls[call_sid] = "completed"
        if self.on_update is not None:
            await self.on_update(call_sid, form)
        return JSONResponse({"sid": call_sid, "account_sid": account, "status": self.calls[call_sid]})
