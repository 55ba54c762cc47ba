"""The Twilio account and its phone numbers over the REST API: what `doctor` checks and
`setup-number` changes (never on a call's path).

A number rings the gateway when its Voice URL is `{PUBLIC_URL}/twilio/voice` (any query, such
as `?agent=`) called with POST, and reports the call's end when its status callback is
`{PUBLIC_URL}/twilio/status` with POST. A TwiML App on the number (`voice_application_sid`)
or a SIP trunk (`trunk_sid`) takes its calls instead, whatever its Voice URL says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from gateway.carriers.twilio.regions import api_host
from gateway.carriers.twilio.rest import TWILIO_ORIGIN, rest_client

VOICE_PATH = "/twilio/voice"
STATUS_PATH = "/twilio/status"
MAX_NUMBERS = 500  # an account's numbers looked at when none is named


@dataclass(frozen=True)
class Number:
    sid: str
    phone_number: str
    voice_url: str
    voice_method: str
    status_callback: str
    status_callback_method: str
    voice_application_sid: str
    trunk_sid: str

    @classmethod
    def of(cls, resource: Any) -> Number:
        def text(name: str) -> str:
            return str(getattr(resource, name, None) or "")

        return cls(
            sid=text("sid"),
            phone_number=text("phone_number"),
            voice_url=text("voice_url"),
            voice_method=text("voice_method").upper() or "POST",
            status_callback=text("status_callback"),
            status_callback_method=text("status_callback_method").upper() or "POST",
            voice_application_sid=text("voice_application_sid"),
            trunk_sid=text("trunk_sid"),
        )

    @property
    def agent(self) -> str:
        """The agent its Voice URL names (`?agent=`), if any."""
        return parse_qs(urlsplit(self.voice_url).query).get("agent", [""])[0]


def _ours(url: str, public_url: str, path: str) -> bool:
    base = public_url.rstrip("/") + path
    return url == base or url.startswith(base + "?")


def points_here(number: Number, public_url: str) -> bool:
    return not problems(number, public_url)


def problems(number: Number, public_url: str) -> list[str]:
    """Why calls to `number` would not reach this gateway as they should; [] when they do."""
    out = []
    if number.trunk_sid:
        out.append(f"it belongs to SIP trunk {number.trunk_sid}, which takes its calls")
    if number.voice_application_sid:
        out.append(f"TwiML App {number.voice_application_sid} takes its calls, not its Voice URL")
    if not _ours(number.voice_url, public_url, VOICE_PATH):
        out.append(f"its Voice URL is {number.voice_url or 'not set'}, not {public_url}{VOICE_PATH}")
    elif number.voice_method != "POST":
        out.append(f"its Voice URL is called with {number.voice_method}; the gateway takes POST")
    if not _ours(number.status_callback, public_url, STATUS_PATH):
        shown = number.status_callback or "not set"
        out.append(f"its status callback is {shown}, not {public_url}{STATUS_PATH}")
    elif number.status_callback_method != "POST":
        out.append(f"its status callback is called with {number.status_callback_method}; use POST")
    return out


class TwilioAccount:
    """The account's REST API, on the same client and regional host as call control."""

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        api_base: str = TWILIO_ORIGIN,
        *,
        region: str = "",
        edge: str = "",
    ) -> None:
        self.account_sid = account_sid
        self.host = api_host(region, edge)
        self._client, self._http = rest_client(account_sid, auth_token, api_base, region=region, edge=edge)

    async def close(self) -> None:
        await self._http.close()

    async def fetch(self) -> Any:
        return await self._client.api.v2010.accounts(self.account_sid).fetch_async()

    def _numbers(self) -> Any:
        return self._client.api.v2010.accounts(self.account_sid).incoming_phone_numbers

    async def find(self, phone_number: str) -> Number | None:
        found = await self._numbers().list_async(phone_number=phone_number, limit=20)
        exact = [n for n in found if n.phone_number == phone_number]
        return Number.of(exact[0]) if exact else None

    async def all_numbers(self) -> list[Number]:
        return [Number.of(n) for n in await self._numbers().list_async(limit=MAX_NUMBERS)]

    async def point_here(self, number: Number, public_url: str, agent: str | None = None) -> Number:
        """Point the number's Voice URL (POST) and status callback (POST) at this gateway.

        `agent`: the agent to name in the Voice URL; None keeps the one it names now when it
        already points here. A TwiML App on the number is taken off (it would win over the
        Voice URL)."""
        if agent is None and _ours(number.voice_url, public_url, VOICE_PATH):
            agent = number.agent
        voice_url = f"{public_url}{VOICE_PATH}" + (f"?{urlencode({'agent': agent})}" if agent else "")
        fields: dict[str, str] = {
            "voice_url": voice_url,
            "voice_method": "POST",
            "status_callback": f"{public_url}{STATUS_PATH}",
            "status_callback_method": "POST",
        }
        if number.voice_application_sid:
            fields["voice_application_sid"] = ""
        updated = await self._numbers()(number.sid).update_async(**fields)
        return Number.of(updated)
