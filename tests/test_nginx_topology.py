"""The proxy configuration compose ships (deploy/nginx/line-gateway.conf), run for real.

Debian's nginx, with a self-signed certificate, terminates TLS in front of two `line-gateway
serve` processes on one real Redis, with PUBLIC_URL the nginx https origin, as in production:
Twilio signs the public https URL, streams media over wss through the proxy, and the agent's
control POST lands on whichever instance the proxy picks.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect

from gateway.dtmf import detect_dtmf
from gateway.sandbox.agent import AgentBehaviour
from gateway.sandbox.caller import NO_PROXY, SimulatedCall
from gateway.sandbox.harness import ACCOUNT_SID
from gateway.sandbox.script import CallScript
from gateway.sandbox.servers import serve
from tests.nginx_server import NginxServer
from tests.redis_server import free_port
from tests.test_cluster import agent_call_for, call_key, cluster

FRAME = 160  # 20 ms of mu-law


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def log_events(stderr: str, event: str) -> list[dict[str, Any]]:
    """The gateway's JSON log lines whose event is `event`."""
    found = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == event:
                found.append(entry)
    return found


async def post_json(url: str, body: dict[str, Any], tls: ssl.SSLContext) -> tuple[int, Any]:
    """What the agent's tool does with its control URL (here through the proxy's https)."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http,
        http.post(url, json=body) as resp,
    ):
        return resp.status, await resp.json()


async def test_a_signed_call_through_nginx_is_controlled_through_the_other_instance(redis_server):
    ports = [free_port(), free_port()]
    behaviour = AgentBehaviour(greeting_s=0.6)
    with NginxServer(ports) as nginx:
        tls = nginx.ssl_context()
        async with cluster(redis_server.url, behaviour, ports=ports, PUBLIC_URL=nginx.url) as (
            gateways,
            rest,
            agent,
            calls,
            token,
        ):
            # Twilio signs the public https URL, query string included; the proxy passes both on.
            call = SimulatedCall(
                nginx.url,
                token,
                account_sid=ACCOUNT_SID,
                voice_query="campaign=spring%20sale",
                ssl_context=tls,
            )
            calls[call.call_sid] = call
            rest.add_call(call.call_sid)
            assert await call.dial() == 200
            assert call.stream_url.startswith(f"wss://127.0.0.1:{nginx.port}/twilio/media")
            # A signature over any other URL (here http:// instead of https://) is refused.
            forged = SimulatedCall(nginx.url, token, account_sid=ACCOUNT_SID, ssl_context=tls)
            assert await forged.dial(public_url=f"http://127.0.0.1:{nginx.port}") == 403

            await call.open_stream()  # wss through nginx, the signature on the public wss URL
            voice = os.urandom(FRAME * 100)  # 2 s the agent must receive byte for byte
            runner = asyncio.create_task(call.run(CallScript(audio=voice, speak_at=1.2, max_s=20)))
            agent_call = await agent_call_for(agent, call.call_sid)
            control_url = agent_call.metadata["control_url"]
            assert control_url.startswith(nginx.url + "/control/")
            client = aioredis.Redis.from_url(redis_server.url)
            try:
                owner = json.loads(await client.get(call_key(call.call_sid)))["owner"]
            finally:
                await client.aclose()

            await asyncio.sleep(2.0)  # the greeting plays, the caller speaks
            assert call.first_audio_at is not None
            # The agent's tools: DTMF to the caller, then hang up, each POSTed through the proxy.
            reply = await post_json(control_url, {"action": "send_dtmf", "digits": "42"}, tls)
            assert reply == (200, {"ok": True, "action": "send_dtmf", "call_sid": call.call_sid})
            await asyncio.sleep(1.5)
            reply = await post_json(control_url, {"action": "end_call"}, tls)
            assert reply == (200, {"ok": True, "action": "end_call", "call_sid": call.call_sid})
            await asyncio.wait_for(runner, 15)
            await asyncio.wait_for(agent_call.closed.wait(), 5)

        # Audio both ways through the proxy: the caller's in order up to the hang-up (frames
        # still in flight when the agent's socket closed go nowhere), the agent's greeting and
        # the tones.
        assert bytes(call.sent_audio).startswith(bytes(agent_call.audio_in))
        assert voice in bytes(agent_call.audio_in)
        assert detect_dtmf(call.heard_pcm16()) == "42"  # tones the owner played on the POST's word
        assert call.protocol_errors == []
        (hangup,) = rest.hangups()
        assert hangup.call_sid == call.call_sid and hangup.authorised
        assert call.end_reason == "hung up via REST"

        # Which instance held the call, and which took its control POSTs.
        log = nginx.access_log()
        (media,) = [e for e in log if e["uri"].startswith("/twilio/media")]
        assert (media["method"], media["status"], media["upgrade"]) == ("GET", "101", "websocket")
        holder = next(g for g in gateways if g.port == port_of(media["upstream"]))
        other = next(g for g in gateways if g is not holder)
        controls = [e for e in log if e["uri"].startswith("/control/")]
        assert [(e["method"], e["status"]) for e in controls] == [("POST", "200")] * 2
        assert {port_of(e["upstream"]) for e in controls} == {other.port}
        # The Redis record's owner is the instance the media socket reached ...
        assert [e["instance"] for e in log_events(holder.log, "gateway_started")] == [owner]
        # ... the other instance accepted both POSTs and routed them to it.
        accepted = [(e["call_sid"], e["action"]) for e in log_events(other.log, "control_accepted")]
        assert accepted == [(call.call_sid, "send_dtmf"), (call.call_sid, "end_call")]
        assert log_events(holder.log, "control_accepted") == []
        # Host as the client sent it, on every request the proxy logged.
        assert {e["host"] for e in log} == {f"127.0.0.1:{nginx.port}"}


async def test_nginx_passes_the_public_origin_and_the_raw_uri_to_the_gateways():
    """What the gateways see behind the proxy: Host and X-Forwarded-Host the client's,
    X-Forwarded-Proto https, the path and query string byte for byte, and WebSocket upgrades."""
    seen: list[dict[str, Any]] = []

    async def echo(request: Request) -> JSONResponse:
        seen.append({"headers": dict(request.headers), "path": request.scope["raw_path"].decode()})
        return JSONResponse({"query": request.scope["query_string"].decode()})

    async def echo_ws(ws: WebSocket) -> None:
        seen.append({"headers": dict(ws.headers), "path": ws.scope["raw_path"].decode()})
        await ws.accept()
        await ws.send_text(await ws.receive_text())
        await ws.close()

    app = Starlette(
        routes=[WebSocketRoute("/twilio/media/{sid}", echo_ws), Route("/{rest:path}", echo, methods=["POST"])]
    )
    ports = [free_port(), free_port()]
    with NginxServer(ports) as nginx:
        tls = nginx.ssl_context()
        async with serve(app, ports[0]), serve(app, ports[1]):
            # Raw bytes on the wire, so no client library re-encodes the URI.
            reader, writer = await asyncio.open_connection("127.0.0.1", nginx.port, ssl=tls)
            uri = "/twilio/voice?agent=agent_x&note=a%20b%2Fc&e=%7E"
            writer.write(
                f"POST {uri} HTTP/1.1\r\nHost: 127.0.0.1:{nginx.port}\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            response = await reader.read()
            writer.close()
            assert response.startswith(b"HTTP/1.1 200")
            assert orjson.loads(response.split(b"\r\n\r\n", 1)[1]) == {"query": uri.split("?", 1)[1]}
            async with connect(
                nginx.url.replace("https:", "wss:") + "/twilio/media/CA01", ssl=tls, **NO_PROXY
            ) as ws:
                await ws.send("hello")
                assert await ws.recv() == "hello"
    http_seen, ws_seen = seen
    assert http_seen["path"] == "/twilio/voice"
    for request in (http_seen, ws_seen):
        headers = request["headers"]
        assert headers["host"] == headers["x-forwarded-host"] == f"127.0.0.1:{nginx.port}"
        assert headers["x-forwarded-proto"] == "https"
        assert headers["x-forwarded-for"] == headers["x-real-ip"] == "127.0.0.1"
    assert ws_seen["headers"]["upgrade"] == "websocket"
    assert ws_seen["headers"]["connection"].lower() == "upgrade"
    assert "upgrade" not in http_seen["headers"]  # plain requests reuse keepalive connections
    assert "connection" not in http_seen["headers"]


async def test_nginx_skips_an_instance_that_is_down(redis_server):
    """No active health checks in nginx open source: a refused connection takes the instance
    out (max_fails=1) and the webhook goes to the other one, never answered 502."""
    ports = [free_port(), free_port()]
    with NginxServer(ports) as nginx:
        tls = nginx.ssl_context()
        async with cluster(redis_server.url, ports=ports, PUBLIC_URL=nginx.url) as (gateways, _, _, _, token):
            gateways[0].kill()
            statuses = []
            for _ in range(4):
                call = SimulatedCall(nginx.url, token, account_sid=ACCOUNT_SID, ssl_context=tls)
                statuses.append(await call.dial())
        assert statuses == [200] * 4
        hooks = [e for e in nginx.access_log() if e["uri"] == "/twilio/voice"]
        assert [e["status"] for e in hooks] == ["200"] * 4
        assert {port_of(e["upstream"].split(", ")[-1]) for e in hooks} == {ports[1]}
        # The one request that met the dead instance was passed on, then it was left alone.
        tried_dead = [e for e in hooks if ", " in e["upstream"]]
        assert len(tried_dead) == 1
        assert port_of(tried_dead[0]["upstream"].split(", ")[0]) == ports[0]
