"""Two gateway processes on one real Redis: control routed to the owner, and survival of faults."""

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.dtmf import detect_dtmf
from gateway.registry.redis import RedisRegistry
from gateway.sandbox.agent import AgentBehaviour, AgentEmulator
from gateway.sandbox.caller import SimulatedCall
from gateway.sandbox.harness import ACCOUNT_SID, sandbox
from gateway.sandbox.script import CallScript
from gateway.sandbox.servers import free_port, serve
from gateway.sandbox.twilio_rest_fake import TwilioRestFake
from tests.redis_server import RedisServer

# DESIGN.md: after a Redis outage each instance re-registers its live calls within 5 s.
RECOVERY_S = 5.0


class GatewayProcess:
    """`line-gateway serve` in its own process, as it runs in production."""

    def __init__(self, env: dict[str, str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"PUBLIC_URL": self.url, **os.environ, **env, "PORT": str(self.port)}
        self.proc: subprocess.Popen | None = None
        self.log = ""

    async def start(self) -> "GatewayProcess":
        self.proc = subprocess.Popen(  # noqa: ASYNC220 (starting a child does not block)
            [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/readyz") as resp:
                        if resp.status == 200:
                            return self
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
        raise RuntimeError(f"gateway did not start: {self.stop()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stderr is not None:
            self.log = self.proc.stderr.read()
        return self.log[-3000:]


@contextlib.asynccontextmanager
async def cluster(
    redis_url: str,
    behaviour: AgentBehaviour | None = None,
    instances: int = 2,
    ports: list[int] | None = None,
    rest: TwilioRestFake | None = None,
    **extra_env: str,
):
    auth_token = rest.auth_token if rest else secrets.token_hex(16)
    rest = rest or TwilioRestFake(ACCOUNT_SID, auth_token)
    agent = AgentEmulator(behaviour or AgentBehaviour(greeting_s=0.3))
    calls: dict[str, SimulatedCall] = {}

    async def carrier_update(call_sid: str, form: dict[str, str]) -> None:
        if call_sid in calls:
            await calls[call_sid].carrier_update(form)

    rest.on_update = carrier_update
    async with serve(rest.app) as rest_url, agent.running():
        env = {
            "REDIS_URL": redis_url,
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": auth_token,
            "TWILIO_API_BASE": rest_url,
            "CARTESIA_API_KEY": "sk_cluster_test",
            "CARTESIA_AGENT_ID": "agent_cluster",
            "CARTESIA_URL": agent.url,
            "END_CALL_DRAIN_S": "2",
            "LOG_LEVEL": "info",
            **extra_env,
        }
        gateways = [GatewayProcess(env, port) for port in (ports or [None] * instances)]
        try:
            await asyncio.gather(*(g.start() for g in gateways))
            yield gateways, rest, agent, calls, auth_token
        finally:
            for g in gateways:
                g.stop()


async def start_call(gateway: GatewayProcess, auth_token: str, rest, calls) -> SimulatedCall:
    call = SimulatedCall(gateway.url, auth_token, account_sid=ACCOUNT_SID)
    calls[call.call_sid] = call
    rest.add_call(call.call_sid)
    assert await call.dial() == 200
    await call.open_stream()
    return call


async def agent_call_for(agent: AgentEmulator, call_sid: str):
    async with asyncio.timeout(10):
        while True:
            for c in agent.calls:
                if c.metadata.get("call_sid") == call_sid:
                    return c
            await asyncio.sleep(0.02)


async def post(url: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
        return resp.status, await resp.json()


def on(gateway, control_url: str) -> str:
    """The same control URL, taken by another instance (as a load balancer would send it)."""
    return gateway.url + "/control/" + control_url.rsplit("/", 1)[1]


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# The Redis registry's key names (gateway/registry/redis.py, default prefix).
def call_key(call_sid: str) -> str:
    return f"lgw:call:{call_sid}"


def token_key(control_url: str) -> str:
    return f"lgw:token:{sha256_hex(control_url.rsplit('/', 1)[1])}"


async def redis_contents(url: str) -> list[bytes]:
    """Every key in the Redis at `url` and everything stored under it, as bytes."""
    client = aioredis.Redis.from_url(url)
    found: list[bytes] = []
    try:
        async for key in client.scan_iter(match="*", count=1000):
            found.append(key)
            kind = (await client.type(key)).decode()
            if kind == "string":
                found.append(await client.get(key) or b"")
            elif kind == "hash":
                for field, value in (await client.hgetall(key)).items():
                    found += [field, value]
            elif kind == "list":
                found += await client.lrange(key, 0, -1)
            elif kind == "set":
                found += await client.smembers(key)
            elif kind == "zset":
                found += await client.zrange(key, 0, -1)
            elif kind == "stream":
                for _id, fields in await client.xrange(key):
                    for field, value in fields.items():
                        found += [field, value]
            elif kind != "none":  # "none": it expired while we looked
                pytest.fail(f"unexpected Redis type {kind!r} under {key!r}")
    finally:
        await client.aclose()
    return found


async def test_control_on_instance_b_is_carried_out_by_instance_a(redis_server):
    async with cluster(redis_server.url) as (gateways, rest, agent, calls, token):
        a, b = gateways
        call = await start_call(a, token, rest, calls)
        runner = asyncio.create_task(call.run(CallScript(max_s=20)))
        agent_call = await agent_call_for(agent, call.call_sid)
        control_url = agent_call.metadata["control_url"]
        assert control_url.startswith(a.url)
        async with aiohttp.ClientSession() as http, http.get(on(b, control_url)) as resp:
            state = await resp.json()
        assert state["call_sid"] == call.call_sid and state["state"] == "live"
        status, body = await post(on(b, control_url), {"action": "end_call"})
        assert (status, body) == (200, {"ok": True, "action": "end_call", "call_sid": call.call_sid})
        await asyncio.wait_for(runner, 10)
        await asyncio.wait_for(agent_call.closed.wait(), 5)
        (hangup,) = rest.hangups()
        assert hangup.call_sid == call.call_sid and hangup.authorised
        assert agent_call.close_code == 1000
        # The token died with the call, on every instance.
        assert (await post(on(b, control_url), {"action": "end_call"}))[0] == 404
        assert (await post(on(a, control_url), {"action": "end_call"}))[0] == 404
        # Errors found by the owner come back through B as they are.
        call2 = await start_call(a, token, rest, calls)
        runner2 = asyncio.create_task(call2.run(CallScript(max_s=20)))
        url2 = (await agent_call_for(agent, call2.call_sid)).metadata["control_url"]
        assert (await post(on(b, url2), {"action": "send_dtmf", "digits": "5"}))[0] == 200
        assert (await post(on(b, url2), {"action": "hangup"}))[0] == 200
        status, body = await post(on(b, url2), {"action": "send_dtmf", "digits": "5"})
        assert (status, body["error"]["code"]) == (409, "call_ending")
        await asyncio.wait_for(runner2, 10)
        # A carried the routed send_dtmf out: the caller heard the digit (once: the second was 409),
        # before the hang-up that came after it.
        assert detect_dtmf(call2.heard_pcm16()) == "5"
        assert len(rest.hangups(call2.call_sid)) == 1


async def test_when_the_owner_dies_another_instance_hangs_up_through_rest(redis_server):
    async with cluster(redis_server.url) as (gateways, rest, agent, calls, token):
        a, b = gateways
        call = await start_call(a, token, rest, calls)
        runner = asyncio.create_task(call.run(CallScript(max_s=30)))
        control_url = (await agent_call_for(agent, call.call_sid)).metadata["control_url"]
        await asyncio.sleep(0.3)
        a.kill()
        # While A's heartbeat lives, B waits for it and answers 503; once it expires (6 s), B
        # acts through Twilio's REST API itself.
        statuses = []
        async with asyncio.timeout(15):
            while True:
                status, body = await post(on(b, control_url), {"action": "end_call"})
                statuses.append(status)
                if status == 200:
                    break
                assert (status, body["error"]["code"]) == (503, "owner_unavailable")
                await asyncio.sleep(0.5)
        (hangup,) = rest.hangups()
        assert hangup.call_sid == call.call_sid
        assert (await post(on(b, control_url), {"action": "end_call"}))[0] == 404
        await asyncio.wait_for(runner, 10)


async def test_when_the_owner_dies_another_instance_transfers_through_rest(redis_server):
    async with cluster(redis_server.url, TRANSFER_ALLOW="+1555*") as (gateways, rest, agent, calls, token):
        a, b = gateways
        call = await start_call(a, token, rest, calls)
        runner = asyncio.create_task(call.run(CallScript(max_s=30)))
        control_url = (await agent_call_for(agent, call.call_sid)).metadata["control_url"]
        await asyncio.sleep(0.3)
        a.kill()
        transfer = {"action": "call_transfer", "to": "+1 (555) 123-4567", "summary": "billing"}
        async with asyncio.timeout(15):
            while True:  # 503 while A's heartbeat lives (up to 6 s), then B acts through REST
                status, body = await post(on(b, control_url), transfer)
                if status == 200:
                    break
                assert (status, body["error"]["code"]) == (503, "owner_unavailable"), body
                await asyncio.sleep(0.5)
        assert body == {"ok": True, "action": "call_transfer", "call_sid": call.call_sid}
        (redirect,) = rest.redirects()
        assert redirect.call_sid == call.call_sid and redirect.authorised
        twiml = redirect.form["Twiml"]
        dial = twiml[twiml.index("<Dial") : twiml.index("</Dial>")]
        assert "<Number>+15551234567</Number>" in dial
        assert f'callerId="{call.to}"' in dial and 'answerOnBridge="true"' in dial
        await asyncio.sleep(0.5)
        assert rest.hangups() == []  # transferred, not hung up
        client = aioredis.Redis.from_url(redis_server.url)
        try:  # kept as transferred, for the transfer's outcome
            assert json.loads(await client.get(call_key(call.call_sid)))["state"] == "transferred"
        finally:
            await client.aclose()
        assert (await post(on(b, control_url), {"action": "end_call"}))[0] == 404  # the token is dead
        await asyncio.wait_for(runner, 10)
        assert rest.hangups() == []


async def test_a_redis_outage_never_drops_a_live_call(redis_server):
    """Redis stops mid-call and comes back: the call streams on, its owner serves its control from
    memory meanwhile, and afterwards Redis is used again: the call's token hash is back within 5 s
    and a second instance, which knows the call only through Redis, routes control to the owner."""
    server = RedisServer().start()
    try:
        async with (
            sandbox(AgentBehaviour(greeting_s=0.3), registry=RedisRegistry(server.url)) as box,
            sandbox(registry=RedisRegistry(server.url)) as other,
        ):
            call = await box.connect_call()
            runner = asyncio.create_task(call.run(CallScript(audio=os.urandom(160 * 200), max_s=30)))
            agent_call = await box.agent.wait_for_call()
            url = agent_call.metadata["control_url"]
            client = aioredis.Redis.from_url(server.url)
            try:
                assert await client.get(token_key(url)) == call.call_sid.encode()
            finally:
                await client.aclose()
            await asyncio.sleep(0.5)
            server.stop()
            before = len(agent_call.audio_in)
            await asyncio.sleep(1.5)
            # Media does not touch Redis: the caller's audio still flows to the agent ...
            assert len(agent_call.audio_in) >= before + 160 * 50
            # ... and the instance serves its own call's control from memory ...
            status, _ = await post(url, {"action": "send_dtmf", "digits": "1"})
            assert status == 200
            # ... while the other instance, which can only find the call in Redis, cannot.
            status, body = await post(on(other, url), {"action": "send_dtmf", "digits": "1"})
            assert (status, body["error"]["code"]) == (503, "registry_unavailable"), body
            server.start()
            restarted = time.monotonic()
            # Within 5 s of Redis answering, the call's token hash is registered there again ...
            client = aioredis.Redis.from_url(server.url)
            try:
                async with asyncio.timeout(RECOVERY_S):
                    while await client.get(token_key(url)) != call.call_sid.encode():  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                assert json.loads(await client.get(call_key(call.call_sid)))["state"] == "live"
            finally:
                await client.aclose()
            # ... and a control POST through the other instance finds it there and is routed to the
            # owner, which carries it out (its REST fake records the hang-up; the other's nothing).
            async with asyncio.timeout(RECOVERY_S - (time.monotonic() - restarted)):
                while True:
                    status, body = await post(on(other, url), {"action": "end_call"})
                    if status == 200:
                        break
                    assert status == 503, body  # the owner's subscriber may still be reconnecting
                    await asyncio.sleep(0.3)
            assert body == {"ok": True, "action": "end_call", "call_sid": call.call_sid}
            await asyncio.wait_for(runner, 10)
            assert len(box.rest.hangups(call.call_sid)) == 1
            assert other.rest.requests == []
    finally:
        server.stop()


@pytest.mark.parametrize("instances", [1])
async def test_readyz_reports_the_registry(redis_server, instances):
    server = RedisServer().start()
    try:
        async with cluster(server.url, instances=instances) as (gateways, *_):
            (g,) = gateways
            server.stop()
            async with aiohttp.ClientSession() as http:
                async with asyncio.timeout(5):
                    while True:
                        async with http.get(g.url + "/readyz") as resp:
                            if resp.status == 503:
                                break
                        await asyncio.sleep(0.1)
                async with http.get(g.url + "/healthz") as resp:
                    assert resp.status == 200
    finally:
        server.stop()


async def test_webhook_on_one_instance_and_media_on_another(redis_server):
    """Behind a load balancer the webhook and the media socket often land apart."""
    async with cluster(redis_server.url) as (gateways, rest, agent, calls, token):
        a, b = gateways
        call = SimulatedCall(a.url, token, account_sid=ACCOUNT_SID)
        calls[call.call_sid] = call
        rest.add_call(call.call_sid)
        assert await call.dial() == 200  # answered by A
        call.stream_url = call.stream_url.replace(a.url.split("//")[1], b.url.split("//")[1])
        await call.open_stream()  # media on B
        runner = asyncio.create_task(call.run(CallScript(max_s=20)))
        agent_call = await agent_call_for(agent, call.call_sid)
        control_url = agent_call.metadata["control_url"]
        assert control_url.startswith(b.url)  # the token was minted where the media is
        await asyncio.sleep(2.5)  # a heartbeat or two on both sides
        status, body = await post(on(a, control_url), {"action": "send_dtmf", "digits": "3"})
        assert status == 200, body  # A routes to B, the owner
        assert (await post(on(a, control_url), {"action": "end_call"}))[0] == 200
        await asyncio.wait_for(runner, 10)
        assert len(rest.hangups(call.call_sid)) == 1
        assert detect_dtmf(call.heard_pcm16()) == "3"  # B played it to the caller
        for g in gateways:
            g.stop()
        logs = a.log + b.log
        secret = control_url.rsplit("/", 1)[1]
        assert call.call_sid in logs
        assert secret not in logs and call.parameters["session"] not in logs
        assert token not in logs


async def test_redis_holds_the_tokens_sha256_never_the_token(redis_server):
    """Every key and value in Redis, mid-call (after routed control) and after the call: the
    control token (and the stream's session reference) never appear; their SHA-256 hex does."""
    async with cluster(redis_server.url) as (gateways, rest, agent, calls, auth_token):
        a, b = gateways
        call = await start_call(a, auth_token, rest, calls)
        runner = asyncio.create_task(call.run(CallScript(max_s=20)))
        control_url = (await agent_call_for(agent, call.call_sid)).metadata["control_url"]
        token = control_url.rsplit("/", 1)[1]
        session_ref = call.parameters["session"]
        # Control through both instances, routed and not, so rate windows and replies are there too.
        async with aiohttp.ClientSession() as http, http.get(on(b, control_url)) as resp:
            assert resp.status == 200
        assert (await post(on(b, control_url), {"action": "send_dtmf", "digits": "2"}))[0] == 200
        assert (await post(on(a, control_url), {"action": "send_dtmf", "digits": "4"}))[0] == 200
        live = await redis_contents(redis_server.url)
        assert not [blob for blob in live if token.encode() in blob]
        assert not [blob for blob in live if session_ref.encode() in blob]
        assert any(sha256_hex(token).encode() in blob for blob in live)  # it is the Redis we used
        assert any(sha256_hex(session_ref).encode() in blob for blob in live)
        assert (await post(on(b, control_url), {"action": "end_call"}))[0] == 200
        await asyncio.wait_for(runner, 10)
        after = await redis_contents(redis_server.url)
        assert not [blob for blob in after if token.encode() in blob or session_ref.encode() in blob]


async def test_sigterm_ends_live_calls_gracefully_before_exiting():
    rest = TwilioRestFake(ACCOUNT_SID, "tok_" + "5" * 28)
    agent = AgentEmulator(AgentBehaviour(greeting_s=0.2))
    calls: dict[str, SimulatedCall] = {}

    async def carrier_update(call_sid: str, form: dict[str, str]) -> None:
        if call_sid in calls:
            await calls[call_sid].carrier_update(form)

    rest.on_update = carrier_update
    async with serve(rest.app) as rest_url, agent.running():
        env = {
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": rest.auth_token,
            "TWILIO_API_BASE": rest_url,
            "CARTESIA_AGENT_ID": "agent_x",
            "CARTESIA_URL": agent.url,
            "END_CALL_DRAIN_S": "1",
        }
        env.pop("REDIS_URL", None)
        gateway = GatewayProcess({**env, "REDIS_URL": ""})
        gateway.env["SHUTDOWN_GRACE_S"] = "0.5"
        await gateway.start()
        try:
            call = await start_call(gateway, rest.auth_token, rest, calls)
            runner = asyncio.create_task(call.run(CallScript(max_s=20)))
            agent_call = await agent_call_for(agent, call.call_sid)
            gateway.proc.send_signal(signal.SIGTERM)
            async with aiohttp.ClientSession() as http, http.get(gateway.url + "/readyz") as resp:
                assert resp.status == 503  # draining: the platform stops sending calls here
            await asyncio.wait_for(runner, 15)
            await asyncio.wait_for(agent_call.closed.wait(), 5)
            assert gateway.proc.wait(15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
        finally:
            gateway.stop()
    assert len(rest.hangups(call.call_sid)) == 1  # ended through Twilio, not cut off
    assert call.end_reason == "hung up via REST"
    assert agent_call.close_code == 1000
