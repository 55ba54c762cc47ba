"""`line-gateway doctor`: checks a deployment for real, each check OK, WARN, SKIP or FAIL with
the fix it suggests; exit 1 when any fails.

- the settings (gateway.preflight: what `serve` warns of at start);
- PUBLIC_URL: https://, `GET /healthz` answers over TLS with a trusted certificate, and a status
  callback signed with TWILIO_AUTH_TOKEN over `{PUBLIC_URL}/twilio/status` is accepted: only a
  gateway with this auth token and this PUBLIC_URL accepts it;
- Twilio: the account fetched with the credentials (on TWILIO_REGION's host), then the numbers:
  those named on the command line and AGENT_ROUTES' numbers must each point at this gateway;
  with none named, every number on the account is listed and at least one must;
- each agent (CARTESIA_AGENT_ID, AGENT_ROUTES', the numbers' `?agent=`): a real Calls API
  session (gateway.doctor_backends);
- Redis, when REDIS_URL is set (gateway.doctor_backends).
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TextIO

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from twilio.base.exceptions import TwilioRestException
from twilio.request_validator import RequestValidator

from gateway import preflight
from gateway.carriers.twilio.numbers import Number, TwilioAccount, problems
from gateway.doctor_backends import check_agents, check_redis
from gateway.settings import Settings

HTTP_TIMEOUT_S = 10.0
REST_ERRORS = (TwilioRestException, aiohttp.ClientError, OSError, TimeoutError)


@dataclass(frozen=True)
class Check:
    status: str  # OK, WARN, SKIP, FAIL
    name: str
    detail: str
    fix: str = ""


class Report:
    """Prints each check as it is made, and remembers whether any failed."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.checks: list[Check] = []

    def add(self, status: str, name: str, detail: str, fix: str = "") -> None:
        check = Check(status, name, detail, fix)
        self.checks.append(check)
        print(f"  {status:<5} {name}: {detail}", file=self.out)
        if fix:
            print(f"        fix: {fix}", file=self.out)
        self.out.flush()

    @property
    def failed(self) -> bool:
        return any(c.status == "FAIL" for c in self.checks)


class PinnedResolver(AbstractResolver):
    """`--resolve HOST:ADDRESS`, as curl's: checks a deployment before DNS points at it."""

    def __init__(self, pins: Mapping[str, str]) -> None:
        self._pins = dict(pins)
        self._default = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        address = self._pins.get(host)
        if address is None:
            return await self._default.resolve(host, port, family)
        ip = ipaddress.ip_address(address)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return [ResolveResult(hostname=host, host=address, port=port, family=family, proto=0,
                              flags=socket.AI_NUMERICHOST)]  # fmt: skip

    async def close(self) -> None:
        await self._default.close()


def _mask(sid: str) -> str:
    return sid[:6] + "…" + sid[-4:] if len(sid) > 12 else sid


async def check_public_url(s: Settings, report: Report, resolve: Mapping[str, str]) -> None:
    url = s.public_url
    if preflight.is_loopback(url):
        report.add(
            "FAIL",
            "PUBLIC_URL",
            f"{url} is this machine: Twilio cannot reach it",
            "set PUBLIC_URL to the https:// origin Twilio calls, e.g. https://gw.example.com",
        )
        return
    if not url.startswith("https://"):
        report.add(
            "FAIL",
            "PUBLIC_URL",
            f"{url} is not https://: Twilio signs https webhooks and streams media over wss:// only",
            "terminate TLS in front of the gateway (a proxy or your platform) and set PUBLIC_URL=https://...",
        )
        return
    # A context made now (not aiohttp's, made at import) so SSL_CERT_FILE applies as set.
    tls = ssl.create_default_context()
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    connector = aiohttp.TCPConnector(resolver=PinnedResolver(resolve))
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        try:
            async with http.get(url + "/healthz", ssl=tls) as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else None
                status = resp.status
        except aiohttp.ClientConnectorCertificateError as exc:
            report.add(
                "FAIL",
                "PUBLIC_URL",
                f"{url}: its TLS certificate is not trusted ({exc.certificate_error})",
                "Twilio needs a certificate from a public CA for this host name (e.g. Let's Encrypt)",
            )
            return
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            report.add(
                "FAIL",
                "PUBLIC_URL",
                f"GET {url}/healthz failed: {type(exc).__name__}: {exc}".rstrip(": "),
                "check the DNS name, the firewall and that the gateway runs there",
            )
            return
        if status != 200 or not isinstance(body, dict) or body.get("ok") is not True:
            report.add(
                "FAIL",
                "PUBLIC_URL",
                f'GET {url}/healthz answered {status}, not this gateway\'s {{"ok": true}}',
                "point PUBLIC_URL (and its proxy) at line-gateway",
            )
            return
        report.add("OK", "PUBLIC_URL", f"{url}/healthz answers over HTTPS with a trusted certificate")
        await _check_signed_callback(s, http, tls, report)


async def _check_signed_callback(
    s: Settings, http: aiohttp.ClientSession, tls: ssl.SSLContext, report: Report
) -> None:
    """A status callback for a call that does not exist, with a non-final status: the gateway
    checks its signature and does nothing else. Only a gateway that signs with this auth token
    over this PUBLIC_URL accepts it."""
    if not s.twilio_auth_token:
        report.add("SKIP", "signed webhook", "TWILIO_AUTH_TOKEN is not set")
        return
    url = s.public_url + "/twilio/status"
    form = {
        "CallSid": "CA" + secrets.token_hex(16),
        "AccountSid": s.twilio_account_sid,
        "CallStatus": "ringing",
        "Direction": "inbound",
    }
    signature = RequestValidator(s.twilio_auth_token).compute_signature(url, form)
    try:
        async with http.post(url, data=form, headers={"X-Twilio-Signature": signature}, ssl=tls) as resp:
            status = resp.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        report.add("FAIL", "signed webhook", f"POST {url} failed: {type(exc).__name__}: {exc}")
        return
    if status == 403:
        report.add(
            "FAIL",
            "signed webhook",
            f"the gateway at {s.public_url} refused a status callback signed with this "
            "TWILIO_AUTH_TOKEN: it runs with another TWILIO_AUTH_TOKEN or another PUBLIC_URL",
            "give the running gateway the same TWILIO_AUTH_TOKEN and PUBLIC_URL as here",
        )
    elif status >= 400:
        report.add("FAIL", "signed webhook", f"POST {url} answered {status}")
    else:
        report.add("OK", "signed webhook", "the gateway accepts webhooks signed with TWILIO_AUTH_TOKEN")


async def check_twilio(s: Settings, report: Report, named: list[str]) -> list[Number]:
    """The account, then the numbers; returns the numbers that point here."""
    sid, token = s.twilio_account_sid, s.twilio_auth_token
    if not sid or not token:
        report.add(
            "FAIL",
            "Twilio credentials",
            "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must both be set",
            "copy them from the Twilio console (Account info)",
        )
        report.add("SKIP", "numbers", "no Twilio credentials")
        return []
    if not (sid.startswith("AC") and len(sid) == 34):
        report.add(
            "FAIL",
            "Twilio credentials",
            f"TWILIO_ACCOUNT_SID={_mask(sid)} is not an Account SID (AC followed by 32 hex digits)",
            "use the Account SID from the Twilio console, not an API key (SK...)",
        )
        report.add("SKIP", "numbers", "no usable Twilio credentials")
        return []
    account = TwilioAccount(sid, token, s.twilio_api_base, region=s.twilio_region, edge=s.twilio_edge)
    try:
        if not await _check_account(s, account, report):
            report.add("SKIP", "numbers", "the Twilio credentials did not work")
            return []
        return await _check_numbers(s, account, report, named)
    finally:
        await account.close()


async def _check_account(s: Settings, account: TwilioAccount, report: Report) -> bool:
    where = account.host
    try:
        fetched = await account.fetch()
    except TwilioRestException as exc:
        fix = "copy the Account SID and Auth Token again from the Twilio console"
        if s.twilio_region:
            fix += f"; Twilio keeps credentials per region: use those of {s.twilio_region.upper()}"
        report.add(
            "FAIL",
            "Twilio credentials",
            f"{where} refused them (HTTP {exc.status}, code {exc.code})",
            fix if exc.status in (401, 403) else "",
        )
        return False
    except REST_ERRORS as exc:
        report.add("FAIL", "Twilio credentials", f"cannot reach {where}: {type(exc).__name__}: {exc}")
        return False
    status = str(fetched.status or "")
    if status != "active":
        report.add(
            "FAIL",
            "Twilio credentials",
            f"account {_mask(account.account_sid)} is {status or 'of unknown status'}",
            "reactivate the account in the Twilio console",
        )
        return False
    shown = f"account {_mask(account.account_sid)} ({fetched.friendly_name or 'no name'})"
    report.add("OK", "Twilio credentials", f"{shown} is active, via {where}")
    return True


async def _check_numbers(
    s: Settings, account: TwilioAccount, report: Report, named: list[str]
) -> list[Number]:
    wanted = list(dict.fromkeys([*named, *(k for k in s.agent_routes if k.startswith("+"))]))
    here: list[Number] = []
    try:
        if not wanted:
            return await _check_all_numbers(s, account, report)
        for phone in wanted:
            number = await account.find(phone)
            if number is None:
                report.add(
                    "FAIL",
                    f"number {phone}",
                    "not on this Twilio account",
                    "check the number (E.164, +country...) and TWILIO_ACCOUNT_SID",
                )
                continue
            wrong = problems(number, s.public_url)
            if wrong:
                report.add("FAIL", f"number {phone}", "; ".join(wrong), f"line-gateway setup-number {phone}")
            else:
                report.add("OK", f"number {phone}", "Voice URL and status callback point at this gateway")
                here.append(number)
    except REST_ERRORS as exc:
        report.add("FAIL", "numbers", f"listing them failed: {type(exc).__name__}: {exc}")
    return here


async def _check_all_numbers(s: Settings, account: TwilioAccount, report: Report) -> list[Number]:
    """No number named: an account often carries numbers for other apps, so those are listed,
    not failed; the check fails only when no number at all points here."""
    numbers = await account.all_numbers()
    here = [n for n in numbers if not problems(n, s.public_url)]
    for number in numbers:
        if number in here:
            report.add("OK", f"number {number.phone_number}", "points at this gateway")
        else:
            report.add("SKIP", f"number {number.phone_number}", "points elsewhere (not named, not checked)")
    if not here:
        report.add(
            "FAIL",
            "numbers",
            f"none of the account's {len(numbers)} numbers points at {s.public_url}/twilio/voice",
            "line-gateway setup-number +1..., or name the numbers to check: line-gateway doctor +1...",
        )
    return here


async def run(
    s: Settings,
    named: list[str],
    out: TextIO,
    agent_wait_s: float,
    resolve: Mapping[str, str] | None = None,
) -> int:
    registry = "Redis (REDIS_URL)" if s.redis_url else "embedded (one instance)"
    print(f"line-gateway doctor: PUBLIC_URL {s.public_url}, registry {registry}", file=out)
    report = Report(out)
    found = preflight.problems(s)
    for problem in found:
        report.add("FAIL" if problem.fatal else "WARN", "settings", problem.message)
    if not found:
        report.add("OK", "settings", "nothing missing")
    await check_public_url(s, report, resolve or {})
    here = await check_twilio(s, report, named)
    await check_agents(s, report, [n.agent for n in here if n.agent], agent_wait_s)
    await check_redis(s, report)
    failed = [c for c in report.checks if c.status == "FAIL"]
    print(file=out)
    if failed:
        print(f"{len(failed)} check(s) failed.", file=out)
        return 1
    print(f"All checks passed. Voice URL: {s.public_url}/twilio/voice, status callback: "
          f"{s.public_url}/twilio/status", file=out)  # fmt: skip
    return 0


def main(s: Settings, named: list[str], out: TextIO, agent_wait_s: float, resolve: Mapping[str, str]) -> int:
    return asyncio.run(run(s, named, out, agent_wait_s, resolve))
