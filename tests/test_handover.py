"""A call's stream resumed on another instance keeps its control URL: the old instance lets the
call go and its cleanup leaves the new owner's record alone, and after a Redis restart only the
new owner's record comes back (written with compare-and-set on the stream's session)."""

import asyncio
import contextlib
import json
import time

import aiohttp
import redis.asyncio as aioredis

from gateway.sandbox.agent import AgentBehaviour
from gateway.sandbox.flow import after_connect
from tests.redis_server import RedisServer
from tests.test_cluster import (
    RECOVERY_S,
    agent_call_for,
    call_key,
    cluster,
    on,
    post,
    start_call,
    token_key,
)

SILENCE = b"\xff" * 160


async def pump(call) -> None:
    """The caller's side keeps streaming (Twilio sends a frame every 20 ms), on whichever
    socket the call has now."""
    while True:
        with contextlib.suppress(Exception):  # a socket being replaced, or closed
            await call.send_media(SILENCE)
        await asyncio.sleep(0.02)


async def get(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json()


async def test_a_stream_handed_over_to_another_instance_keeps_its_control_url():
    server = RedisServer().start()
    try:
        async with cluster(server.url, AgentBehaviour(greeting_s=0.3)) as (
            gateways,
            rest,
            agent,
            calls,
            token,
        ):
            a, b = gateways
            call = await start_call(a, token, rest, calls)  # webhook and media on A
            streaming = asyncio.create_task(pump(call))
            first = await agent_call_for(agent, call.call_sid)
            assert first.metadata["control_url"].startswith(a.url)
            # The stream drops; Twilio runs the <Redirect> after </Connect>, which the
            # platform's router sends to B, and B's TwiML opens a new stream on B.
            control = first.metadata["control_url"]
            call._ws.transport.abort()
            await asyncio.sleep(0.5)
            ((verb, target),) = after_connect(call.twiml)
            await call.run_verbs([(verb, target.replace(a.url, b.url))], "resumed")
            async with asyncio.timeout(10):
                while not (moved := [c for c in agent.calls if c is not first and c.start]):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            url = moved[0].metadata["control_url"]
            assert url.rsplit("/", 1)[1] == control.rsplit("/", 1)[1]  # the same token, on B's origin
            assert moved[0].metadata["resumed"] is True
            await asyncio.wait_for(first.closed.wait(), 5)  # A let go before B's agent came up
            await asyncio.sleep(0.5)  # A's cleanup has run
            client = aioredis.Redis.from_url(server.url)
            try:
                record = json.loads(await client.get(call_key(call.call_sid)))
                assert await client.get(token_key(url)) == call.call_sid.encode()
                # The control URL works through either instance.
                assert (await get(on(a, url)))[1]["state"] == "live"
                assert (await post(on(a, url), {"action": "send_dtmf", "digits": "1"}))[0] == 200
                # Redis restarts, empty: B writes its record back, A has nothing to write.
                server.restart()
                restarted = time.monotonic()
                await client.aclose()
                client = aioredis.Redis.from_url(server.url)
                async with asyncio.timeout(RECOVERY_S):
                    while await client.get(token_key(url)) != call.call_sid.encode():  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                await asyncio.sleep(2.5)  # a heartbeat or two more on both
                restored = json.loads(await client.get(call_key(call.call_sid)))
                assert restored["session_hash"] == record["session_hash"]  # B's, not A's
                assert restored["owner"] == record["owner"]
                async with asyncio.timeout(RECOVERY_S - (time.monotonic() - restarted) + 3):
                    while (reply := await post(on(a, url), {"action": "send_dtmf", "digits": "2"}))[0] == 503:  # noqa: ASYNC110
                        await asyncio.sleep(0.3)  # B's subscriber may still be reconnecting
                assert reply[0] == 200, reply
                assert (await post(on(b, url), {"action": "end_call"}))[0] == 200
            finally:
                await client.aclose()
            async with asyncio.timeout(10):
                while not rest.hangups(call.call_sid):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            streaming.cancel()
    finally:
        server.stop()
