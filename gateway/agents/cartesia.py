"""A Cartesia Line agent over the Calls API WebSocket: one call's connection (an AgentLeg).

The frames themselves are gateway.agents.calls_api.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from gateway.agents.calls_api import (
    CALLS_API_DTMF,
    agent_url,
    dtmf_frame,
    media_input_frame,
    parse_frame,
    start_frame,
)
from gateway.call.legs import AgentUnavailable
from gateway.events import AgentEvent, AgentReady, ProtocolError
from gateway.liveness import Liveness

log = structlog.get_logger(__name__)

# Agent audio arrives in chunks of 20-100 ms (a few KiB of base64 at PCM 44.1 kHz); a frame
# near 1 MiB is a broken peer, and aiohttp refuses it (close 1009) rather than buffer it.
# Unread frames are bounded by aiohttp itself: past 64 KiB queued it stops reading the socket,
# so a stalled bridge pushes back on the agent instead of growing memory.
MAX_FRAME_BYTES = 1024 * 1024
# The server closes after 180 s without a client message; a ping every 60 s keeps a silent
# call alive with room to spare, and a peer that has not answered one in 30 s is gone. The
# session's watchdog sends them (`keepalive`): aiohttp's own `heartbeat` re-arms a timer for
# every frame received, a callback per 20 ms of audio.
PING_INTERVAL_S = 60.0
PING_TIMEOUT_S = 30.0
# A ping is one small frame; if it cannot be written at once the send path is stalled, which
# the watchdog reports on its own.
PING_WRITE_TIMEOUT_S = 1.0
# Bounds on bringing the agent up: TCP + TLS + upgrade (the caller's agent link may give less),
# then the `ack` to our `start`.
OPEN_TIMEOUT_S = 10.0
ACK_TIMEOUT_S = 5.0
# A send waits for the write buffer to drain at most this long; past it the agent is gone, and
# the session's watchdog aborts the socket (see gateway.liveness).
SEND_TIMEOUT_S = 5.0
# When we close, how long to wait for the agent's close frame before dropping the TCP socket.
CLOSE_TIMEOUT_S = 2.0
# Handshake statuses that mean the API key or the agent id is wrong: no retry will help.
REFUSED_KEY_STATUSES = frozenset({401, 403})
# Refusals worth another try (busy, or a server that may be restarting); any other 4xx is ours.
RETRYABLE_STATUSES = frozenset({408, 425, 429})


def auth_headers(api_key: str) -> dict[str, str]:
    """Both of the headers Cartesia takes a server's API key in. Its docs show
    `Authorization: Bearer` on the agents socket, its own Calls API client
    (cartesia-ai/agent-ws-example, client.go) sends the API key that way, and its
    authentication guide says server-side requests may use `X-API-Key` or `Authorization`."""
    return {"X-API-Key": api_key, "Authorization": f"Bearer {api_key}"} if api_key else {}


@dataclass(slots=True)
class AgentConfig:
    base_url: str
    api_key: str
    version: str
    input_format: str = "mulaw_8000"


# The Calls API sends JSON text; JSON in a binary frame is read the same way rather than refused.
DATA_FRAMES = frozenset({aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY})


class AgentRedirected(aiohttp.ClientError):
    """The agent's URL answered with a redirect, which is refused (see agent_http_session)."""


async def _refuse_redirect(
    _session: aiohttp.ClientSession, _ctx: object, params: aiohttp.TraceRequestRedirectParams
) -> None:
    raise AgentRedirected(f"the agent's URL redirects (HTTP {params.response.status})")


def agent_http_session() -> aiohttp.ClientSession:
    """The HTTP session agent sockets are opened on, one per gateway.

    - No cap on connections: every live call holds one agent socket, and aiohttp's default cap
      of 100 would hold the 101st call's agent back. Calls are what is bounded.
    - No redirects: aiohttp would follow one to any host with our `X-API-Key` still on it.
    """
    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(_refuse_redirect)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trace_configs=[trace])


class AgentClosed(Exception):
    """The agent's socket closed (or failed) while we waited for a frame."""


class CartesiaAgent:
    """One call's agent socket: open with `start`/`ack`, then send and receive events.

    The socket is aiohttp's WebSocket client: its frame reader is compiled, and in the
    benchmark the bare relay spent ~20 % less CPU per call with it than with websockets'
    asyncio client (bench/README.md).
    """

    # The agent may be silent for long stretches (pings watch the socket), so only sends are
    # watched.
    silent_after_s = None
    stalled_after_s = SEND_TIMEOUT_S

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, stream_id: str) -> None:
        self._ws = ws
        self.stream_id = stream_id
        self.liveness = Liveness()
        self._close_reason: str | None = None
        self._pinged_at = self._pong_at = time.monotonic()
        self._socket = ws.get_extra_info("socket")  # for `abort`; aiohttp forgets it on close
        self.output_format = ""  # as the agent's `ack` reported it ("" when it did not)

    @classmethod
    async def open(
        cls,
        http: aiohttp.ClientSession,
        config: AgentConfig,
        agent_id: str,
        *,
        stream_id: str,
        metadata: Mapping[str, Any],
        open_timeout_s: float = OPEN_TIMEOUT_S,
    ) -> CartesiaAgent:
        url = agent_url(config.base_url, agent_id)
        headers = {"Cartesia-Version": config.version, **auth_headers(config.api_key)}
        try:
            async with asyncio.timeout(min(open_timeout_s, OPEN_TIMEOUT_S)):
                ws = await http.ws_connect(
                    url,
                    headers=headers,
                    autoping=False,  # pings and pongs are ours: see PING_INTERVAL_S
                    max_msg_size=MAX_FRAME_BYTES,
                    compress=0,  # base64 audio does not compress; save the CPU
                    timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S),
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in REFUSED_KEY_STATUSES:
                raise AgentUnavailable(
                    f"Cartesia refused the API key for agent {agent_id} (HTTP {exc.status}): "
                    "check CARTESIA_API_KEY",
                    exc.status,
                    retry=False,
                ) from None
            if exc.status == 404:
                raise AgentUnavailable(
                    f"no agent {agent_id} at {config.base_url} (HTTP 404): check the agent id",
                    exc.status,
                    retry=False,
                ) from None
            retry = exc.status >= 500 or exc.status in RETRYABLE_STATUSES
            raise AgentUnavailable(
                f"agent refused the socket: HTTP {exc.status}", exc.status, retry=retry
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise AgentUnavailable(f"agent unreachable: {type(exc).__name__}: {exc}") from None
        agent = cls(ws, stream_id)
        try:
            await ws.send_str(
                start_frame(stream_id=stream_id, input_format=config.input_format, metadata=metadata)
            )
            async with asyncio.timeout(ACK_TIMEOUT_S):
                while True:
                    event = parse_frame(await agent._receive_text())
                    if isinstance(event, AgentReady):
                        if event.stream_id:
                            agent.stream_id = event.stream_id
                        agent.output_format = event.output_format
                        return agent
                    log.warning("agent_event_before_ack", agent_event=type(event).__name__)
        except TimeoutError:
            await agent.close(1011, "no ack")
            raise AgentUnavailable(f"agent sent no ack within {ACK_TIMEOUT_S:g} s") from None
        except AgentClosed:
            raise AgentUnavailable(
                f"agent closed before ack: {agent.close_code} {agent.close_reason or ''}".rstrip()
            ) from None
        except ProtocolError as exc:
            await agent.close(1002, "protocol error")
            raise AgentUnavailable(f"agent sent a malformed frame before ack: {exc}") from None
        except BaseException:
            # Cancelled (the call ended while the agent was coming up): the agent already has
            # our `start`, so close its socket rather than leave it holding a concurrency slot.
            with contextlib.suppress(Exception):
                await agent.close(1000, "call ended")
            raise

    async def _receive_text(self) -> str | bytes:
        """The next frame's JSON; AgentClosed when the socket has closed."""
        while True:
            msg = await self._ws.receive()
            if msg.type in DATA_FRAMES:
                self.liveness.received()
                return msg.data
            if not await self._control_frame(msg):
                raise AgentClosed

    async def events(self) -> AsyncIterator[AgentEvent | ProtocolError]:
        """Frames from the agent until it closes. Malformed frames come as ProtocolError values."""
        # the same as `_receive_text`, inline: this runs for every 20 ms of the agent's audio
        receive, liveness, text = self._ws.receive, self.liveness, aiohttp.WSMsgType.TEXT
        while True:
            msg = await receive()
            if msg.type is text or msg.type is aiohttp.WSMsgType.BINARY:
                liveness.received()
                try:
                    yield parse_frame(msg.data)
                except ProtocolError as exc:
                    yield exc
            elif not await self._control_frame(msg):
                return

    async def _control_frame(self, msg: aiohttp.WSMessage) -> bool:
        """Answer a ping, note a pong; False when the socket has closed (and keep why: aiohttp
        has already answered the agent's close frame)."""
        if msg.type is aiohttp.WSMsgType.PING:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._ws.pong(msg.data)
            return True
        if msg.type is aiohttp.WSMsgType.PONG:
            self._pong_at = time.monotonic()
            return True
        if msg.type is aiohttp.WSMsgType.CLOSE:
            self._close_reason = msg.extra or ""
        elif msg.type is aiohttp.WSMsgType.ERROR:
            log.warning("agent_socket_error", error=str(msg.data))
        return False

    async def keepalive(self, now: float) -> bool:
        """Ping when one is due; False when the last one has gone unanswered too long."""
        if self._pong_at < self._pinged_at:  # a ping is out
            return now - self._pinged_at <= PING_TIMEOUT_S
        if now - self._pinged_at >= PING_INTERVAL_S:
            self._pinged_at = now
            with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
                async with asyncio.timeout(PING_WRITE_TIMEOUT_S):
                    await self._ws.ping()
        return True

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self._close_reason

    async def _send(self, text: str) -> None:
        # A closed socket is the downlink's to notice and to decide what it means for the call;
        # a send that waits for good is the session watchdog's (`liveness`).
        liveness = self.liveness
        liveness.send_waiting_since = time.monotonic()
        try:
            await self._ws.send_str(text)
        except (ConnectionError, RuntimeError):
            pass  # closed or closing
        finally:
            liveness.send_waiting_since = 0.0

    async def send_audio(self, payload_b64: str) -> None:
        await self._send(media_input_frame(self.stream_id, payload_b64))

    async def send_dtmf(self, digit: str) -> None:
        if digit not in CALLS_API_DTMF:
            log.info("dtmf_not_forwarded", digit=digit, reason="the Calls API takes 0-9, * and # only")
            return
        await self._send(dtmf_frame(self.stream_id, digit))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close cleanly if the agent answers within CLOSE_TIMEOUT_S, else drop the connection:
        aiohttp alone would wait for ever to flush to an agent that has stopped reading."""
        closed = False
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._ws.close(code=code, message=reason.encode())
            closed = True
        except TimeoutError:
            pass
        finally:
            if not closed:
                self.abort()

    def abort(self) -> None:
        """Drop the TCP connection now, with a reset, discarding what is buffered for it (a FIN
        would wait behind that data for a peer that is not reading). aiohttp has no public way
        to; uvloop's transport sockets refuse shutdown(), but a duplicate descriptor of the same
        connection does not. The downlink then sees the socket closed."""
        if self._socket is None:
            return
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(self._socket.fileno())) as dup:
            dup.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            dup.shutdown(socket.SHUT_RDWR)
