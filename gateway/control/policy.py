"""Destinations an agent may name, and where TRANSFER_ALLOW lets it send a call."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

_E164 = re.compile(r"\+[1-9]\d{6,14}")
_PHONE_PUNCTUATION = re.compile(r"[\s\-().]")
# sip:user@host[:port][;param[=value]]... Strict on purpose: no second '@' can hide anywhere,
# so the host an allow-list pattern sees is the host Twilio dials.
_SIP_URI = re.compile(
    r"(?P<scheme>sips?):(?:(?P<user>[A-Za-z0-9_.!~*'()&=+$,%\-]+)@)?"
    r"(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?"
    r"(?:;[A-Za-z0-9_.\-]+(?:=[A-Za-z0-9_.\-]+)?)*",
    re.I,
)


@dataclass(frozen=True, slots=True)
class TransferPolicy:
    """Where an agent may send a call: TRANSFER_TO, TRANSFER_ALLOW, TRANSFER_CALLER_ID."""

    default_to: str = ""
    allow: tuple[str, ...] = ()
    caller_id: str = ""

    def allows(self, target: str) -> bool:
        if self.default_to and target == normalise_destination(self.default_to):
            return True
        # SIP targets are matched as scheme:user@host, parameters and port left out.
        match = _SIP_URI.fullmatch(target)
        if target.lower().startswith("sip") and match is None:
            return False
        if match is not None:
            user = f"{match['user']}@" if match["user"] else ""
            target = f"{match['scheme'].lower()}:{user}{match['host'].lower()}"
        return any(fnmatch.fnmatchcase(target, pattern) for pattern in self.allow)


def normalise_destination(value: str) -> str:
    value = value.strip()
    if value.lower().startswith(("sip:", "sips:")):
        return value
    return _PHONE_PUNCTUATION.sub("", value)


def is_e164(value: str) -> bool:
    return _E164.fullmatch(value) is not None


def is_sip_uri(value: str) -> bool:
    return _SIP_URI.fullmatch(value) is not None
