"""Call events against a real local receiver: signing, retries, bounds, and shutdown."""

import asyncio
import datetime
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.call_events import (
    EVENT_ID_HEADER,
    RETRY_AFTER_CAP_S,
    SIGNATURE_HEADER,
    WORKER_TASK_NAME,
    CallEvents,
    retry_after_s,
    sign,
    verify,
)
from gateway.sandbox.servers import serve

SECRET = "whsec-test-0123456789"
URL_TOKEN = "qtok-5f1e2d3c4b5a"


class Receiver:
    """A webhook receiver that records every request and fails or hangs on demand."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes, float]] = []
        self.fail: list[tuple[int, dict[str, str]]] = []  # responses for the next requests
        self.hang = False
        self.release = asyncio.Event()  # set at teardown so hanging handlers end
        self.url = ""
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        self.requests.append((dict(request.headers), await request.body(), time.monotonic()))
        if self.hang:
            await self.release.wait()
        if self.fail:
            status, headers = self.fail.pop(0)
            return Response(status_code=status, headers=headers)
        return Response(status_code=204)

    def bodies(self) -> list[dict]:
        return [orjson.loads(body) for _, body, _ in self.requests]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    async with serve(recv.app) as base_url:
        recv.url = f"{base_url}/hook?token={URL_TOKEN}"
        yield recv
        recv.release.set()


@pytest.fixture
async def make_events(receiver: Receiver) -> AsyncIterator[Callable[..., CallEvents]]:
    """Started CallEvents aimed at the receiver; closed (without draining) after the test."""
    made: list[CallEvents] = []

    def make(**kwargs) -> CallEvents:
        events = CallEvents(receiver.url, SECRET, instance_id="gw-1", **kwargs)
        made.append(events)
        return events

    yield make
    for events in made:
        await events.close(drain_s=0)


async def until(predicate: Callable[[], bool], timeout_s: float = 3.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def worker_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name() == WORKER_TASK_NAME]


async def test_event_arrives_signed_over_its_exact_body_with_its_fields(receiver, make_events):
    events = make_events()
    await events.start()
    when = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)
    before = time.time()
    events.emit("call.started", "CA123", direction="inbound", at=when, digits={1: "x"})
    await until(lambda: events.delivered == 1)

    headers, body, _ = receiver.requests[0]
    signature = headers[SIGNATURE_HEADER.lower()]
    # Computed here, not through sign(), so a wrong message or key in sign() fails this test.
    assert signature == "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert verify(SECRET, body, signature)
    assert not verify(SECRET, body.replace(b"CA123", b"CA124"), signature)
    assert not verify(SECRET + "x", body, signature)
    assert not verify(SECRET, body, None)
    assert not verify(SECRET, body, "sha256=" + "0" * 64)

    event = orjson.loads(body)
    assert headers["content-type"] == "application/json"
    assert headers["x-gateway-event"] == "call.started"
    assert headers[EVENT_ID_HEADER.lower()] == event["id"]
    assert len(event["id"]) == 32 and int(event["id"], 16) >= 0
    assert (event["type"], event["call_sid"], event["instance"]) == ("call.started", "CA123", "gw-1")
    assert before <= event["created_at"] <= time.time()
    assert event["data"] == {"direction": "inbound", "at": "2024-05-01T00:00:00+00:00", "digits": {"1": "x"}}
    assert (events.failed, events.dropped) == (0, 0)


async def test_sign_and_verify_agree_with_hmac_sha256():
    assert sign("k", b"{}") == "sha256=" + hmac.new(b"k", b"{}", hashlib.sha256).hexdigest()
    assert verify("k", b"{}", sign("k", b"{}"))


async def test_unknown_event_type_is_a_programming_error_even_when_disabled(make_events):
    with pytest.raises(ValueError):
        make_events().emit("call.exploded", "CA1")
    with pytest.raises(ValueError):
        CallEvents("", "").emit("call.exploded", "CA1")


async def test_unserialisable_event_is_dropped_without_raising(receiver, make_events):
    events = make_events()
    events.emit("dtmf", "CA1", n=2**70)  # orjson refuses ints past 64 bits
    assert (events.dropped, events._queue.qsize()) == (1, 0)


async def test_500s_are_retried_with_the_same_event_id_until_delivered(receiver, make_events):
    receiver.fail = [(500, {}), (503, {})]
    events = make_events()
    await events.start()
    events.emit("call.ended", "CA9", reason="caller_hangup")
    await until(lambda: events.delivered == 1)

    assert len(receiver.requests) == 3
    ids = {h[EVENT_ID_HEADER.lower()] for h, _, _ in receiver.requests}
    assert len(ids) == 1 and len({body for _, body, _ in receiver.requests}) == 1
    assert (events.delivered, events.failed) == (1, 0)


async def test_429_retry_after_is_honoured_instead_of_the_backoff(receiver, make_events):
    receiver.fail = [(429, {"Retry-After": "0"})]
    events = make_events()
    await events.start()
    events.emit("dtmf", "CA1", digit="5")
    await until(lambda: events.delivered == 1)
    (_, _, first), (_, _, second) = receiver.requests
    assert second - first < 0.4  # the first backoff would be 0.5 s


def test_retry_after_is_capped_and_only_numeric():
    assert retry_after_s("60", 0.5) == RETRY_AFTER_CAP_S
    assert retry_after_s("1.5", 0.5) == 1.5
    for odd in (None, "Wed, 21 Oct 2015 07:28:00 GMT", "-1", "nan", "inf"):
        assert retry_after_s(odd, 0.5) == 0.5


async def test_permanent_400_is_not_retried_and_later_events_still_go(receiver, make_events):
    receiver.fail = [(400, {})]
    events = make_events()
    await events.start()
    events.emit("agent.custom", "CA1", payload="bad")
    events.emit("agent.custom", "CA1", payload="good")
    await until(lambda: events.delivered == 1)
    # One worker, in order: a retry of the first would have arrived before the second.
    assert [b["data"]["payload"] for b in receiver.bodies()] == ["bad", "good"]
    assert events.failed == 1


async def test_a_hanging_receiver_times_out_each_attempt_then_gives_up(receiver, make_events):
    receiver.hang = True
    events = make_events(timeout_s=0.2, max_attempts=2)
    await events.start()
    events.emit("transfer.failed", "CA1")
    await until(lambda: events.failed == 1)
    assert (len(receiver.requests), events.delivered) == (2, 0)


async def test_emit_never_blocks_and_the_queue_bound_holds_with_a_hanging_receiver(
    receiver, make_events, captured_logs
):
    receiver.hang = True
    events = make_events(queue_size=10)
    await events.start()
    logged = len(captured_logs.getvalue())

    started = time.perf_counter()
    for n in range(100):
        events.emit("dtmf", "CA1", n=n)
    assert time.perf_counter() - started < 0.05
    assert (events._queue.qsize(), events.dropped) == (10, 90)

    for n in range(100, 5000):
        events.emit("dtmf", "CA1", n=n)
    assert (events._queue.qsize(), events.dropped) == (10, 4990)

    await until(lambda: len(receiver.requests) == 1)
    assert receiver.bodies()[0]["data"]["n"] == 4990  # the oldest were dropped, the newest kept
    assert captured_logs.getvalue()[logged:].count('"call_events_dropped"') == 1  # rate-limited


async def test_close_returns_within_drain_s_with_a_hanging_receiver_and_leaves_no_task(receiver, make_events):
    receiver.hang = True
    events = make_events()
    await events.start()
    assert len(worker_tasks()) == 1
    for n in range(5):
        events.emit("call.ended", f"CA{n}")
    await until(lambda: len(receiver.requests) == 1)

    started = time.monotonic()
    await events.close(drain_s=0.3)
    assert time.monotonic() - started < 0.3 + 0.3
    assert worker_tasks() == []
    assert events._session is not None and events._session.closed
    assert (events.delivered, events.dropped) == (0, 4)  # the one in flight was cut, not counted

    await events.close()  # idempotent
    events.emit("call.ended", "CA9")  # after close: dropped, no error
    assert events.dropped == 5


async def test_close_drains_queued_events_first(receiver, make_events):
    events = make_events()
    await events.start()
    for n in range(5):
        events.emit("call.ended", f"CA{n}")
    await events.close(drain_s=2)
    assert events.delivered == 5
    assert [b["call_sid"] for b in receiver.bodies()] == [f"CA{n}" for n in range(5)]


async def test_disabled_without_url_is_a_no_op():
    events = CallEvents("", "")
    assert not events.enabled
    await events.start()
    assert worker_tasks() == []
    events.emit("call.started", "CA1", anything=object())
    assert (events._queue.qsize(), events.delivered, events.failed, events.dropped) == (0, 0, 0, 0)
    await events.close()


def test_misconfiguration_is_refused_at_start_up():
    with pytest.raises(ValueError):
        CallEvents("https://hooks.example.com/x", "")
    with pytest.raises(ValueError):
        CallEvents("hooks.example.com/x", SECRET)


async def test_logs_name_the_host_but_never_the_url_token_secret_or_signature(
    receiver, make_events, captured_logs
):
    receiver.fail = [(400, {}), (500, {})]
    events = make_events()
    await events.start()
    logged = len(captured_logs.getvalue())
    events.emit("call.started", "CA1")
    events.emit("call.started", "CA2")
    await until(lambda: events.delivered == 1)
    await events.close()

    lines = captured_logs.getvalue()[logged:]
    assert '"call_event_rejected"' in lines and '"call_event_retry"' in lines
    assert '"host": "127.0.0.1"' in lines
    signatures = [h[SIGNATURE_HEADER.lower()] for h, _, _ in receiver.requests]
    for leak in (URL_TOKEN, SECRET, "/hook", *signatures, *(s.removeprefix("sha256=") for s in signatures)):
        assert leak not in lines
