"""Calls survive what production does to them: an agent that drops, a stream that drops, a
deploy, an instance that dies, and replays. Two `line-gateway serve` processes on a real
redis-server behind a load balancer that sends new connections only to ready instances, as a
platform's router does; the caller is the sandbox's simulated Twilio, which runs the TwiML after
`</Connect>` when the server closes the stream and not when the stream drops."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import aiohttp
import pytest

from gateway.http.bodies import BODY_READ_TIMEOUT_S
from gateway.sandbox.agent import AgentBehaviour
from gateway.sandbox.caller import SimulatedCall
from gateway.sandbox.flow import after_connect
from gateway.sandbox.harness import ACCOUNT_SID
from gateway.sandbox.script import CallScript
from gateway.sandbox.servers import free_port
from gateway.settings import DEFAULT_FALLBACK_TEXT
from tests.loadbalancer import LoadBalancer
from tests.redis_server import RedisServer
from tests.streaming import trickle
from tests.test_call import silence_before
from tests.test_cluster import agent_call_for, cluster, on, post


def longest_gap(call, after: float, before: float | None = None, what: str = "") -> float:
    """The longest stretch without agent audio reaching the caller between two moments (printed
    with `what`: the README's "Reliability" table quotes these)."""
    times = [t for t, _ in call.media_arrivals if t >= after and (before is None or t <= before)]
    if len(times) < 2:
        return float("inf")
    gap = max(b - a for a, b in itertools.pairwise(times))
    if what:
        print(f"measured: {what}: caller heard no agent audio for {gap:.3f} s at most")
    return gap


async def start_on(gateway, balancer: LoadBalancer, token: str, rest, calls) -> SimulatedCall:
    """A call whose webhook and media reach `gateway`, signed (as Twilio signs) on the public
    URL, the balancer's; what it does next (a `<Redirect>`, a new stream) goes through it."""
    call = SimulatedCall(gateway.url, token, account_sid=ACCOUNT_SID)
    calls[call.call_sid] = call
    rest.add_call(call.call_sid)
    assert await call.dial(balancer.url) == 200
    public_stream_url = call.stream_url
    call.stream_url = public_stream_url.replace(balancer.url.split("//")[1], gateway.url.split("//")[1])
    await call.open_stream(signature=call.sign(public_stream_url, {}))
    call.stream_url, call.gateway_url = public_stream_url, balancer.url
    return call


async def wait_for(predicate, within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def behind_balancer(behaviour: AgentBehaviour, **env: str):
    server = RedisServer().start()
    ports = [free_port(), free_port()]
    balancer = await LoadBalancer(ports).start()
    try:
        async with cluster(
            server.url, behaviour, ports=ports, PUBLIC_URL=balancer.url, SHUTDOWN_GRACE_S="15", **env
        ) as (gateways, rest, agent, calls, token):
            yield gateways, balancer, rest, agent, calls, token
    finally:
        await balancer.close()
        server.stop()


TALKING = AgentBehaviour(continuous=True, send_custom=True)


async def test_an_agent_that_drops_mid_call_is_reopened_with_its_state_and_the_call_goes_on():
    async with behind_balancer(TALKING) as (gateways, balancer, rest, agent, calls, token):
        call = await start_on(gateways[0], balancer, token, rest, calls)
        running = asyncio.create_task(call.run(CallScript(max_s=8)))
        first = await agent_call_for(agent, call.call_sid)
        await asyncio.sleep(1.5)
        dropped_at = time.monotonic()
        agent.drop(first)  # no close frame: a crashed agent process
        await wait_for(lambda: len(agent.calls) == 2)
        second = agent.calls[1]
        await wait_for(lambda: second.start is not None)
        meta = second.metadata
        assert meta["resumed"] is True and meta["resume_reason"] == "agent_dropped"
        assert meta["agent_state"] == {"greeting": True, "sessions": 1}  # its last `custom`
        assert meta["control_url"] == first.metadata["control_url"]
        await asyncio.sleep(1.5)
        assert agent.live_sockets() == 1
        status, body = await post(meta["control_url"], {"action": "send_dtmf", "digits": "1"})
        assert status == 200, body
        await post(meta["control_url"], {"action": "end_call"})
        await asyncio.wait_for(running, 15)
    assert longest_gap(call, dropped_at - 1.0, dropped_at + 2.0, "agent dropped") <= 1.5
    assert len(second.audio_in) > 8000  # the caller's audio reaches the new session


async def test_a_deploy_moves_the_call_to_the_other_instance():
    async with behind_balancer(TALKING) as (gateways, balancer, rest, agent, calls, token):
        a, b = gateways
        call = await start_on(a, balancer, token, rest, calls)
        running = asyncio.create_task(call.run(CallScript(max_s=12)))
        first = await agent_call_for(agent, call.call_sid)
        url = first.metadata["control_url"]
        await asyncio.sleep(1.0)
        moved_at = time.monotonic()
        a.proc.terminate()  # SIGTERM: a deploy
        await wait_for(lambda: len(agent.calls) == 2, 10)
        second = agent.calls[1]
        await wait_for(lambda: second.start is not None)
        assert second.metadata["resumed"] is True
        assert second.metadata["resume_reason"] == "instance_draining"
        assert second.metadata["control_url"] == url
        await asyncio.wait_for(first.closed.wait(), 5)
        assert agent.live_sockets() == 1
        await asyncio.sleep(1.0)
        assert (await post(on(b, url), {"action": "send_dtmf", "digits": "2"}))[0] == 200
        await asyncio.to_thread(a.proc.wait, 20)
        assert call.streams_opened == 1 and not call.ended.is_set()
        assert (await post(on(b, url), {"action": "end_call"}))[0] == 200
        await asyncio.wait_for(running, 15)
    assert longest_gap(call, moved_at, moved_at + 6, "deploy moved the call") <= 1.5


async def test_when_an_instance_dies_control_acts_at_once_and_its_calls_are_taken_over():
    async with behind_balancer(TALKING) as (gateways, balancer, rest, agent, calls, token):
        a, b = gateways
        call = await start_on(a, balancer, token, rest, calls)
        other = await start_on(a, balancer, token, rest, calls)
        running = asyncio.create_task(call.run(CallScript(max_s=20)))
        asyncio.create_task(other.run(CallScript(max_s=20)))  # noqa: RUF006 (ends with its call)
        first = await agent_call_for(agent, call.call_sid)
        url = first.metadata["control_url"]
        other_url = (await agent_call_for(agent, other.call_sid)).metadata["control_url"]
        await asyncio.sleep(1.0)
        a.kill()  # SIGKILL: the stream drops without a close frame; nothing after </Connect> runs
        died = time.monotonic()
        # The other instance acts on a control POST at once: end_call through the REST API.
        status, body = await post(on(b, other_url), {"action": "end_call"})
        assert status == 200, body
        await wait_for(lambda: rest.hangups(other.call_sid), 3.0)
        print(f"measured: instance killed to end_call carried out: {time.monotonic() - died:.3f} s")
        # DTMF needs the media, which died with A: refused at once, not after a timeout.
        status, body = await post(on(b, url), {"action": "send_dtmf", "digits": "1"})
        assert status == 503 and time.monotonic() - died < 3.0, body
        # B takes the call over once A's heartbeat has expired: a REST update, a new stream.
        await wait_for(lambda: call.streams_opened == 1, 15)
        await wait_for(lambda: len(agent.calls) == 3 and agent.calls[2].start is not None)
        second = agent.calls[2]
        assert second.metadata["call_sid"] == call.call_sid
        assert second.metadata["resume_reason"] == "instance_failed"
        assert second.metadata["control_url"] == url
        resumed = time.monotonic()
        await asyncio.sleep(1.0)
        first_audio = min(t for t, _ in call.media_arrivals if t >= died + 0.1)
        print(f"measured: instance killed to agent audio again: {first_audio - died:.3f} s")
        assert longest_gap(call, resumed, resumed + 1.0) <= 0.5  # audio flows again
        ended = time.monotonic()
        assert (await post(on(b, url), {"action": "end_call"}))[0] == 200
        await asyncio.wait_for(running, 15)
    assert time.monotonic() - ended < 10
    assert call.end_reason == "hung up via REST"


async def test_a_dropped_stream_is_resumed_by_the_next_one():
    async with behind_balancer(TALKING) as (gateways, balancer, rest, agent, calls, token):
        call = await start_on(gateways[0], balancer, token, rest, calls)
        running = asyncio.create_task(call.run(CallScript(max_s=8)))
        first = await agent_call_for(agent, call.call_sid)
        url = first.metadata["control_url"]
        await asyncio.sleep(1.0)
        call._ws.transport.abort()  # the media socket drops: no stop, no close frame
        await wait_for(lambda: call.stream_lost)
        await asyncio.sleep(1.0)  # Twilio comes back a second later, through the public URL
        back = time.monotonic()
        await call.run_verbs(after_connect(call.twiml), "resumed")
        await asyncio.sleep(1.5)
        first_audio = min(t for t, _ in call.media_arrivals if t >= back)
        print(f"measured: stream back to agent audio: {first_audio - back:.3f} s")
        assert first_audio - back <= 1.5
        assert not call.ended.is_set() and call.streams_opened == 1
        assert agent.live_sockets() == 1
        status, state = await post(url, {"action": "send_dtmf", "digits": "4"})
        assert status == 200, state
        await post(url, {"action": "end_call"})
        await asyncio.wait_for(running, 15)
    assert call.end_reason == "hung up via REST"


async def test_replayed_webhooks_take_nothing_over_a_live_call():
    async with behind_balancer(AgentBehaviour(greeting_s=0.3)) as (
        gateways,
        balancer,
        rest,
        agent,
        calls,
        token,
    ):
        call = await start_on(gateways[0], balancer, token, rest, calls)
        running = asyncio.create_task(call.run(CallScript(max_s=6)))
        first = await agent_call_for(agent, call.call_sid)
        await asyncio.sleep(0.5)
        # The voice webhook and the continue request (what Twilio posts after </Connect>), each
        # signed as Twilio signed it, replayed to either instance while the call is live.
        form = call.webhook_form()
        continue_form = {**form, "CallStatus": "in-progress"}
        replays = [
            ("/twilio/voice", form, call.sign(balancer.url + "/twilio/voice", form)),
            ("/twilio/continue", continue_form, call.sign(balancer.url + "/twilio/continue", continue_form)),
        ]
        async with aiohttp.ClientSession() as http:
            for path, body, signature in replays:
                for g in gateways:
                    headers = {"X-Twilio-Signature": signature}
                    async with http.post(g.url + path, data=body, headers=headers) as resp:
                        assert resp.status == 409, (path, await resp.text())
        assert (await post(first.metadata["control_url"], {"action": "send_dtmf", "digits": "5"}))[0] == 200
        assert len(agent.calls) == 1
        await asyncio.wait_for(running, 10)
    assert call.end_reason == "caller hung up" and call.streams_opened == 0


@pytest.mark.parametrize(
    ("behaviour", "most_silence_s"),
    [(AgentBehaviour(refuse_status=429), 3.0), (AgentBehaviour(never_ack=True), 6.0)],
    ids=["refused-429", "no-ack"],
)
async def test_an_agent_that_cannot_be_had_gets_the_caller_the_fallback_in_time(behaviour, most_silence_s):
    async with behind_balancer(behaviour) as (gateways, balancer, rest, _agent, calls, token):
        call = await start_on(gateways[1], balancer, token, rest, calls)
        await call.run(CallScript(max_s=9))
    silence = silence_before(call, "call redirected via REST")
    what = behaviour.refuse_status or "no ack"
    print(f"measured: agent {what}: silence before the fallback {silence:.3f} s")
    assert silence <= most_silence_s
    assert call.said == [DEFAULT_FALLBACK_TEXT] and call.end_reason == "hung up by TwiML"


async def test_clients_trickling_webhooks_are_cut_off_while_calls_flow():
    async with behind_balancer(TALKING) as (gateways, balancer, rest, agent, calls, token):
        call = await start_on(gateways[0], balancer, token, rest, calls)
        running = asyncio.create_task(call.run(CallScript(max_s=16)))
        await agent_call_for(agent, call.call_sid)
        body = b"CallSid=CA1&From=%2B15551230001"  # 31 bytes at one a second: past the deadline
        head = (
            b"POST /twilio/voice HTTP/1.1\r\nHost: gw\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        started = time.monotonic()
        results = await asyncio.gather(*(trickle(gateways[0].url, head, body) for _ in range(20)))
        held = time.monotonic()
        for took, answer in results:
            assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
            assert took < BODY_READ_TIMEOUT_S + 3
        gap = longest_gap(call, started, held, "20 clients trickling webhook bodies")
        await running
    assert gap <= 0.3
    assert call.end_reason == "caller hung up"
