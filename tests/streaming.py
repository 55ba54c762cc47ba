"""A call whose agent talks without end, to show that other traffic on the gateway does not
hold its audio up, and the raw-socket clients that make that traffic."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import orjson
import pytest

from gateway.sandbox.caller import SimulatedCall
from gateway.sandbox.harness import Sandbox
from gateway.sandbox.script import CallScript
from gateway.sandbox.servers import tune_gc


@pytest.fixture
def server_gc() -> Iterator[None]:
    """The collector tuned as `line-gateway serve` tunes it (start-up's objects frozen, young
    objects collected in larger batches), then as it was: without it, a full collection over
    everything the test process has loaded (hypothesis, numpy, the sandbox) stalls every call
    in it for a few hundred milliseconds, which the gateway itself never does."""
    threshold = gc.get_threshold()
    tune_gc()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@contextlib.asynccontextmanager
async def flowing_call(box: Sandbox) -> AsyncIterator[SimulatedCall]:
    """A live call hearing its agent (start the sandbox with AgentBehaviour(continuous=True))."""
    call = await box.connect_call()
    runner = asyncio.create_task(call.run(CallScript(max_s=300)))
    try:
        async with asyncio.timeout(10):
            while not call.media_arrivals:  # noqa: ASYNC110 (state the caller's reader owns)
                await asyncio.sleep(0.01)
        yield call
    finally:
        await call.hang_up()
        await runner


def longest_gap(call: SimulatedCall, since: float, until: float) -> float:
    """The longest stretch within [since, until] (monotonic) in which no audio reached `call`."""
    times = [since, *(at for at, _ in call.media_arrivals if since < at < until), until]
    return max(b - a for a, b in itertools.pairwise(times))


async def control_url_of(box: Sandbox, call: SimulatedCall) -> str:
    """The control URL the agent got in the call's metadata, as a tool would use it."""
    async with asyncio.timeout(10):
        while True:
            for agent_call in box.agent.calls:
                if agent_call.metadata.get("call_sid") == call.call_sid:
                    return agent_call.metadata["control_url"]
            await asyncio.sleep(0.01)


async def trickle(url: str, head: bytes, rest: bytes, *, every_s: float = 1.0, within_s: float = 30.0):
    """Send `head` to `url`'s host at once, then `rest` a byte every `every_s`, until the server
    closes the connection. Returns (seconds from connecting to the close, everything it sent)."""
    parts = urlsplit(url)
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)

    async def dribble() -> None:
        with contextlib.suppress(OSError):
            writer.write(head)
            for byte in rest:
                await writer.drain()
                await asyncio.sleep(every_s)
                writer.write(bytes([byte]))

    sender = asyncio.create_task(dribble())
    try:
        async with asyncio.timeout(within_s):
            answer = await reader.read()  # to the end: the server closed it
        return time.monotonic() - started, answer
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def status_and_json(answer: bytes) -> tuple[int, dict]:
    """The status and JSON body of a raw HTTP/1.1 response (whole, with a Content-Length)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, orjson.loads(body)
