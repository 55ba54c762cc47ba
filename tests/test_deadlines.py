"""Read deadlines: a client that trickles a request's body or headers a byte a second is cut off
within the deadline, on both of uvicorn's HTTP implementations (httptools, which `serve` uses,
and h11), while a call on the same instance keeps hearing its agent without a gap.

The deadlines are module constants, shortened here so that the tests take seconds."""

from __future__ import annotations

import asyncio
import time

import pytest
from streaming import (
    control_url_of,
    flowing_call,
    longest_gap,
    server_gc,  # noqa: F401 (a fixture, used by name)
    status_and_json,
    trickle,
)

from gateway import http_deadlines
from gateway.http import bodies
from gateway.sandbox.agent import AgentBehaviour
from gateway.sandbox.harness import sandbox
from gateway.sandbox.servers import serve

# Half-way between two trickled bytes (they go a second apart): a server that closes just as a
# byte comes in, unread, makes the kernel send a reset, which can lose the 408 on its way.
BODY_S = 2.5
HEADERS_S = 1.5
SLACK_S = 1.0  # how late past its deadline a cut may come on two busy cores
MAX_AUDIO_GAP_S = 0.2
API_KEY = "gw_test_key"
FORM = b"CallSid=CA" + b"1" * 32 + b"&AccountSid=AC" + b"2" * 32 + b"&From=%2B15551230001"


# The collector as the server runs it, so that its pauses in this test process do not count
# as the gateway's (see streaming.server_gc).
pytestmark = pytest.mark.usefixtures("server_gc")


@pytest.fixture
def short_deadlines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bodies, "BODY_READ_TIMEOUT_S", BODY_S)
    monkeypatch.setattr(http_deadlines, "HEADER_TIMEOUT_S", HEADERS_S)


def post_head(url: str, length: int, content_type: str, *extra: str) -> bytes:
    path = url.split("/", 3)[3]
    lines = [
        f"POST /{path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: {content_type}",
        f"Content-Length: {length}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_bodies_trickled_a_byte_a_second_get_408_at_the_deadline(short_deadlines: None) -> None:
    """20 webhook bodies (10 per HTTP implementation), and a control and an outbound body: each
    answered 408 `body_timeout` in the API's error shape and closed at the deadline."""
    body = b'{"action": "end_call"}'
    async with (
        sandbox(AgentBehaviour(continuous=True), gateway_api_key=API_KEY) as box,
        serve(box.app, lifespan="off", http="h11") as h11_url,
        flowing_call(box) as call,
    ):
        control = await control_url_of(box, call)
        form_head = post_head(box.url + "/twilio/voice", len(FORM), "application/x-www-form-urlencoded")
        json_head = post_head(control, len(body), "application/json")
        calls_head = post_head(
            box.url + "/calls", len(body), "application/json", f"Authorization: Bearer {API_KEY}"
        )
        since = time.monotonic()
        results = await asyncio.gather(
            *(trickle(origin + "/twilio/voice", form_head, FORM) for origin in (box.url, h11_url) * 10),
            trickle(control, json_head, body),
            trickle(box.url + "/calls", calls_head, body),
        )
        gap = longest_gap(call, since, time.monotonic())
        assert not call.ended.is_set()
    for took, answer in results:
        status, error = status_and_json(answer)
        assert (status, error["ok"], error["error"]["code"]) == (408, False, "body_timeout"), answer
        assert BODY_S - 0.1 <= took < BODY_S + SLACK_S, took
    assert gap < MAX_AUDIO_GAP_S, f"the call heard nothing for {gap * 1000:.0f} ms"


async def test_headers_trickled_a_byte_a_second_get_408_at_the_deadline(short_deadlines: None) -> None:
    """Per HTTP implementation: 10 connections trickling their headers get a 408 and are closed
    at the deadline; one that says nothing is closed without a word; and on a kept-alive
    connection the next request's headers get the same deadline from their first byte. The
    call's media socket, upgraded from HTTP, outlives the deadline."""
    slow = b"POST /twilio/voice HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    healthz = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    async with (
        sandbox(AgentBehaviour(continuous=True)) as box,
        serve(box.app, lifespan="off", http="h11") as h11_url,
        flowing_call(box) as call,
    ):
        origins = (box.url, h11_url)
        since = time.monotonic()
        trickled, silent, kept_alive = await asyncio.gather(
            asyncio.gather(*(trickle(o, slow, b"X-Slow: " + b"a" * 60) for o in origins * 10)),
            asyncio.gather(*(trickle(o, b"", b"") for o in origins)),
            asyncio.gather(*(trickle(o, healthz, slow) for o in origins)),
        )
        gap = longest_gap(call, since, time.monotonic())
        assert not call.ended.is_set()
    for took, answer in trickled:
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert HEADERS_S - 0.1 <= took < HEADERS_S + SLACK_S, took
    for took, answer in silent:
        assert answer == b""
        assert HEADERS_S - 0.1 <= took < HEADERS_S + SLACK_S, took
    for took, answer in kept_alive:
        first, _, second = answer.partition(b"HTTP/1.1 408 ")
        assert first.startswith(b"HTTP/1.1 200 ") and second, answer
        # The next request's first byte went a second after the first answer.
        assert 1.0 + HEADERS_S - 0.1 <= took < 1.0 + HEADERS_S + SLACK_S, took
    assert gap < MAX_AUDIO_GAP_S, f"the call heard nothing for {gap * 1000:.0f} ms"
