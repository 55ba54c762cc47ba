"""The floor: the cheapest relay between Twilio Media Streams and a Calls API agent.

Same server stack as `line-gateway serve` (Starlette on uvicorn with uvloop and httptools,
the gateway's own uvicorn settings: `ws_max_size` 64 KiB, no WebSocket pings, and its garbage
collector settings) and the same agent client (aiohttp, compression off), but no features:
no signature checks, no registry, no marks, no timeouts, no state machine. Per frame it parses
the JSON, re-wraps the payload and sends it on. The benchmark runs it in the same harness as the
gateway, so the gateway's cost reads as a ratio to this.

    python -m bench.floor --port 8090 --agent-url ws://127.0.0.1:9000 --agent-id bench
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
from urllib.parse import parse_qsl, quote

import aiohttp
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.asgi import BareASGI
from gateway.sandbox.servers import tune_gc, uvicorn_config

TWIML = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="{url}">'
    '<Parameter name="session" value="{session}"/></Stream></Connect><Hangup/></Response>'
)


def create_app(public_url: str, agent_url: str, agent_id: str, agent_client: str = "aiohttp") -> Starlette:
    stream_url = public_url.replace("http", "ws", 1).rstrip("/") + "/twilio/media"
    agent_stream = f"{agent_url.rstrip('/')}/agents/stream/{agent_id}"

    async def voice(request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        if not form.get("CallSid"):
            return Response("CallSid is required\n", status_code=400)
        # The same stream URL the gateway answers with (it names the call), so the load sees one.
        url = f"{stream_url}/{quote(form['CallSid'], safe='')}"
        twiml = TWIML.format(url=url, session=secrets.token_urlsafe(16))
        return Response(twiml, media_type="application/xml")

    async def media(scope: Scope, receive: Receive, send: Send) -> None:
        # A bare ASGI app, as the gateway's media route is: after `start` the relay reads and
        # writes through uvicorn's receive and send, without Starlette's per-message layers.
        ws = WebSocket(scope, receive, send)
        if agent_client == "aiohttp":
            await media_aiohttp(ws, receive, send)
            return
        await media_websockets(ws, receive, send)

    async def media_websockets(ws: WebSocket, receive: Receive, send: Send) -> None:
        """The same relay with websockets' asyncio client on the agent side (`--agent-client
        websockets`, the gateway's client before it moved to aiohttp)."""
        await ws.accept()
        start = None
        while start is None:
            frame = orjson.loads(await ws.receive_text())
            if frame.get("event") == "start":
                start = frame["start"]
        sid, call_sid = start["streamSid"], start["callSid"]
        async with connect(agent_stream, compression=None, ping_interval=None, max_size=1 << 20) as agent:
            await agent.send(
                orjson.dumps(
                    {
                        "event": "start",
                        "stream_id": call_sid,
                        "config": {"input_format": "mulaw_8000"},
                        "metadata": {"call_sid": call_sid},
                    }
                ).decode()
            )
            while orjson.loads(await agent.recv()).get("event") != "ack":
                pass

            async def uplink() -> None:
                with contextlib.suppress(OSError, ConnectionClosed):
                    while True:
                        message = await receive()
                        if message["type"] != "websocket.receive":
                            return
                        frame = orjson.loads(message["text"])
                        event = frame.get("event")
                        if event == "media":
                            payload = frame["media"]["payload"]
                            await agent.send(
                                f'{{"event":"media_input","stream_id":"{call_sid}","media":{{"payload":"{payload}"}}}}'
                            )
                        elif event == "stop":
                            return

            async def downlink() -> None:
                with contextlib.suppress(OSError, ConnectionClosed, RuntimeError):
                    async for text in agent:
                        frame = orjson.loads(text)
                        if frame.get("event") == "media_output":
                            b64 = frame["media"]["payload"]
                            text = f'{{"event":"media","streamSid":"{sid}","media":{{"payload":"{b64}"}}}}'
                            await send({"type": "websocket.send", "text": text})

            up, down = asyncio.create_task(uplink()), asyncio.create_task(downlink())
            await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
            up.cancel()
            down.cancel()
        with contextlib.suppress(Exception):
            await ws.close()

    async def media_aiohttp(ws: WebSocket, receive: Receive, send: Send) -> None:
        """The relay with aiohttp's WebSocket client on the agent side, as the gateway has."""
        await ws.accept()
        start = None
        while start is None:
            frame = orjson.loads(await ws.receive_text())
            if frame.get("event") == "start":
                start = frame["start"]
        sid, call_sid = start["streamSid"], start["callSid"]
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(agent_stream, compress=0, autoping=True, max_msg_size=1 << 20) as agent,
        ):
            await agent.send_str(
                orjson.dumps(
                    {
                        "event": "start",
                        "stream_id": call_sid,
                        "config": {"input_format": "mulaw_8000"},
                        "metadata": {"call_sid": call_sid},
                    }
                ).decode()
            )
            while orjson.loads(await agent.receive_str()).get("event") != "ack":
                pass

            async def uplink() -> None:
                with contextlib.suppress(OSError):
                    while True:
                        message = await receive()
                        if message["type"] != "websocket.receive":
                            return
                        frame = orjson.loads(message["text"])
                        event = frame.get("event")
                        if event == "media":
                            payload = frame["media"]["payload"]
                            await agent.send_str(
                                f'{{"event":"media_input","stream_id":"{call_sid}","media":{{"payload":"{payload}"}}}}'
                            )
                        elif event == "stop":
                            return

            async def downlink() -> None:
                with contextlib.suppress(OSError, RuntimeError):
                    async for msg in agent:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            return
                        frame = orjson.loads(msg.data)
                        if frame.get("event") == "media_output":
                            b64 = frame["media"]["payload"]
                            text = f'{{"event":"media","streamSid":"{sid}","media":{{"payload":"{b64}"}}}}'
                            await send({"type": "websocket.send", "text": text})

            up, down = asyncio.create_task(uplink()), asyncio.create_task(downlink())
            await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
            up.cancel()
            down.cancel()
        with contextlib.suppress(Exception):
            await ws.close()

    async def readyz(_request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/twilio/voice", voice, methods=["POST"]),
            WebSocketRoute("/twilio/media/{call_sid}", BareASGI(media)),
            Route("/readyz", readyz, methods=["GET"]),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--agent-url", required=True, help="ws://host:port of the agent server")
    parser.add_argument("--agent-id", default="bench")
    # Variants, to measure levers that would move the floor itself (defaults: the gateway's stack)
    parser.add_argument("--agent-client", default="aiohttp", choices=["aiohttp", "websockets"])
    parser.add_argument(
        "--ws",
        default="",
        help="uvicorn's WebSocket implementation (default: the gateway's fast path on websockets-sansio)",
    )
    args = parser.parse_args(argv)
    app = create_app(f"http://{args.host}:{args.port}", args.agent_url, args.agent_id, args.agent_client)
    # Exactly what `line-gateway serve` runs: the gateway's uvicorn settings, uvloop, httptools.
    overrides = {"ws": args.ws} if args.ws else {}
    config = uvicorn_config(
        app, args.host, args.port, loop="uvloop", http="httptools", log_level="warning", **overrides
    )
    tune_gc()  # as `line-gateway serve` does
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
