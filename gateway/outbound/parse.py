"""Outbound requests: `POST /calls` and `POST /calls/batch` bodies, a batch's spec, its progress."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.control.parse import error
from gateway.destinations import is_e164, is_sip_uri, normalise_destination

MAX_BATCH_RECIPIENTS = 1000
MACHINE_DETECTION = {"true": "Enable", "enable": "Enable", "detectmessageend": "DetectMessageEnd"}


@dataclass
class Recipient:
    to: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchSpec:
    recipients: list[Recipient]
    from_: str
    agent: str
    metadata: dict[str, Any] = field(default_factory=dict)
    machine_detection: str = ""
    batch_id: str = field(default_factory=lambda: "BA" + secrets.token_hex(16))

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "batch_id": self.batch_id,
                "from": self.from_,
                "agent": self.agent,
                "metadata": self.metadata,
                "machine_detection": self.machine_detection,
                "recipients": [{"to": r.to, "metadata": r.metadata} for r in self.recipients],
                "created_at": time.time(),
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> BatchSpec:
        data = orjson.loads(raw)
        return cls(
            recipients=[Recipient(r["to"], r.get("metadata", {})) for r in data["recipients"]],
            from_=data["from"],
            agent=data["agent"],
            metadata=data.get("metadata", {}),
            machine_detection=data.get("machine_detection", ""),
            batch_id=data["batch_id"],
        )


def _destination(value: Any, field_name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise error(400, "bad_field", f"'{field_name}' must be an E.164 number or a sip: URI")
    target = normalise_destination(value)
    if not (is_sip_uri(target) if target.lower().startswith("sip") else is_e164(target)):
        raise error(422, "invalid_destination", f"{field_name} {target!r} is not E.164 or a sip: URI")
    return target


def _metadata(value: Any, field_name: str = "metadata") -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise error(400, "bad_field", f"'{field_name}' must be an object")
    return value


def _machine_detection(value: Any) -> str:
    if value in (None, False, ""):
        return ""
    key = str(value).lower()
    if key not in MACHINE_DETECTION:
        raise error(400, "bad_field", "'machine_detection' must be true, 'Enable' or 'DetectMessageEnd'")
    return MACHINE_DETECTION[key]


def parse_call(payload: Any, *, default_from: str, default_agent: str) -> dict[str, Any]:
    """`POST /calls` body -> arguments of Dialer.dial (400/422 with a clear message otherwise)."""
    if not isinstance(payload, dict):
        raise error(400, "malformed_json", "the body must be a JSON object")
    agent = payload.get("agent") or default_agent
    if not isinstance(agent, str) or not agent:
        raise error(400, "bad_field", "'agent' is required (or set CARTESIA_AGENT_ID)")
    return {
        "to": _destination(payload.get("to"), "to"),
        "from_": _destination(payload.get("from") or default_from, "from"),
        "agent": agent,
        "metadata": _metadata(payload.get("metadata")),
        "machine_detection": _machine_detection(payload.get("machine_detection")),
    }


def parse_batch(payload: Any, *, default_from: str, default_agent: str) -> BatchSpec:
    if not isinstance(payload, dict):
        raise error(400, "malformed_json", "the body must be a JSON object")
    recipients = payload.get("recipients")
    if not isinstance(recipients, list) or not 0 < len(recipients) <= MAX_BATCH_RECIPIENTS:
        raise error(400, "bad_field", f"'recipients' must be a list of 1 to {MAX_BATCH_RECIPIENTS}")
    base = parse_call(
        {**payload, "to": "+10000000000"}, default_from=default_from, default_agent=default_agent
    )
    parsed = []
    for i, item in enumerate(recipients):
        item = {"to": item} if isinstance(item, str) else item
        if not isinstance(item, dict):
            raise error(400, "bad_field", f"recipients[{i}] must be a number or an object with 'to'")
        parsed.append(
            Recipient(_destination(item.get("to"), f"recipients[{i}].to"), _metadata(item.get("metadata")))
        )
    return BatchSpec(
        recipients=parsed,
        from_=base["from_"],
        agent=base["agent"],
        metadata=base["metadata"],
        machine_detection=base["machine_detection"],
    )


def progress(spec: BatchSpec, states: dict[int, dict[str, Any]]) -> dict[str, Any]:
    counts = Counter(s.get("status", "pending") for s in states.values())
    outcomes = Counter(s.get("outcome", "") for s in states.values() if s.get("status") == "done")
    finished = counts["done"] + counts["failed"]
    return {
        "batch_id": spec.batch_id,
        "total": len(spec.recipients),
        "pending": counts["pending"],
        "in_progress": counts["claimed"] + counts["dialled"],
        "done": counts["done"],
        "failed": counts["failed"],
        "outcomes": dict(outcomes),
        "state": "finished" if finished == len(spec.recipients) else "running",
    }
