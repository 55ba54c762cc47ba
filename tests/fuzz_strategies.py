"""Hypothesis strategies for the fuzz tests: frames and bodies that are junk, nearly right, or
right, for the Twilio and Calls API codecs and the control API.

Each field of a frame or body is drawn by `field`: the right kind of value, or text, non-ASCII
text, an unhashable JSON list or object, or any JSON, in about equal shares, since those are
what parsers trip on (a str method that takes more than its caller does, `x in frozenset`, a
codec that takes ASCII only). Shapes are per event or action, so that each gets its share of
the examples: a one_of over all of them spends most examples on the simplest.
"""

from __future__ import annotations

import base64
import itertools
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gateway.control.parse import ACTIONS, MAX_BODY_BYTES
from gateway.destinations import DESTINATION_FIELDS, STRUCTURED_FIELD

# Every property test: a fixed number of examples, the same ones on every run (CI is
# reproducible), no example database, no per-example deadline on two shared cores.
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ODD_STRINGS = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "null",
        "a$b=",
        "12w#",
        "+1 (555) 123-4567",
        "sip:desk@pbx.example.com;maddr=evil.example.com",
        "sips:a@[::1]:5061",
        "tel:5551234567",
    ]
)
TEXT = st.one_of(st.text(max_size=24), ODD_STRINGS)
NON_ASCII = st.text(st.characters(min_codepoint=128), min_size=1, max_size=8)
# What orjson reads and writes: 64-bit integers, finite floats, no lone surrogates.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)
UNHASHABLE = st.lists(SCALARS, max_size=2) | st.dictionaries(TEXT, SCALARS, max_size=2)
B64 = st.binary(max_size=320).map(lambda b: base64.b64encode(b).decode())
SID = st.text("ABCDEFabcdef0123456789", min_size=1, max_size=34)
# Digit strings int() takes, and those str.isdigit() takes but int() does not: superscript and
# circled digits, more digits than int() converts; and other Unicode digits, which both take.
NUMERIC = st.one_of(
    st.sampled_from(["²", "①", "⁵⁰", "9" * 5000]),
    st.from_regex(r"[0-9]{1,8}", fullmatch=True),
    st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=4),
)
DESTINATION = st.one_of(
    st.from_regex(r"\+[0-9]{6,16}", fullmatch=True),
    st.from_regex(r"sips?:[a-z0-9.]{1,8}@[a-z0-9.\-]{1,12}(;[a-z]{1,6}=[a-z0-9.]{1,8})?", fullmatch=True),
)


def field(right: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: `right`, or text, non-ASCII text, a list or object, or any JSON."""
    return st.one_of(right, TEXT, NON_ASCII, UNHASHABLE, JSON)


def shaped(
    event: str,
    key: str | None,
    fields: dict[str, st.SearchStrategy[Any]],
    required: dict[str, st.SearchStrategy[Any]] | None = None,
) -> st.SearchStrategy[Any]:
    """A frame of `event` with `required` and some of `fields` in the object under `key` (or at
    the top level when `key` is None); that object itself is sometimes anything."""
    inner = st.fixed_dictionaries(required or {}, optional=fields)
    if key is None:
        return st.fixed_dictionaries({"event": st.just(event), **(required or {})}, optional=fields)
    return st.fixed_dictionaries({"event": st.just(event), key: st.one_of(inner, inner, inner, JSON)})


def anything_like(keys: list[str], fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """A frame naming any event, with anything under one of `keys` and perhaps beside it."""
    return st.builds(
        lambda event, key, inner, extra: {**extra, "event": event, key: inner},
        field(TEXT),
        st.sampled_from(keys),
        st.dictionaries(st.sampled_from(fields) | TEXT, JSON, max_size=5) | JSON,
        st.dictionaries(st.sampled_from([*keys, *fields]) | TEXT, JSON, max_size=3),
    )


def as_text(frame: Any) -> str:
    return orjson.dumps(frame).decode()


def cut(text: str) -> st.SearchStrategy[str]:
    """`text` cut short anywhere: a frame truncated on the way."""
    return st.integers(min_value=0, max_value=max(0, len(text) - 1)).map(lambda n: text[:n])


def frames(like: st.SearchStrategy[Any]) -> st.SearchStrategy[str | bytes]:
    """Frames `like` a protocol's: whole (as text, or as bytes for a binary frame), or truncated."""
    text = like.map(as_text)
    return st.one_of(text, text, text.map(str.encode), text.flatmap(cut))


JUNK = st.one_of(st.binary(max_size=200), st.text(max_size=200), JSON.map(as_text))


_TWILIO_SHAPES: dict[str, st.SearchStrategy[Any]] = {
    "media": shaped(
        "media",
        "media",
        {
            "payload": field(B64),
            "track": field(st.sampled_from(["inbound", "inbound_track", "outbound"])),
            "timestamp": field(NUMERIC),
            "chunk": field(NUMERIC),
        },
    ),
    # The caller's track, with only the payload, and past the payload's check.
    "media_payload": shaped("media", "media", {}, {"payload": field(B64)}),
    "media_timestamp": shaped("media", "media", {}, {"payload": B64, "timestamp": field(NUMERIC)}),
    "mark": shaped("mark", "mark", {"name": field(st.just("m1"))}),
    "dtmf": shaped(
        "dtmf", "dtmf", {"digit": field(st.sampled_from(list("0123456789*#ABCDE"))), "track": JSON}
    ),
    "start": shaped(
        "start",
        "start",
        {
            "streamSid": field(SID),
            "callSid": field(SID),
            "customParameters": field(st.dictionaries(TEXT, JSON, max_size=3)),
        },
    ),
    # No `stop`: in a live call it ends the stream, and the fuzzed calls are meant to go on.
    "connected": shaped("connected", None, {"protocol": JSON, "version": JSON}),
    "anything": anything_like(["media", "mark", "dtmf", "start"], ["payload", "timestamp", "name", "digit"]),
}

TWILIO_FRAMES = {"junk": JUNK} | {name: frames(shape) for name, shape in _TWILIO_SHAPES.items()}

# Where an agent or a tool names a destination, each field right or wrong.
STRUCTURED = field(
    st.fixed_dictionaries(
        {}, optional={"type": field(st.sampled_from(["phone", "sip_uri"])), "value": field(DESTINATION)}
    )
)
DESTINATION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    **dict.fromkeys(DESTINATION_FIELDS, field(DESTINATION)),
    STRUCTURED_FIELD: STRUCTURED,
}
# Only the structured destination: what is read when no plain field names one.
ONLY_STRUCTURED = st.fixed_dictionaries(
    {"type": field(st.sampled_from(["phone", "sip_uri"])), "value": field(DESTINATION)}
)

_AGENT_SHAPES: dict[str, st.SearchStrategy[Any]] = {
    "media_output": shaped("media_output", "media", {"payload": field(B64)}),
    "dtmf": shaped("dtmf", None, {"dtmf": field(st.text("0123456789*#", max_size=70)), "stream_id": JSON}),
    "ack": shaped(
        "ack",
        None,
        {
            "stream_id": field(SID),
            "config": field(st.fixed_dictionaries({}, optional={"output_format": field(TEXT)})),
            "output_format": field(TEXT),
        },
    ),
    "custom": shaped("custom", None, {"metadata": JSON}),
    "clear": shaped("clear", None, {}),
    "transfer_call": shaped(
        "transfer_call",
        None,
        {**DESTINATION_VALUES, "transfer": field(st.fixed_dictionaries({}, optional=DESTINATION_VALUES))},
    ),
    "transfer_structured": shaped(
        "transfer_call",
        None,
        {"transfer": st.fixed_dictionaries({STRUCTURED_FIELD: ONLY_STRUCTURED})},
        {STRUCTURED_FIELD: ONLY_STRUCTURED},
    ),
    "anything": anything_like(["media", "config", "metadata", "transfer"], ["payload", *DESTINATION_FIELDS]),
}

AGENT_FRAMES = {"junk": JUNK} | {name: frames(shape) for name, shape in _AGENT_SHAPES.items()}

SIP_HEADERS = st.dictionaries(
    st.sampled_from(["X-Case", "User-to-User", "Remote-Party-ID", "Foo"]) | TEXT,
    field(st.integers() | st.floats(allow_nan=False, allow_infinity=False)),
    max_size=4,
)
CONTROL_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "reason": field(TEXT),
    "digits": field(st.from_regex(r"[0-9*#wWx]{0,70}", fullmatch=True)),
    **DESTINATION_VALUES,
    "summary": field(TEXT),
    "caller_id": field(DESTINATION),
    "headers": field(SIP_HEADERS),
    "mode": field(st.sampled_from(["blind", "warm", "sideways"])),
    "destination": JSON,
    "phone": JSON,
}


def _body(action: st.SearchStrategy[Any], **required: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    optional = {name: value for name, value in CONTROL_FIELDS.items() if name not in required}
    return st.fixed_dictionaries({"action": action, **required}, optional=optional).map(orjson.dumps)


CONTROL_SHAPES: dict[str, st.SearchStrategy[bytes]] = {
    "any_action": _body(field(st.sampled_from(sorted(ACTIONS)))),
    **{action: _body(st.just(action)) for action in ("end_call", "send_dtmf", "transfer")},
    "transfer_structured": _body(st.just("transfer"), **{STRUCTURED_FIELD: ONLY_STRUCTURED}),
    "junk": st.one_of(st.binary(max_size=200), JSON.map(orjson.dumps)),
    "truncated": _body(st.sampled_from(sorted(ACTIONS))).map(bytes.decode).flatmap(cut).map(str.encode),
    "oversized": st.just(b'{"action": "end_call", "reason": "' + b"x" * MAX_BODY_BYTES + b'"}'),
}


def draw(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """`count` examples of `strategy`, the same on every run: for tests that replay them
    against a running gateway, where hypothesis cannot drive an async test itself."""
    drawn: list[Any] = []

    @settings(FUZZ, max_examples=count, phases=[Phase.generate])
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    return drawn


def draw_each(shapes: dict[str, st.SearchStrategy[Any]], count: int) -> list[Any]:
    """`count` examples of each of `shapes` (fewer for one with fewer values), interleaved."""
    per_shape = [draw(shape, count) for shape in shapes.values()]
    return [example for row in itertools.zip_longest(*per_shape) for example in row if example is not None]
