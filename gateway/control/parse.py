"""The control API's requests: a body becomes an action for the call, or a clear refusal.

When several errors apply, the first in this order wins: 404, 429, 413, 400, 422, 403, 409
(then 503 from routing); docs/ARCHITECTURE.md has the whole path of a control POST.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.call.actions import ACTION_NAMES, Action, ActionRefused, EndCall, SendDtmf, TransferPlan
from gateway.carriers.twilio.twiml import sip_headers_query
from gateway.control.policy import TransferPolicy
from gateway.destinations import (
    DESTINATION_FIELDS,
    STRUCTURED_FIELD,
    is_e164,
    is_sip_uri,
    normalise_destination,
    read_destination,
)
from gateway.registry.base import CallRecord

MAX_BODY_BYTES = 16 * 1024
RATE_LIMIT = 20  # requests per token ...
RATE_WINDOW_S = 10.0  # ... in any window this long
MAX_DTMF_DIGITS = 64
MAX_SUMMARY_CHARS = 2000
# Twilio refuses a SIP URI whose headers part, URL-encoded as sent, is over 1 KB (error 21227).
MAX_SIP_HEADER_BYTES = 1024
MAX_DESTINATION_CHARS = 256

ACTIONS = {
    "end_call": "end_call",
    "hangup": "end_call",
    "call_transfer": "call_transfer",
    "transfer_call": "call_transfer",
    "transfer": "call_transfer",
    "send_dtmf": "send_dtmf",
}
KNOWN_ACTIONS = ", ".join(sorted(ACTIONS))

# Twilio passes X- headers and these standard ones on a SIP leg (its error 13252's page);
# User-to-User is how contact centres carry a call's context on a handoff.
_SIP_HEADER_NAME = re.compile(
    r"X-[A-Za-z0-9\-]{1,64}|User-to-User|Remote-Party-ID|P-Preferred-Identity|P-Called-Party-ID", re.I
)
_DTMF = re.compile(r"[0-9*#wW]+")
# Every field a transfer body may carry; another whose name looks like a destination is one the
# agent meant as one, and is refused rather than ignored.
TRANSFER_FIELDS = frozenset(
    {"action", *DESTINATION_FIELDS, STRUCTURED_FIELD, "summary", "caller_id", "headers", "mode"}
)
_DESTINATION_LIKE = re.compile(r"destination|number|phone|sip|uri|target|dial|transfer_to", re.I)


def error(status: int, code: str, message: str) -> ActionRefused:
    return ActionRefused(status, code, message)


def error_body(exc: ActionRefused) -> dict[str, Any]:
    return {"ok": False, "error": {"code": exc.code, "message": exc.message}}


def parse_body(body: bytes) -> dict[str, Any]:
    """The request's JSON object and its canonical action name (400 otherwise)."""
    if len(body) > MAX_BODY_BYTES:
        raise error(413, "body_too_large", f"the body is over {MAX_BODY_BYTES // 1024} KiB")
    try:
        payload = orjson.loads(body) if body.strip() else None
    except orjson.JSONDecodeError:
        raise error(400, "malformed_json", "the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise error(400, "malformed_json", "the body must be a JSON object")
    action = payload.get("action")
    if not isinstance(action, str) or action not in ACTIONS:  # a list or object is unhashable
        raise error(
            400,
            "unknown_action",
            f"unknown action {action!r}; known actions: {KNOWN_ACTIONS}",
        )
    return payload


def _optional_str(payload: Mapping[str, Any], key: str, limit: int = 256) -> str:
    value = payload.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise error(400, "bad_field", f"'{key}' must be a string of at most {limit} characters")
    return value.strip()


def build_action(record: CallRecord, payload: Mapping[str, Any], policy: TransferPolicy) -> Action:
    """Turn a parsed request into an action for the call, checking fields (400, 422, 403)."""
    action = ACTIONS[payload["action"]]
    if action == "end_call":
        return EndCall(_optional_str(payload, "reason", MAX_SUMMARY_CHARS))
    if action == "send_dtmf":
        digits = payload.get("digits")
        if not isinstance(digits, str) or not _DTMF.fullmatch(digits) or len(digits) > MAX_DTMF_DIGITS:
            raise error(
                400,
                "bad_field",
                f"'digits' must be 1 to {MAX_DTMF_DIGITS} of 0-9 * # w",
            )
        return SendDtmf(digits.lower())
    return plan_transfer(record, payload, policy)


def plan_transfer(record: CallRecord, payload: Mapping[str, Any], policy: TransferPolicy) -> TransferPlan:
    # 400: field shapes
    mode = _optional_str(payload, "mode") or "blind"
    if mode not in ("blind", "warm"):
        raise error(400, "bad_field", "'mode' must be 'blind' or 'warm'")
    raw_target, unreadable = read_destination(payload)
    if len(raw_target) > MAX_DESTINATION_CHARS:
        raise error(400, "bad_field", f"the destination is over {MAX_DESTINATION_CHARS} characters")
    if not raw_target and unreadable and unreadable[0] != STRUCTURED_FIELD:
        raise error(400, "bad_field", f"'{unreadable[0]}' must be an E.164 number or a sip: URI, as a string")
    summary = _optional_str(payload, "summary", MAX_SUMMARY_CHARS)
    caller_id = normalise_destination(_optional_str(payload, "caller_id"))
    headers = payload.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int | float) for k, v in headers.items()
    ):
        raise error(400, "bad_field", "'headers' must be an object of SIP header names to values")
    bad = [k for k in headers if not _SIP_HEADER_NAME.fullmatch(k)]
    if bad:
        raise error(
            400,
            "bad_field",
            f"SIP headers must be X-... or User-to-User, Remote-Party-ID, P-Preferred-Identity, "
            f"P-Called-Party-ID: {', '.join(bad[:5])}",
        )
    headers = {k: str(v) for k, v in headers.items()}
    if len(sip_headers_query(headers)) > MAX_SIP_HEADER_BYTES:
        raise error(400, "bad_field", f"SIP headers must be at most {MAX_SIP_HEADER_BYTES} bytes URL-encoded")
    # 422: values. A destination the body names but the gateway cannot read is refused, never
    # replaced by TRANSFER_TO, which is only for a body that names none.
    if not raw_target:
        unknown = [k for k in payload if k not in TRANSFER_FIELDS and _DESTINATION_LIKE.search(k)]
        if unreadable or unknown:
            field = (unreadable or tuple(unknown))[0]
            raise error(
                422,
                "invalid_destination",
                f"cannot read a destination in '{field}': name it in 'to' (an E.164 number or a "
                'sip: URI) or in \'transfer_destination\': {"type": "phone" or "sip_uri", "value"}',
            )
    target = normalise_destination(raw_target or policy.default_to)
    if not target:
        raise error(400, "bad_field", "no destination: give 'to', or set TRANSFER_TO")
    target_is_sip = target.lower().startswith(("sip:", "sips:"))
    if not (is_sip_uri(target) if target_is_sip else is_e164(target)):
        raise error(
            422,
            "invalid_destination",
            f"destination {target!r} is not an E.164 number (+15551234567) or a sip: URI",
        )
    if headers and not target_is_sip:
        raise error(422, "invalid_destination", "SIP headers need a sip: destination")
    caller_id = caller_id or normalise_destination(policy.caller_id)
    if caller_id and not (is_e164(caller_id) or is_sip_uri(caller_id)):
        raise error(422, "invalid_caller_id", f"caller_id {caller_id!r} is not E.164 or a sip: URI")
    if not caller_id:
        # Our own number: the one called on an inbound call, the one we called from on an
        # outbound one (Twilio refuses the customer's own number as the caller ID).
        ours = normalise_destination(record.from_ if record.direction.startswith("outbound") else record.to)
        if is_e164(ours) or target_is_sip:
            caller_id = ours
        else:
            raise error(
                422,
                "caller_id_required",
                "this call came in over SIP; transferring it to a phone number needs "
                "'caller_id' or TRANSFER_CALLER_ID",
            )
    # 403: policy
    if not policy.allows(target):
        raise error(403, "destination_not_allowed", "that destination is not in TRANSFER_ALLOW")
    return TransferPlan(
        target=target,
        caller_id=caller_id,
        headers=headers,
        summary=summary,
        mode=mode,
    )


def ok_body(action: Action, call_sid: str) -> dict[str, Any]:
    return {"ok": True, "action": ACTION_NAMES[type(action)], "call_sid": call_sid}
