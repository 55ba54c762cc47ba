"""The server's WebSocket protocol (gateway.ws_protocol): its fast path must read and write
exactly what uvicorn's websockets-sansio protocol does, for any framing and any split of the
bytes, and hand everything else to websockets.

The client is websockets' own sans-I/O protocol over a raw TCP socket, so the test controls how
the bytes are cut into writes (the fast path's hard part) while the frames are built and read
by the library.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from test_call import wait_until
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from gateway.sandbox.servers import WS_MAX_SIZE, serve
from gateway.ws_protocol import FastPathWebSocketProtocol, frame_header
from gateway.ws_select import fast_path_mismatches, server_ws_protocol, stock_ws_protocol


class Echo:
    """An app that sends back every message and records what it saw."""

    def __init__(self) -> None:
        self.seen: list[str | bytes] = []
        self.closed = asyncio.get_running_loop().create_future()

    async def endpoint(self, ws: WebSocket) -> None:
        await ws.accept()
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                self.closed.set_result(message.get("code"))
                return
            if message.get("text") is not None:
                self.seen.append(message["text"])
                await ws.send_text(message["text"])
            else:
                self.seen.append(message["bytes"])
                await ws.send_bytes(message["bytes"])


class RawClient:
    """websockets' ClientProtocol on a socket whose writes the test cuts as it likes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proto: ClientProtocol):
        self.reader, self.writer, self.proto = reader, writer, proto

    @classmethod
    async def open(cls, ws_url: str, extra_after_request: bytes = b"") -> RawClient:
        """Connect and complete the opening handshake (`extra_after_request`: bytes sent with
        the request, before the 101)."""
        uri = parse_uri(ws_url)
        reader, writer = await asyncio.open_connection(uri.host, uri.port)
        proto = ClientProtocol(uri, max_size=None)
        proto.send_request(proto.connect())
        writer.write(b"".join(proto.data_to_send()) + extra_after_request)
        async with asyncio.timeout(5):
            while proto.handshake_exc is None and not any(
                isinstance(e, Response) for e in proto.events_received()
            ):
                proto.receive_data(await reader.read(65536))
        assert proto.handshake_exc is None
        return cls(reader, writer, proto)

    def frame_bytes(self, message: str | bytes) -> bytes:
        if isinstance(message, str):
            self.proto.send_text(message.encode())
        else:
            self.proto.send_binary(message)
        return b"".join(self.proto.data_to_send())

    async def write_in_pieces(self, data: bytes, rng: random.Random, max_piece: int = 64) -> None:
        pos = 0
        while pos < len(data):
            step = rng.randint(1, max_piece)
            self.writer.write(data[pos : pos + step])
            await self.writer.drain()
            pos += step
            if rng.random() < 0.3:
                await asyncio.sleep(0)  # let the server read what is there so far

    async def events(self, count: int, within_s: float = 5.0) -> list[Frame]:
        """The next `count` frames from the server (control frames included)."""
        out: list[Frame] = []
        async with asyncio.timeout(within_s):
            while len(out) < count:
                out.extend(e for e in self.proto.events_received() if isinstance(e, Frame))
                if len(out) >= count:
                    break
                data = await self.reader.read(65536)
                if not data:
                    self.proto.receive_eof()
                    out.extend(e for e in self.proto.events_received() if isinstance(e, Frame))
                    break
                self.proto.receive_data(data)
                for chunk in self.proto.data_to_send():  # pongs and close replies
                    if chunk:
                        self.writer.write(chunk)
        return out

    async def close_code(self, within_s: float = 5.0) -> int | None:
        """Read until the server closes; the code of its close frame."""
        with contextlib.suppress(TimeoutError):
            for frame in await self.events(10_000, within_s):
                if frame.opcode is Opcode.CLOSE:
                    return Close.parse(frame.data).code
        return None


# Every test of a connection runs on the fast path and on uvicorn's own protocol: what they
# expect is what uvicorn does. With a uvicorn the fast path does not fit (the minimum-versions
# check runs the oldest allowed), the server runs uvicorn's own, and so do these tests.
PROTOCOLS = {"fast-path": FastPathWebSocketProtocol, "uvicorn": stock_ws_protocol()}
FAST_PATH_OFF = "; ".join(fast_path_mismatches())
needs_fast_path = pytest.mark.skipif(bool(FAST_PATH_OFF), reason=f"fast path off: {FAST_PATH_OFF}")


@pytest.fixture(params=[pytest.param("fast-path", marks=needs_fast_path), "uvicorn"])
def protocol(request: pytest.FixtureRequest) -> Any:
    return PROTOCOLS[request.param]


@contextlib.asynccontextmanager
async def connected(
    protocol: Any, extra_after_request: bytes = b"", **server: Any
) -> AsyncIterator[tuple[Echo, RawClient]]:
    echo = Echo()
    app = Starlette(routes=[WebSocketRoute("/ws", echo.endpoint)])
    async with serve(app, ws=protocol, **server) as origin:
        client = await RawClient.open(origin.replace("http://", "ws://") + "/ws", extra_after_request)
        try:
            yield echo, client
        finally:
            client.writer.close()
            with contextlib.suppress(Exception):
                await client.writer.wait_closed()


def random_messages(rng: random.Random, count: int) -> list[str | bytes]:
    sizes = [0, 1, 125, 126, 127, 300, 1000, 65535, WS_MAX_SIZE]
    out: list[str | bytes] = []
    for _ in range(count):
        size = rng.choice(sizes) if rng.random() < 0.3 else rng.randint(0, 400)
        if rng.random() < 0.7:
            out.append("".join(rng.choice('abcé€😀 {}":') for _ in range(size // 4)))  # <= size bytes
        else:
            out.append(os.urandom(size))
    return out


def payload(frame: Frame) -> str | bytes:
    return frame.data.decode() if frame.opcode is Opcode.TEXT else bytes(frame.data)


def test_served_with_the_fast_path() -> None:
    from gateway.sandbox.servers import uvicorn_config

    assert uvicorn_config(None, "127.0.0.1", 1).ws is server_ws_protocol()
    assert server_ws_protocol() is (stock_ws_protocol() if FAST_PATH_OFF else FastPathWebSocketProtocol)


@pytest.mark.parametrize("seed", range(6))
async def test_any_split_of_any_frames_arrives_whole_and_in_order(protocol: Any, seed: int) -> None:
    rng = random.Random(seed)
    messages = random_messages(rng, 40)
    async with connected(protocol) as (echo, client):
        wire = b"".join(client.frame_bytes(m) for m in messages)
        # read the echoes while writing: the echoes of large messages would otherwise fill the
        # buffers until the server stops reading and the writes wait for ever
        writing = asyncio.create_task(
            client.write_in_pieces(wire, rng, max_piece=rng.choice([1, 7, 64, 4096]))
        )
        echoed = await client.events(len(messages), within_s=20)
        await writing
    assert echo.seen == messages
    assert [payload(f) for f in echoed] == messages


async def test_many_frames_in_one_write(protocol: Any) -> None:
    async with connected(protocol) as (echo, client):
        messages: list[str | bytes] = [f"frame {i}" for i in range(200)]
        client.writer.write(b"".join(client.frame_bytes(m) for m in messages))
        echoed = await client.events(200)
    assert echo.seen == messages
    assert [payload(f) for f in echoed] == messages


async def test_a_ping_hands_over_to_websockets_and_the_stream_goes_on(protocol: Any) -> None:
    async with connected(protocol) as (echo, client):
        client.writer.write(client.frame_bytes("before"))
        client.proto.send_ping(b"are you there")
        ping = b"".join(client.proto.data_to_send())
        after = client.frame_bytes("after")
        client.writer.write(ping + after)  # the data frame after the ping is in the same read
        frames = await client.events(3)
    kinds = [(f.opcode, bytes(f.data)) for f in frames]
    assert (Opcode.PONG, b"are you there") in kinds
    assert [payload(f) for f in frames if f.opcode is Opcode.TEXT] == ["before", "after"]
    assert echo.seen == ["before", "after"]


async def test_a_fragmented_message_is_reassembled(protocol: Any) -> None:
    async with connected(protocol) as (echo, client):
        client.writer.write(client.frame_bytes("plain"))
        client.proto.send_text(b"frag", fin=False)
        client.proto.send_continuation(b"men", fin=False)
        client.proto.send_continuation(b"ted", fin=True)
        client.writer.write(b"".join(client.proto.data_to_send()) + client.frame_bytes("tail"))
        frames = await client.events(3)
    assert echo.seen == ["plain", "fragmented", "tail"]
    assert [payload(f) for f in frames] == ["plain", "fragmented", "tail"]


async def test_frames_sent_with_the_handshake_request_leave_the_socket_working(protocol: Any) -> None:
    # A client must wait for the 101 before it sends frames. uvicorn's HTTP layer drops what
    # came with the request (the early frame is not delivered) on either protocol, and the
    # frames after it still arrive.
    mask = b"\x01\x02\x03\x04"
    body = b"early"
    frame = bytes((0x81, 0x80 | len(body))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(body))
    async with connected(protocol, extra_after_request=frame) as (echo, client):
        client.writer.write(client.frame_bytes("later"))
        frames = await client.events(1)
    assert [payload(f) for f in frames] == ["later"]
    assert echo.seen == ["later"]


async def test_the_client_closing_reaches_the_app(protocol: Any) -> None:
    async with connected(protocol) as (echo, client):
        client.writer.write(client.frame_bytes("hi"))
        await client.events(1)
        client.proto.send_close(4001, "bye")
        client.writer.write(b"".join(client.proto.data_to_send()))
        assert await asyncio.wait_for(echo.closed, 5) == 4001


def masked(first: int, body: bytes, length_field: int | None = None) -> bytes:
    mask = b"\x0a\x0b\x0c\x0d"
    n = len(body) if length_field is None else length_field
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(body))


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (masked(0x81, b"\xff\xfe not utf-8"), 1007),
        (masked(0x82, b"", length_field=WS_MAX_SIZE + 1), 1009),
        (b"\x81\x05hello", 1002),  # a client frame must be masked
        (masked(0xC1, b"rsv1"), 1002),  # an extension bit nobody negotiated
        (masked(0x83, b"opcode 3"), 1002),  # a reserved opcode
    ],
    ids=["invalid-utf8", "too-large", "unmasked", "rsv-bit", "reserved-opcode"],
)
async def test_bad_frames_close_the_socket_with_the_right_code(protocol: Any, bad: bytes, code: int) -> None:
    async with connected(protocol) as (echo, client):
        client.writer.write(client.frame_bytes("fine"))
        await client.events(1)
        client.writer.write(bad + client.frame_bytes("never seen"))
        assert await client.close_code() == code
    assert echo.seen == ["fine"]


async def test_a_frame_over_a_smaller_limit_closes_with_1009(protocol: Any) -> None:
    async with connected(protocol, ws_max_size=1000) as (echo, client):
        client.writer.write(client.frame_bytes("x" * 1000))
        assert [payload(f) for f in await client.events(1)] == ["x" * 1000]
        client.writer.write(client.frame_bytes("x" * 1001))
        assert await client.close_code() == 1009
    assert echo.seen == ["x" * 1000]


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536, 200_000])
def test_frame_header_is_the_shortest_encoding(length: int) -> None:
    header = frame_header(0x81, length)
    frame = Frame.parse
    # websockets reads it back (as a client: unmasked server frames)
    parser = frame(_reader(header + b"x" * length), mask=False, max_size=None)
    with pytest.raises(StopIteration) as done:
        next(parser)
    parsed: Any = done.value.value
    assert parsed.opcode is Opcode.TEXT and parsed.fin and len(parsed.data) == length
    assert len(header) == (2 if length < 126 else 4 if length < 65536 else 10)


def _reader(data: bytes) -> Any:
    buf = bytearray(data)

    def read_exact(n: int) -> Any:
        chunk = bytes(buf[:n])
        del buf[:n]
        return chunk
        yield  # a generator, as websockets' reader is

    return read_exact


async def test_large_server_messages_are_framed_for_the_client(protocol: Any) -> None:
    async with connected(protocol) as (echo, client):
        messages: list[str | bytes] = [os.urandom(60_000), "x" * 65535, ""]
        client.writer.write(b"".join(client.frame_bytes(m) for m in messages))
        frames = await client.events(3)
    assert echo.seen == messages
    assert [payload(f) for f in frames] == messages


async def test_an_app_that_stops_reading_pauses_the_socket_and_loses_nothing() -> None:
    app_may_read = asyncio.Event()
    unread_at_most: list[int] = []
    got: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        proto = receive.__self__  # uvicorn hands the app its protocol's bound `receive`
        await app_may_read.wait()
        unread_at_most.append(proto.queue.qsize())
        while len(got) < 5000:
            message = await receive()
            got.append(message["text"])
        await send({"type": "websocket.send", "text": "done"})

    async with serve(app, lifespan="off") as origin:
        client = await RawClient.open(origin.replace("http://", "ws://") + "/")
        writer = client.writer
        sent = [f"{i:05d}" + "a" * 300 for i in range(5000)]
        writer.write(b"".join(client.frame_bytes(m) for m in sent))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):  # loopback takes what the server reads, and no more
                await writer.drain()
        await asyncio.sleep(0.5)  # the server reads all it will
        app_may_read.set()
        frames = await client.events(1, within_s=10)
        writer.close()
    assert [payload(f) for f in frames] == ["done"]
    assert got == sent
    assert unread_at_most[0] < 2500  # paused after a read or two (a read holds up to ~800), not all 5000


async def test_inbox_passes_a_wake_up_on_when_its_getter_is_cancelled() -> None:
    from gateway.ws_protocol import Inbox

    inbox = Inbox(asyncio.get_running_loop())
    first = asyncio.create_task(inbox.get())
    second = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait("only")  # wakes `first`...
    first.cancel()  # ...which is cancelled before it runs
    assert await asyncio.wait_for(second, 1) == "only"
    assert inbox.empty()
    with pytest.raises(asyncio.CancelledError):
        await first


@needs_fast_path
async def test_data_frames_take_the_fast_path_until_a_control_frame() -> None:
    states: list[bool | None] = []
    got: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        proto = receive.__self__
        while len(got) < 4:
            got.append((await receive())["text"])
            states.append(proto._fast)
        await send({"type": "websocket.send", "text": "done"})

    async with serve(app, lifespan="off") as origin:
        client = await RawClient.open(origin.replace("http://", "ws://") + "/")
        writer, proto = client.writer, client.proto
        for text in ("one", "two"):
            writer.write(client.frame_bytes(text))
            await wait_until(lambda text=text: text in got)
        proto.send_ping(b"hi")
        writer.write(b"".join(proto.data_to_send()))
        for text in ("three", "four"):
            writer.write(client.frame_bytes(text))
        frames = await client.events(2, within_s=5)  # the pong and "done"
        writer.close()
    assert got == ["one", "two", "three", "four"]
    assert states == [True, True, False, False]  # websockets parses from the ping on
    assert [f.opcode for f in frames] == [Opcode.PONG, Opcode.TEXT]
