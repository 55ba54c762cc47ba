"""Outbound calls and batches: auth, pacing, the concurrency cap, and restarts mid-batch."""

import asyncio
import itertools
from collections import Counter
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from gateway.sandbox.agent import AgentBehaviour
from gateway.sandbox.harness import ACCOUNT_SID, sandbox
from gateway.sandbox.script import CallScript
from gateway.sandbox.servers import free_port
from gateway.sandbox.twilio_rest_fake import AutoProgress, TwilioRestFake
from tests.loadbalancer import LoadBalancer
from tests.test_cluster import cluster

API_KEY = "gk_test_" + "9" * 24


async def api(method: str, url: str, body=None, key: str | None = API_KEY) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http, http.request(method, url, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def wait_for_batch(base_url: str, batch_id: str, within_s: float) -> dict:
    async with asyncio.timeout(within_s):
        while True:
            status, body = await api("GET", f"{base_url}/calls/batch/{batch_id}")
            if status == 200 and body["state"] == "finished":
                return body
            await asyncio.sleep(0.2)


def numbers(n: int) -> list[str]:
    return [f"+1555700{i:04d}" for i in range(n)]


async def test_outbound_call_needs_the_api_key():
    async with sandbox(gateway_api_key=API_KEY) as box:
        body = {"to": "+15557000001", "from": "+15550000001"}
        for key in (None, "wrong"):
            status, reply = await api("POST", box.url + "/calls", body, key=key)
            assert (status, reply["error"]["code"]) == (401, "unauthorized")
        assert box.rest.created == []
    async with sandbox() as box:
        status, reply = await api("POST", box.url + "/calls", {"to": "+15557000001"})
        assert (status, reply["error"]["code"]) == (404, "outbound_disabled")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"to": "555-1212", "from": "+15550000001"}, 422, "invalid_destination"),
        ({"to": "+15557000001"}, 400, "bad_field"),  # no from, no OUTBOUND_FROM
        ({"to": "+15557000001", "from": "+15550000001", "metadata": [1]}, 400, "bad_field"),
        ({"to": "+15557000001", "from": "+15550000001", "machine_detection": "maybe"}, 400, "bad_field"),
    ],
)
async def test_bad_outbound_requests_are_refused_clearly(body, status, code):
    async with sandbox(gateway_api_key=API_KEY) as box:
        got, reply = await api("POST", box.url + "/calls", body)
        assert (got, reply["error"]["code"]) == (status, code)
        assert reply["error"]["message"]
        assert box.rest.created == []


async def test_outbound_call_connects_its_answer_to_the_agent_with_its_metadata():
    async with sandbox(AgentBehaviour(greeting_s=0.2), gateway_api_key=API_KEY) as box:
        body = {
            "to": "+15557000001",
            "from": "+15550000001",
            "agent": "agent_collections",
            "metadata": {"invoice": "INV-7"},
            "machine_detection": True,
        }
        status, reply = await api("POST", box.url + "/calls", body)
        assert status == 201 and reply["ok"]
        (created,) = box.rest.created
        assert reply["call_sid"] == created.call_sid
        form = created.form
        assert (form["To"], form["From"], form["MachineDetection"]) == (
            "+15557000001",
            "+15550000001",
            "Enable",
        )
        assert form["Url"] == box.url + "/twilio/voice?agent=agent_collections"
        assert form["StatusCallback"].startswith(box.url + "/twilio/status?slot=")
        # Twilio answers: it posts the voice URL for the new call, then opens the stream.
        call = box.new_call(
            call_sid=created.call_sid,
            from_="+15550000001",
            to="+15557000001",
            voice_query="agent=agent_collections",
            extra_form={"Direction": "outbound-api", "AnsweredBy": "human"},
        )
        assert await call.dial() == 200
        await call.open_stream()
        runner = asyncio.create_task(call.run(CallScript(hangup_at=0.6)))
        agent_call = await box.agent.wait_for_call()
        assert agent_call.path.endswith("/agent_collections")
        meta = agent_call.metadata
        assert (meta["invoice"], meta["answered_by"], meta["direction"]) == ("INV-7", "human", "outbound-api")
        await runner


async def test_batch_of_50_is_paced_capped_and_dials_everyone_once():
    rate, cap = 20.0, 5
    async with sandbox(
        gateway_api_key=API_KEY, calls_per_second=rate, max_concurrent_calls=cap, outbound_from="+15550000001"
    ) as box:
        box.rest.auto_progress = AutoProgress(
            ring_s=0.05, talk_s=0.3, outcome=lambda to: "busy" if to.endswith("7") else "completed"
        )
        recipients = [{"to": n, "metadata": {"row": i}} for i, n in enumerate(numbers(50))]
        status, reply = await api(
            "POST", box.url + "/calls/batch", {"recipients": recipients, "agent": "agent_b"}
        )
        assert status == 202 and reply["total"] == 50
        done = await wait_for_batch(box.url, reply["batch_id"], 30)
        created = list(box.rest.created)
        max_active = box.rest.max_active
    assert Counter(c.form["To"] for c in created) == Counter(numbers(50))  # everyone, once
    starts = sorted(c.at for c in created)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 1 / rate - 0.01, min(gaps)
    assert max_active <= cap
    assert max_active == cap  # the cap, not the pace, was what held calls back
    assert done["done"] == 50 and done["outcomes"] == {"completed": 45, "busy": 5}


async def test_batch_is_refused_when_too_big_or_malformed():
    async with sandbox(gateway_api_key=API_KEY, outbound_from="+15550000001") as box:
        too_many = {"recipients": numbers(1001)}
        status, reply = await api("POST", box.url + "/calls/batch", too_many)
        assert (status, reply["error"]["code"]) == (400, "bad_field")
        bad = {"recipients": ["+15557000001", "nonsense"]}
        status, reply = await api("POST", box.url + "/calls/batch", bad)
        assert (status, reply["error"]["code"]) == (422, "invalid_destination")
        assert "recipients[1]" in reply["error"]["message"]
        status, _ = await api("GET", box.url + "/calls/batch/BAnope")
        assert status == 404


async def test_a_restart_mid_batch_loses_and_duplicates_no_one(redis_server):
    ports = [free_port(), free_port()]
    balancer = await LoadBalancer(ports).start()
    rest = TwilioRestFake(ACCOUNT_SID, "tok_" + "3" * 28)
    rest.auto_progress = AutoProgress(ring_s=0.05, talk_s=0.4)
    try:
        async with cluster(
            redis_server.url,
            ports=ports,
            rest=rest,
            PUBLIC_URL=balancer.url,
            GATEWAY_API_KEY=API_KEY,
            CALLS_PER_SECOND="10",
            MAX_CONCURRENT_CALLS="4",
            OUTBOUND_FROM="+15550000001",
        ) as (gateways, rest, *_):
            a, b = gateways
            status, reply = await api("POST", a.url + "/calls/batch", {"recipients": numbers(50)})
            assert status == 202
            await asyncio.sleep(1.5)
            a.kill()  # mid-batch, with calls in flight and claims outstanding
            done = await wait_for_batch(b.url, reply["batch_id"], 60)
            created = Counter(c.form["To"] for c in rest.created)
            await asyncio.sleep(1.0)  # the last calls' final callbacks
            import redis.asyncio as aioredis

            client = aioredis.from_url(redis_server.url)
            slots_left = await client.zcard("lgw:outbound:slots")
            await client.aclose()
            status_hosts = {urlsplit(c.form["StatusCallback"]).netloc for c in rest.created}
    finally:
        await balancer.close()
    assert created == Counter(numbers(50)), {n: k for n, k in created.items() if k != 1}
    assert done["done"] == 50
    assert rest.max_active <= 4  # the cap held across the restart
    assert slots_left == 0  # and no slot leaked
    assert status_hosts == {urlsplit(balancer.url).netloc}
    assert all("slot" in parse_qs(urlsplit(c.form["StatusCallback"]).query) for c in rest.created)


async def test_line_gateway_call_starts_one_call_from_the_command_line(monkeypatch, capsys):
    from gateway.cli import main

    async with sandbox(gateway_api_key=API_KEY, outbound_from="+15550000001") as box:
        monkeypatch.setenv("GATEWAY_API_KEY", API_KEY)
        argv = [
            "call",
            "+15557000009",
            "--agent",
            "agent_cli",
            "--metadata",
            '{"k": 1}',
            "--gateway",
            box.url,
        ]
        assert await asyncio.to_thread(main, argv) == 0
        (created,) = box.rest.created
        assert created.form["To"] == "+15557000009"
        assert capsys.readouterr().out.strip() == created.call_sid
        assert await asyncio.to_thread(main, ["call", "nonsense", "--gateway", box.url]) == 1
        assert "invalid_destination" in capsys.readouterr().err


async def test_a_retried_request_with_the_same_idempotency_key_rings_no_one_twice():
    async with sandbox(gateway_api_key=API_KEY, outbound_from="+15550000001") as box:
        headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": "order-42-reminder"}
        body = {"to": "+15557000001"}
        async with aiohttp.ClientSession() as http:
            replies = []
            for _ in range(2):
                async with http.post(box.url + "/calls", json=body, headers=headers) as resp:
                    replies.append((resp.status, await resp.json()))
            async with http.post(
                box.url + "/calls", json=body, headers={**headers, "Idempotency-Key": "other"}
            ) as r:
                assert r.status == 201
        assert replies[0] == replies[1] and replies[0][0] == 201
        assert len(box.rest.created) == 2  # the retry was answered from memory; the other key dialled


async def test_outbound_requests_are_refused_while_draining():
    async with sandbox(gateway_api_key=API_KEY, outbound_from="+15550000001") as box:
        box.app.state.gateway.draining = True
        status, reply = await api("POST", box.url + "/calls", {"to": "+15557000001"})
        assert (status, reply["error"]["code"]) == (503, "draining")
        assert box.rest.created == []
