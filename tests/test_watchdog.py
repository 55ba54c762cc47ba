"""The session's watchdog: a leg whose peer stopped reading, or an agent that stopped
answering pings, ends the call within its bound; pings keep a silent agent socket alive.

A peer that stops reading only blocks a send once megabytes of loopback buffers have filled,
which takes minutes at 8 KB/s of audio, so these tests drive `Session` through leg doubles that
implement its `CarrierLeg` / `AgentLeg` interfaces and whose sends never complete. The silent
carrier is tested over real sockets in test_call.py.
"""

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.call.session import Session
from gateway.call.states import State
from gateway.events import AgentAudio, CallerAudio, StreamStopped
from gateway.liveness import Liveness
from gateway.registry.base import CallRecord
from gateway.registry.memory import MemoryRegistry
from gateway.sandbox.harness import sandbox
from gateway.sandbox.script import CallScript
from gateway.sandbox.servers import free_port

SILENCE_B64 = "/" * 216  # 160 bytes of mu-law silence (0xFF), base64


class Leg:
    """Frames at 20 ms from its peer; its sends hang for good when `stuck`."""

    silent_after_s: float | None = 10.0
    stalled_after_s = 0.3

    def __init__(self, frame: object, *, stuck: bool) -> None:
        self.liveness = Liveness()
        self.stream_id = "stream"
        self.output_format = ""
        self.sent = 0
        self.keepalives = 0
        self.aborted = False
        self.closed_with: int | None = None
        self._frame, self._stuck = frame, stuck
        self._gone = asyncio.Event()
        self._hung_up = False

    async def events(self) -> AsyncIterator[object]:
        while not self._gone.is_set():
            await asyncio.sleep(0.02)
            self.liveness.received()
            yield self._frame
        if self._hung_up:
            yield StreamStopped()

    async def hang_up(self) -> None:
        """The caller hangs up: Twilio's `stop`, then the stream ends."""
        self._hung_up = True
        self._gone.set()

    async def _send(self) -> None:
        self.liveness.send_waiting_since = time.monotonic()
        try:
            if self._stuck:  # until the connection is dropped, as a real socket's send
                await self._gone.wait()
            self.sent += 1
        finally:
            self.liveness.send_waiting_since = 0.0

    async def send_audio(self, payload_b64: str) -> None:
        await self._send()

    async def send_mark(self, name: str) -> None:
        await self._send()

    async def send_clear(self) -> None:
        await self._send()

    async def send_dtmf(self, digit: str) -> None:
        await self._send()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = code
        self._gone.set()

    async def keepalive(self, now: float) -> bool:
        self.keepalives += 1
        return True

    def abort(self) -> None:
        self.aborted = True
        self._gone.set()

    @property
    def close_code(self) -> int | None:
        return self.closed_with

    @property
    def close_reason(self) -> str | None:
        return ""


class Control:
    def __init__(self) -> None:
        self.hangups: list[str] = []

    async def hangup(self, call_sid: str) -> bool:
        self.hangups.append(call_sid)
        return True

    async def transfer(self, call_sid: str, plan: object) -> None:
        raise AssertionError("no transfer in these tests")

    async def fall_back(self, call_sid: str, fallback: list[str]) -> None:
        assert fallback[0] == "hangup"
        self.hangups.append(call_sid)


@pytest.fixture(autouse=True)
def fast_watch(monkeypatch):
    monkeypatch.setattr("gateway.call.watchdog.WATCH_EVERY_S", 0.05)


async def run_call(
    carrier: Leg, agent: Leg, *more_agents: Leg, reconnects: int = 0
) -> tuple[Session, Control, MemoryRegistry]:
    """Run a call to its end; `more_agents` are what reopening a dropped agent gives."""
    registry, control = MemoryRegistry(), Control()
    record = CallRecord("CA1", registry.instance_id, State.RINGING, "+1555", "+1666", "agent", "inbound", "h")
    await registry.put(record)
    agents = [agent, *more_agents]

    async def open_agent(_record: CallRecord, _why: str, _open_s: float) -> Leg:
        return agents.pop(0)

    session = Session(
        record,
        registry=registry,
        control=control,
        open_agent=open_agent,  # type: ignore[arg-type]
        plan_transfer=lambda _r, _f: None,  # type: ignore[arg-type,return-value]
        output_format="mulaw_8000",
        end_call_drain_s=0.2,
        fallback=("hangup", ""),
        max_reconnects=reconnects,
    )
    await asyncio.wait_for(session.run(carrier), 5)  # type: ignore[arg-type]
    return session, control, registry


async def test_a_carrier_that_stops_reading_ends_the_call():
    carrier = Leg(CallerAudio(SILENCE_B64), stuck=True)
    agent = Leg(AgentAudio(SILENCE_B64), stuck=False)
    started = time.monotonic()
    session, _control, registry = await run_call(carrier, agent)
    assert session.outcome == "carrier_not_reading"
    assert 0.3 <= time.monotonic() - started < 2
    assert agent.closed_with == 1000  # the agent is told the call ended
    assert await registry.get("CA1") is None


async def test_an_agent_that_stops_reading_gets_the_caller_the_fallback_past_its_reconnects():
    carrier = Leg(CallerAudio(SILENCE_B64), stuck=False)
    agent = Leg(AgentAudio(SILENCE_B64), stuck=True)
    session, control, _registry = await run_call(carrier, agent)
    assert agent.aborted  # its stuck send cannot hold the call
    assert session.outcome == "agent_fallback_hangup"
    assert control.hangups == ["CA1"]  # the caller is not left in silence
    assert carrier.closed_with == 1000


async def test_an_agent_that_stops_reading_is_replaced_by_a_new_session():
    carrier = Leg(CallerAudio(SILENCE_B64), stuck=False)
    stuck = Leg(AgentAudio(SILENCE_B64), stuck=True)
    fresh = Leg(AgentAudio(SILENCE_B64), stuck=False)
    task = asyncio.create_task(run_call(carrier, stuck, fresh, reconnects=1))
    await asyncio.sleep(1.2)
    assert stuck.aborted and fresh.sent > 10  # the caller's audio goes to the new session
    await carrier.hang_up()
    session, control, _registry = await task
    assert session.outcome == "caller_hung_up"
    assert control.hangups == []


async def test_legs_that_keep_up_are_left_alone():
    carrier = Leg(CallerAudio(SILENCE_B64), stuck=False)
    agent = Leg(AgentAudio(SILENCE_B64), stuck=False)
    task = asyncio.create_task(run_call(carrier, agent))
    await asyncio.sleep(1.0)  # many watchdog rounds, each past the stall bound of a slow send
    assert not task.done()
    assert carrier.sent > 20 and agent.sent > 20
    assert agent.keepalives >= 10  # the agent is asked to ping on every round
    await carrier.hang_up()
    session, control, _registry = await task
    assert session.outcome == "caller_hung_up"
    assert control.hangups == []


# Keepalive over real sockets: an agent written with aiohttp.web, speaking the Calls API's
# start/ack (PROTOCOLS.md section 5), that answers pings or not.


@contextlib.asynccontextmanager
async def ping_agent(*, answers_pings: bool) -> AsyncIterator[tuple[str, list[float]]]:
    pings: list[float] = []

    async def stream(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        start = orjson.loads((await ws.receive()).data)
        await ws.send_str(orjson.dumps({"event": "ack", "stream_id": start["stream_id"]}).decode())
        async for msg in ws:  # silent: it never speaks, so only pings keep the socket busy
            if msg.type is aiohttp.WSMsgType.PING:
                pings.append(time.monotonic())
                if answers_pings:
                    await ws.pong(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/agents/stream/{agent_id}", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"ws://127.0.0.1:{port}", pings
    finally:
        await runner.cleanup()


@pytest.fixture
def fast_pings(monkeypatch):
    monkeypatch.setattr("gateway.agents.cartesia.PING_INTERVAL_S", 0.2)
    monkeypatch.setattr("gateway.agents.cartesia.PING_TIMEOUT_S", 0.5)


async def test_the_gateway_pings_a_silent_agent_that_answers_and_the_call_goes_on(fast_pings):
    async with ping_agent(answers_pings=True) as (url, pings), sandbox(cartesia_url=url) as box:
        call = await box.connect_call()
        await call.run(CallScript(hangup_at=1.5))
        assert len(pings) >= 5  # every watchdog round (0.05 s here) past the 0.2 s interval
        assert min(b - a for a, b in itertools.pairwise(pings)) >= 0.19
        assert box.rest.hangups() == []  # the caller hung up; the gateway did not


async def test_an_agent_that_stops_answering_pings_ends_the_call(fast_pings):
    async with (
        ping_agent(answers_pings=False) as (url, pings),
        sandbox(cartesia_url=url, agent_reconnects=0, agent_fallback=("hangup", "")) as box,
    ):
        call = await box.connect_call()
        runner = asyncio.create_task(call.run(CallScript(hangup_at=10)))
        async with asyncio.timeout(5):
            while not box.rest.hangups(call.call_sid):  # noqa: ASYNC110 (the REST fake records it)
                await asyncio.sleep(0.05)
        assert len(pings) == 1  # no second ping while the first is unanswered
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


def tcp_states(port: int) -> list[str]:
    """Kernel states (hex, /proc/net/tcp) of the IPv4 connections whose local port is `port`."""
    states = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[2] != "00000000:0000":
            states.append(fields[3])
    return states


ESTABLISHED = "01"


async def test_a_real_agent_that_stops_reading_is_dropped_and_the_call_hung_up(monkeypatch):
    """Over real sockets: the agent acks, then reads nothing more. Once the kernel's buffers and
    aiohttp's fill, the gateway's sends wait; past the bound the connection is dropped (not
    left open with data buffered for a peer that will never take it) and the call hung up."""
    from gateway.agents.cartesia import CartesiaAgent

    monkeypatch.setattr(CartesiaAgent, "stalled_after_s", 0.3)
    test_over = asyncio.Event()

    async def stream(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        start = orjson.loads((await ws.receive()).data)
        await ws.send_str(orjson.dumps({"event": "ack", "stream_id": start["stream_id"]}).decode())
        request.transport.pause_reading()  # and never read again
        await test_over.wait()
        return ws

    app = web.Application()
    app.router.add_get("/agents/stream/{agent_id}", stream)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    # A small receive buffer (inherited by the accepted socket) so that the buffers fill in a
    # second rather than after megabytes.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    await web.SockSite(runner, listener).start()
    try:
        fallback = {"agent_reconnects": 0, "agent_fallback": ("hangup", "")}
        async with sandbox(cartesia_url=f"ws://127.0.0.1:{port}", **fallback) as box:
            call = await box.connect_call()
            await asyncio.sleep(0.3)  # the ack
            assert tcp_states(port) == [ESTABLISHED]
            frame = bytes(range(160))
            async with asyncio.timeout(15):
                while not box.rest.hangups(call.call_sid):
                    for _ in range(200):  # far faster than real time, to fill the buffers soon
                        await call.send_media(frame)
                    await asyncio.sleep(0.01)
                # The gateway reset the connection rather than leave it open, buffered.
                while ESTABLISHED in tcp_states(port):  # noqa: ASYNC110 (kernel state)
                    await asyncio.sleep(0.05)
            gateway = box.app.state.gateway
            async with asyncio.timeout(5):
                while gateway.sessions:  # noqa: ASYNC110 (state owned by the server)
                    await asyncio.sleep(0.05)
            await call._close("test over")
    finally:
        test_over.set()
        await runner.cleanup()
