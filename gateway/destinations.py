"""Where a call can be sent (E.164 numbers and sip: URIs), and the fields agents name it in.

Pure. The control API, an agent's own `transfer_call` event and outbound calls all read
destinations through here, so the names accepted are one list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_E164 = re.compile(r"\+[1-9]\d{6,14}")
_PHONE_PUNCTUATION = re.compile(r"[\s\-().]")
# sip:user@host[:port][;param[=value]]... Strict on purpose: no second '@' can hide anywhere,
# so the host an allow-list pattern sees is the host Twilio dials.
SIP_URI = re.compile(
    r"(?P<scheme>sips?):(?:(?P<user>[A-Za-z0-9_.!~*'()&=+$,%\-]+)@)?"
    r"(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?"
    r"(?:;[A-Za-z0-9_.\-]+(?:=[A-Za-z0-9_.\-]+)?)*",
    re.I,
)

# The fields a destination is named in, first found wins: the control API's own names, the Line
# SDK's (cartesia-line 0.2.19: `target_phone_number` / `target_sip_uri` on AgentTransferCall,
# sent on as `transfer_destination: {"type": "phone" | "sip_uri", "value"}`), and older aliases.
DESTINATION_FIELDS = ("to", "target", "target_phone_number", "target_sip_uri", "phone_number", "sip_uri")
STRUCTURED_FIELD = "transfer_destination"
STRUCTURED_TYPES = frozenset({"phone", "sip_uri"})


def normalise_destination(value: str) -> str:
    value = value.strip()
    if value.lower().startswith(("sip:", "sips:")):
        return value
    return _PHONE_PUNCTUATION.sub("", value)


def is_e164(value: str) -> bool:
    return _E164.fullmatch(value) is not None


def is_sip_uri(value: str) -> bool:
    return SIP_URI.fullmatch(value) is not None


def read_destination(source: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """(the destination `source` names, or ""; the destination fields it has that cannot be
    read: not a string, or a `transfer_destination` of an unknown type or without a value)."""
    unreadable: list[str] = []
    for key in DESTINATION_FIELDS:
        value = source.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip(), ()
        if value is not None and value != "":
            unreadable.append(key)
    structured = source.get(STRUCTURED_FIELD)
    if structured is not None:
        value = structured.get("value") if isinstance(structured, Mapping) else None
        kind = structured.get("type") if isinstance(structured, Mapping) else None
        if isinstance(value, str) and value.strip() and isinstance(kind, str) and kind in STRUCTURED_TYPES:
            return value.strip(), ()
        unreadable.append(STRUCTURED_FIELD)
    return "", tuple(unreadable)
