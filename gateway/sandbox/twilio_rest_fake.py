"""A Twilio REST API fake for call control: records requests, answers like Twilio.

Also creates calls (`POST .../Calls.json`) and recordings, and, when `auto_progress` is set,
plays Twilio's part of an outbound call: signed status callbacks (`initiated`, then
`in-progress` and `completed`, or `busy` / `no-answer`) to the call's StatusCallback URL.

Follows PROTOCOLS.md section 4: `POST /2010-04-01/Accounts/{AC}/Calls/{CA}.json` with form
`Status=completed` or `Twiml=...`. Unknown calls answer 404 with code 20404; a call that is
already over answers 400 with code 21220. Any update ends the call's media stream, as on Twilio:
the fake tells the simulator through `on_update` so it can send `stop`.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator
from yarl import URL

from gateway.sandbox.twilio_numbers_fake import AccountFake, RecordHosts, SeenRequest

UpdateHook = Callable[[str, dict[str, str]], Awaitable[None]]
CreateHook = Callable[[str, dict[str, str]], Awaitable[None]]


# Values Twilio's REST reference allows for the enumerated parameters the gateway sends.
CREATE_VALUES = {
    "StatusCallbackEvent": {"initiated", "ringing", "answered", "completed"},
    "MachineDetection": {"Enable", "DetectMessageEnd"},
    "StatusCallbackMethod": {"GET", "POST"},
    "Method": {"GET", "POST"},
}
RECORDING_VALUES = {
    "RecordingStatusCallbackEvent": {"in-progress", "completed", "absent"},
    "RecordingChannels": {"mono", "dual"},
}


@dataclass
class AutoProgress:
    """How the fake's outbound calls go: ring, then `outcome(to)`, then talk for `talk_s`."""

    ring_s: float = 0.05
    talk_s: float = 0.3
    outcome: Callable[[str], str] = lambda _to: "completed"


@dataclass
class RestRequest:
    method: str
    path: str
    call_sid: str
    form: dict[str, str]
    account_sid: str
    authorised: bool
    at: float = field(default_factory=time.monotonic)
    answered: int = 0  # the HTTP status the fake answered (call updates)
    code: int | None = None  # and Twilio's error code, when it answered an error


class TwilioRestFake:
    def __init__(self, account_sid: str, auth_token: str) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.requests: list[RestRequest] = []
        self.calls: dict[str, str] = {}  # call_sid -> status
        self.on_update: UpdateHook | None = None
        self.on_create: CreateHook | None = None
        self.refuse_redirects = False  # answer every TwiML update with a Twilio error
        self.stall_updates = False  # take call updates and never answer (until `release`)
        self.stall_creates = 0  # create this many more calls, and never answer those requests
        self.release = asyncio.Event()
        self.refuse_creates = False  # answer every new call with a Twilio error
        self.auto_progress: AutoProgress | None = None
        self.created: list[RestRequest] = []
        self.created_at: dict[str, float] = {}  # call SID -> time.time() of its creation
        self.lookups: list[tuple[str, str]] = []  # (To, From) of each call list request
        self.active = 0
        self.max_active = 0
        self.callbacks_posted: list[tuple[str, str]] = []  # (call_sid, status)
        self.callbacks_answered: list[int] = []  # the gateway's HTTP status for each callback
        self._tasks: set[asyncio.Task[None]] = set()
        self.seen: list[SeenRequest] = []  # every request, with the Host it was meant for
        self.account = AccountFake(self)  # the account and its phone numbers
        self.app = Starlette(
            routes=[
                Route("/2010-04-01/Accounts/{account}/Calls.json", self._create, methods=["POST"]),
                Route("/2010-04-01/Accounts/{account}/Calls.json", self._list, methods=["GET"]),
                Route("/2010-04-01/Accounts/{account}/Calls/{call}.json", self._update, methods=["POST"]),
                Route(
                    "/2010-04-01/Accounts/{account}/Calls/{call}/Recordings.json",
                    self._record,
                    methods=["POST"],
                ),
                *self.account.routes(),
            ],
            middleware=[Middleware(RecordHosts, seen=self.seen)],
        )

    def add_call(self, call_sid: str) -> None:
        self.calls[call_sid] = "in-progress"

    def forget_call(self, call_sid: str) -> None:
        """Twilio no longer knows the call: updates answer 404 with code 20404."""
        self.calls.pop(call_sid, None)

    def complete_call(self, call_sid: str) -> None:
        """The call ended on Twilio's side (the caller hung up): updates answer 400, code 21220."""
        self.calls[call_sid] = "completed"

    def hangups(self, call_sid: str | None = None) -> list[RestRequest]:
        return [
            r for r in self.requests if r.form.get("Status") == "completed" and call_sid in (None, r.call_sid)
        ]

    def redirects(self, call_sid: str | None = None) -> list[RestRequest]:
        return [
            r
            for r in self.requests
            if "Twiml" in r.form and not r.path.endswith("/Calls.json") and call_sid in (None, r.call_sid)
        ]

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

    @staticmethod
    def _invalid(multi: list[tuple[str, object]], allowed: dict[str, set[str]]) -> str | None:
        """The first parameter whose value Twilio's API would refuse, as Twilio's docs list them."""
        for name, value in multi:
            if name in allowed and value not in allowed[name]:
                return f"{name}={value!r} is not one of {sorted(allowed[name])}"
        return None

    async def _create(self, request: Request) -> Response:
        raw = await request.form()
        form = {k: v for k, v in raw.items() if isinstance(v, str)}
        bad = self._invalid(raw.multi_items(), CREATE_VALUES)
        account = request.path_params["account"]
        authorised = self._authorised(request) and account == self.account_sid
        call_sid = "CA" + secrets.token_hex(16)
        entry = RestRequest("POST", request.url.path, call_sid, form, account, authorised)
        self.requests.append(entry)
        if not authorised:
            return self._error(401, 20003, "Authenticate")
        if not form.get("To") or not form.get("From") or not (form.get("Url") or form.get("Twiml")):
            return self._error(400, 21205, "To, From and Url or Twiml are required")
        if bad:
            return self._error(400, 21205, bad)
        if self.refuse_creates:
            return self._error(400, 21215, "Account not authorized to call this number")
        self.created.append(entry)
        self.calls[call_sid] = "queued"
        if self.on_create is not None:
            await self.on_create(call_sid, form)
        self.created_at[call_sid] = time.time()
        if self.stall_creates:
            # Twilio made the call, and its answer is lost on the way; its status callbacks
            # are held up too, until `release` (the gateway's own lookup must settle it).
            self.stall_creates -= 1
            await self.release.wait()
        if self.auto_progress is not None and form.get("StatusCallback"):
            task = asyncio.create_task(self._progress(call_sid, form, self.auto_progress))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return JSONResponse({"sid": call_sid, "account_sid": account, "status": "queued"}, status_code=201)

    async def _list(self, request: Request) -> Response:
        """Calls, newest first, filtered by `To` and `From` as Twilio's list is."""
        authorised = self._authorised(request) and request.path_params["account"] == self.account_sid
        if not authorised:
            return self._error(401, 20003, "Authenticate")
        to, from_ = request.query_params.get("To"), request.query_params.get("From")
        self.lookups.append((to or "", from_ or ""))
        rows = [
            {
                "sid": entry.call_sid,
                "account_sid": self.account_sid,
                "to": entry.form.get("To"),
                "from": entry.form.get("From"),
                "status": self.calls.get(entry.call_sid, "queued"),
                "date_created": email.utils.formatdate(self.created_at[entry.call_sid], usegmt=True),
            }
            for entry in reversed(self.created)
            if to in (None, entry.form.get("To")) and from_ in (None, entry.form.get("From"))
        ]
        page = {"calls": rows, "end": max(0, len(rows) - 1), "first_page_uri": request.url.path,
                "next_page_uri": None, "page": 0, "page_size": 50, "previous_page_uri": None,
                "start": 0, "uri": request.url.path}  # fmt: skip
        return JSONResponse(page)

    async def _progress(self, call_sid: str, form: dict[str, str], plan: AutoProgress) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        outcome = "failed"
        try:
            await self.post_status(call_sid, form, "initiated")
            await asyncio.sleep(plan.ring_s)
            outcome = plan.outcome(form["To"])
            if outcome == "completed":
                self.calls[call_sid] = "in-progress"
                await self.post_status(call_sid, form, "in-progress")
                await asyncio.sleep(plan.talk_s)
        finally:
            self.active -= 1
            self.calls[call_sid] = outcome
        await self.post_status(call_sid, form, outcome)

    async def post_status(self, call_sid: str, form: dict[str, str], status: str) -> int:
        """POST a signed status callback for the call, as Twilio does."""
        url = form["StatusCallback"]
        params = {
            "CallSid": call_sid,
            "AccountSid": self.account_sid,
            "CallStatus": status,
            "From": form.get("From", ""),
            "To": form.get("To", ""),
            "Direction": "outbound-api",
        }
        signature = RequestValidator(self.auth_token).compute_signature(url, params)
        self.callbacks_posted.append((call_sid, status))
        async with (
            aiohttp.ClientSession() as http,
            # encoded=True: send the URL byte for byte as signed, as Twilio does
            http.post(URL(url, encoded=True), data=params, headers={"X-Twilio-Signature": signature}) as resp,
        ):
            self.callbacks_answered.append(resp.status)
            return resp.status

    async def _record(self, request: Request) -> Response:
        raw = await request.form()
        form = {k: v for k, v in raw.items() if isinstance(v, str)}
        bad = self._invalid(raw.multi_items(), RECORDING_VALUES)
        call_sid = request.path_params["call"]
        authorised = self._authorised(request)
        self.requests.append(
            RestRequest("POST", request.url.path, call_sid, form, self.account_sid, authorised)
        )
        if not authorised:
            return self._error(401, 20003, "Authenticate")
        if call_sid not in self.calls:
            return self._error(404, 20404, "not found")
        if bad:
            return self._error(400, 21205, bad)
        return JSONResponse({"sid": "RE" + secrets.token_hex(16), "call_sid": call_sid}, status_code=201)

    async def _update(self, request: Request) -> Response:
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        call_sid = request.path_params["call"]
        account = request.path_params["account"]
        authorised = self._authorised(request) and account == self.account_sid
        entry = RestRequest("POST", request.url.path, call_sid, form, account, authorised)
        self.requests.append(entry)
        if self.stall_updates:
            await self.release.wait()
        response = await self._apply_update(entry, request.url.path)
        entry.answered = response.status_code
        if response.status_code >= 400:
            entry.code = orjson.loads(bytes(response.body))["code"]
        return response

    async def _apply_update(self, entry: RestRequest, path: str) -> Response:
        call_sid, form = entry.call_sid, entry.form
        if not entry.authorised:
            return self._error(401, 20003, "Authenticate")
        status = self.calls.get(call_sid)
        if status is None:
            return self._error(404, 20404, f"The requested resource {path} was not found")
        if status != "in-progress":
            return self._error(400, 21220, "Call is not in-progress. Cannot redirect.")
        if self.refuse_redirects and "Twiml" in form:
            return self._error(400, 13221, "Dial: Invalid 'To' attribute")
        if form.get("Status") == "completed":
            self.calls[call_sid] = "completed"
        if self.on_update is not None:
            await self.on_update(call_sid, form)
        return JSONResponse(
            {"sid": call_sid, "account_sid": entry.account_sid, "status": self.calls[call_sid]}
        )
