"""What `serve` says at start about settings that make calls fail, and `doctor` repeats (pure).

A problem is fatal when the gateway would refuse every call with it (`serve` then stops with
exit 2 unless `--allow-incomplete`); the others limit what it can do and are warnings.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.settings import Settings

CARTESIA_HOST_SUFFIX = "cartesia.ai"


@dataclass(frozen=True)
class Problem:
    fatal: bool  # every call would be refused
    message: str  # what is wrong, then the fix


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def problems(s: Settings) -> list[Problem]:
    found: list[Problem] = []
    if s.twilio_validate_signatures and not s.twilio_auth_token:
        found.append(
            Problem(
                True,
                "TWILIO_AUTH_TOKEN is not set, so every Twilio webhook fails its signature check "
                "(403): set TWILIO_AUTH_TOKEN (Twilio console, Account info); "
                "TWILIO_VALIDATE_SIGNATURES=false turns the check off, for local development only",
            )
        )
    cartesia_host = urlsplit(s.cartesia_url).hostname or ""
    if not s.cartesia_api_key:
        if cartesia_host == CARTESIA_HOST_SUFFIX or cartesia_host.endswith("." + CARTESIA_HOST_SUFFIX):
            found.append(
                Problem(
                    True,
                    "CARTESIA_API_KEY is not set, so Cartesia refuses every agent socket: "
                    "set CARTESIA_API_KEY (a Cartesia API key, sk_car_...)",
                )
            )
        else:
            found.append(
                Problem(
                    False,
                    f"CARTESIA_API_KEY is not set: the agent at CARTESIA_URL={s.cartesia_url} "
                    "must take sockets without a key",
                )
            )
    if not s.cartesia_agent_id and not s.agent_routes:
        found.append(
            Problem(
                False,
                "no agent is set (CARTESIA_AGENT_ID, AGENT_ROUTES): only calls whose Voice URL "
                "names ?agent=<id> are answered; set CARTESIA_AGENT_ID to your Line agent's id",
            )
        )
    if is_loopback(s.public_url):
        found.append(
            Problem(
                False,
                f"PUBLIC_URL is {s.public_url}: stream URLs and signature checks use it, and Twilio "
                "cannot reach it; set PUBLIC_URL to the HTTPS origin Twilio calls "
                "(https://gw.example.com)",
            )
        )
    elif not s.public_url.startswith("https://"):
        found.append(
            Problem(
                False,
                f"PUBLIC_URL is {s.public_url}: Twilio needs an https:// webhook and a wss:// media "
                "stream; terminate TLS in front of the gateway and set PUBLIC_URL=https://...",
            )
        )
    if not s.twilio_validate_signatures:
        found.append(
            Problem(
                False,
                "TWILIO_VALIDATE_SIGNATURES=false: anyone who finds this gateway can place calls "
                "on your agent; set it to true (the default) in production",
            )
        )
    if not s.twilio_account_sid:
        found.append(
            Problem(
                False,
                "TWILIO_ACCOUNT_SID is not set: hang-ups, transfers and outbound calls through "
                "Twilio's REST API will fail; set TWILIO_ACCOUNT_SID (AC...)",
            )
        )
    return found
