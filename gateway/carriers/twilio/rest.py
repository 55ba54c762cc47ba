"""Twilio REST call control (hang up, redirect), through the twilio package's async client."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import structlog
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client
from twilio.rest.api import Api  # noqa: F401 (imported now, not by the first request: see below)

from gateway.carriers.twilio.regions import resolve

log = structlog.get_logger(__name__)

# `Client.calls` imports Twilio's whole REST API (~90 modules, 0.1 s or more) on first use. The
# import above does it at start-up: on the first hang-up it stalled every live call's audio.

TWILIO_ORIGIN = "https://api.twilio.com"
# Twilio's CallStatus values of a call that is over.
FINAL_CALL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
# Codes that mean the call is already over: hanging it up again is done, not an error.
CALL_GONE_CODES = frozenset({20404, 21220})
# 20429: too many concurrent requests. Retried with backoff, like a 5xx, at most this often;
# a REST call is on the path of a hang-up or a transfer, so the whole thing stays within seconds.
MAX_ATTEMPTS = 4
BACKOFF_S = (0.25, 0.5, 1.0)
# Each request's whole time, connect to last byte. The twilio package's async client passes no
# timeout of its own to aiohttp (whose default is 300 s), so this is the one that applies.
REQUEST_TIMEOUT_S = 5.0
# Looking up whether an unanswered create made a call: the newest calls to that number, and
# how far Twilio's clock may be behind ours.
LOOKUP_LIMIT = 20
CLOCK_SKEW_S = 5.0


class TwilioRestError(RuntimeError):
    """Twilio refused a call-control request, or could not be reached (status 0)."""

    def __init__(
        self, message: str, status: int = 0, code: int | None = None, *, ambiguous: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.ambiguous = ambiguous  # no answer to a create: the call may exist all the same

    @property
    def nothing_created(self) -> bool:
        """Twilio certainly did nothing: it answered, and with too-busy (retry later)."""
        return self.code == 20429 or self.status in (429, 503)


# Told of every failed request, retries included: its HTTP status (0: no answer) and Twilio's
# error code (the metrics count them).
RestErrorSink = Callable[[int, int | None], None]


def _error_code(body: str) -> int | None:
    try:
        code = orjson.loads(body).get("code")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return code if isinstance(code, int) else None


def _refused(what: str, exc: TwilioRestException) -> TwilioRestError:
    return TwilioRestError(f"{what} refused: HTTP {exc.status} code {exc.code}", exc.status, exc.code)


class _RebasedHttpClient(AsyncTwilioHttpClient):
    """Sends every request meant for a Twilio host (api.twilio.com, api.dublin.ie1.twilio.com,
    ...) to `api_base` instead (TWILIO_API_BASE, for tests), with the Host header of the host
    it was meant for: a fake can tell which regional endpoint a request would have reached."""

    on_error: RestErrorSink | None = None

    def __init__(self, api_base: str) -> None:
        super().__init__(timeout=REQUEST_TIMEOUT_S)
        self._api_base = api_base.rstrip("/")

    async def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if self._api_base != TWILIO_ORIGIN:
            parts = urlsplit(url)
            host = parts.hostname or ""
            if host == "twilio.com" or host.endswith(".twilio.com"):
                url = self._api_base + url[len(f"{parts.scheme}://{parts.netloc}") :]
                kwargs["headers"] = {**(kwargs.get("headers") or {}), "Host": parts.netloc}
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                response = await super().request(method, url, *args, **kwargs)
        except (TimeoutError, OSError, aiohttp.ClientError):
            if self.on_error is not None:
                self.on_error(0, None)
            raise
        if response.status_code >= 400 and self.on_error is not None:
            self.on_error(response.status_code, _error_code(response.text))
        return response


def rest_client(
    account_sid: str,
    auth_token: str,
    api_base: str = TWILIO_ORIGIN,
    *,
    region: str | None = None,
    edge: str | None = None,
) -> tuple[Client, _RebasedHttpClient]:
    """The twilio package's client on our HTTP client, and that HTTP client (to close).

    `region`/`edge` pick Twilio's regional REST host (gateway.carriers.twilio.regions); None
    reads TWILIO_REGION / TWILIO_EDGE from the environment, as the twilio package itself does.
    """
    region = os.environ.get("TWILIO_REGION", "") if region is None else region
    edge = os.environ.get("TWILIO_EDGE", "") if edge is None else edge
    region, edge = resolve(region, edge)
    http = _RebasedHttpClient(api_base)
    # Ours only: for an empty value the package would fall back to os.environ on its own.
    environment = {"TWILIO_REGION": region, "TWILIO_EDGE": edge}
    client = Client(
        account_sid or "AC_unset",
        auth_token or "unset",
        http_client=http,
        region=region or None,
        edge=edge or None,
        environment=environment,
    )
    return client, http


class TwilioCalls:
    """Call control for live calls. One per process, opened and closed in the app lifespan."""

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        api_base: str = TWILIO_ORIGIN,
        *,
        region: str | None = None,
        edge: str | None = None,
    ) -> None:
        self._client, self._http = rest_client(account_sid, auth_token, api_base, region=region, edge=edge)

    async def close(self) -> None:
        await self._http.close()

    @property
    def on_error(self) -> RestErrorSink | None:
        return self._http.on_error

    @on_error.setter
    def on_error(self, sink: RestErrorSink | None) -> None:
        self._http.on_error = sink

    async def hangup(self, call_sid: str) -> bool:
        """Hang the call up. True if this request ended it, False if it was already over."""
        try:
            await self._update(call_sid, status="completed")
        except TwilioRestException as exc:
            if exc.code in CALL_GONE_CODES:
                log.info("hangup_call_already_gone", call_sid=call_sid, twilio_code=exc.code)
                return False
            raise _refused("hang-up", exc) from None
        return True

    async def redirect(self, call_sid: str, twiml: str) -> None:
        """Replace the call's TwiML (ends the media stream; used for transfers).

        Not retried after a timeout: Twilio may have applied it, and a second update would
        restart a `<Dial>` that is already ringing someone.
        """
        try:
            await self._update(call_sid, retry_unanswered=False, twiml=twiml)
        except TwilioRestException as exc:
            raise _refused("call update", exc) from None

    async def create_call(self, **fields: Any) -> str:
        """Start an outbound call (`to`, `from_`, `url` or `twiml`, `status_callback`, ...); its SID.

        Not retried on failure: a retry after a lost response could ring someone twice.
        """
        try:
            call = await self._client.calls.create_async(**fields)
        except TwilioRestException as exc:
            raise _refused("call", exc) from None
        except (TimeoutError, OSError, aiohttp.ClientError) as exc:
            raise TwilioRestError(
                f"Twilio did not answer the call's creation ({type(exc).__name__}): it may exist",
                ambiguous=True,
            ) from None
        return str(call.sid)

    async def find_call(self, *, to: str, from_: str, created_after: float) -> str | None:
        """The SID of a call to `to` from `from_` that Twilio created at or after
        `created_after` (time.time()), if there is one: what settles an unanswered create."""
        try:
            calls = await self._client.calls.list_async(to=to, from_=from_, limit=LOOKUP_LIMIT)
        except TwilioRestException as exc:
            raise _refused("call lookup", exc) from None
        except (TimeoutError, OSError, aiohttp.ClientError) as exc:
            raise TwilioRestError(f"Twilio unreachable: {type(exc).__name__}") from None
        for call in calls:  # newest first
            created = call.date_created
            if created is not None and created.timestamp() >= created_after - CLOCK_SKEW_S:
                return str(call.sid)
        return None

    async def record(self, call_sid: str, status_callback: str) -> str:
        """Ask Twilio to record the call, caller and agent on separate channels."""
        try:
            recording = await self._client.calls(call_sid).recordings.create_async(
                recording_channels="dual",
                recording_status_callback=status_callback,
                recording_status_callback_event=["completed", "absent"],
            )
        except TwilioRestException as exc:
            raise _refused("recording", exc) from None
        return str(recording.sid)

    async def _update(self, call_sid: str, *, retry_unanswered: bool = True, **fields: Any) -> None:
        for attempt in range(MAX_ATTEMPTS):
            try:
                await self._client.calls(call_sid).update_async(**fields)
                return
            except TwilioRestException as exc:
                retryable = exc.code == 20429 or exc.status >= 500
                if not retryable or attempt == MAX_ATTEMPTS - 1:
                    raise
                log.warning("twilio_rest_retry", call_sid=call_sid, status=exc.status, code=exc.code)
            except (TimeoutError, OSError, aiohttp.ClientError) as exc:
                if attempt == MAX_ATTEMPTS - 1 or not retry_unanswered:
                    raise TwilioRestError(f"Twilio unreachable: {type(exc).__name__}") from None
                log.warning("twilio_rest_retry", call_sid=call_sid, error=type(exc).__name__)
            await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
