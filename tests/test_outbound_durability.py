"""Outbound calls when Twilio's answer is lost or an instance dies mid-request: a create that
timed out is ambiguous (the call may exist), and nobody is rung twice or left failed for it."""

import asyncio
import time

import aiohttp
import orjson

from gateway.carriers.twilio.rest import TwilioCalls
from gateway.outbound.dialer import Dialer
from gateway.outbound.parse import BatchSpec, Recipient
from gateway.outbound.store_memory import MemoryOutboundStore
from gateway.registry.memory import MemoryRegistry
from gateway.sandbox.harness import ACCOUNT_SID, sandbox
from gateway.sandbox.twilio_rest_fake import AutoProgress
from tests.test_outbound import API_KEY, api, numbers, wait_for_batch

TO, FROM = "+15557000001", "+15550000001"


async def post_call(box, key: str) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": key}
    async with (
        aiohttp.ClientSession() as http,
        http.post(box.url + "/calls", json={"to": TO}, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_a_create_twilio_never_answers_then_a_retry_rings_the_person_once(monkeypatch):
    monkeypatch.setattr("gateway.carriers.twilio.rest.REQUEST_TIMEOUT_S", 0.5)
    async with sandbox(gateway_api_key=API_KEY, outbound_from=FROM, calls_per_second=50.0) as box:
        box.rest.stall_creates = 1  # Twilio makes the call; its answer is lost
        try:
            status, first = await post_call(box, "order-1")
            assert (status, first["status"], first["call_sid"]) == (202, "unknown", None)
            status, again = await post_call(box, "order-1")
            (created,) = box.rest.created
            assert (status, again) == (201, {"ok": True, "call_sid": created.call_sid})
            assert box.rest.lookups == [(TO, FROM)]  # settled by a REST lookup
            status, third = await post_call(box, "order-1")
            assert (status, third) == (201, again)
            assert len(box.rest.created) == 1  # rung once
        finally:
            box.rest.release.set()


async def test_a_batch_recipient_whose_create_went_unanswered_is_settled_not_failed(monkeypatch):
    monkeypatch.setattr("gateway.carriers.twilio.rest.REQUEST_TIMEOUT_S", 0.5)
    monkeypatch.setattr("gateway.outbound.dialer.STALE_CLAIM_S", 1.0)
    async with sandbox(
        gateway_api_key=API_KEY, outbound_from=FROM, calls_per_second=50.0, max_concurrent_calls=10
    ) as box:
        box.rest.auto_progress = AutoProgress(ring_s=0.05, talk_s=0.2)
        box.rest.stall_creates = 1
        try:
            status, reply = await api("POST", box.url + "/calls/batch", {"recipients": numbers(5)})
            assert status == 202
            async with asyncio.timeout(10):  # the sweep looks the unanswered create up
                while not box.rest.lookups:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            box.rest.release.set()  # and then its callbacks come
        done = await wait_for_batch(box.url, reply["batch_id"], 30)
        created = [c.form["To"] for c in box.rest.created]
    assert sorted(created) == sorted(numbers(5))  # everyone, once: the unanswered one too
    assert (done["done"], done["failed"]) == (5, 0), done


async def test_a_request_whose_instance_died_is_not_stuck_and_rings_no_one_twice():
    async with sandbox(gateway_api_key=API_KEY, outbound_from=FROM, calls_per_second=50.0) as box:
        store = box.app.state.gateway.dialer.store
        # A request under way right now: its retry is told so.
        await store.remember("/calls:live-1", orjson.dumps({"pending": time.time()}).decode())
        status, body = await post_call(box, "live-1")
        assert (status, body["error"]["code"]) == (409, "in_progress")
        # One whose instance died before it dialled: the retry goes ahead (not 409 for 24 h).
        stale = orjson.dumps({"pending": time.time() - 120}).decode()
        await store.remember("/calls:died-1", stale)
        status, body = await post_call(box, "died-1")
        assert status == 201 and body["call_sid"] == box.rest.created[-1].call_sid
        # One whose instance died just after Twilio made the call: found, not dialled again.
        calls = TwilioCalls(ACCOUNT_SID, box.settings.twilio_auth_token, box.settings.twilio_api_base)
        try:
            made = await calls.create_call(to=TO, from_=FROM, url=box.url + "/twilio/voice")
        finally:
            await calls.close()
        before = len(box.rest.created)
        await store.remember("/calls:died-2", stale)
        status, body = await post_call(box, "died-2")
        assert (status, body) == (201, {"ok": True, "call_sid": made})
        assert len(box.rest.created) == before


async def test_a_claim_left_by_a_store_failure_before_its_dial_is_dialled_not_stuck(monkeypatch):
    """The store fails between a recipient's claim and its dial: the claim, ours and no longer
    in hand, is looked up (no call was made) and dialled, not left claimed for ever."""
    monkeypatch.setattr("gateway.outbound.dialer.STALE_CLAIM_S", 0.3)

    class StoreThatFailsOnce(MemoryOutboundStore):
        failed = False

        async def reserve_start(self, per_second: float) -> float:
            if not self.failed:
                self.failed = True
                raise OSError("store unreachable")
            return await super().reserve_start(per_second)

    created: list[str] = []
    looked_up: list[str] = []

    async def create_call(**fields) -> str:
        created.append(fields["to"])
        return "CA" + "7" * 32

    async def find_call(*, to: str, from_: str, created_after: float) -> str | None:
        looked_up.append(to)
        return None

    store = StoreThatFailsOnce()
    dialer = Dialer(
        store,
        MemoryRegistry(),
        create_call,
        lambda path, query: "https://gw.example.com" + path,
        calls_per_second=100.0,
        max_concurrent=10,
        find_call=find_call,
    )
    spec = BatchSpec([Recipient(TO)], from_=FROM, agent="agent_b")
    await store.create_batch(spec)
    await dialer.start()
    try:
        async with asyncio.timeout(10):
            while not created:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        await dialer.close()
    assert (created, looked_up) == ([TO], [TO])
    (state,) = (await store.batch(spec.batch_id))[1].values()
    assert state["status"] == "dialled"


async def test_two_concurrent_retries_of_a_dead_request_ring_the_person_once():
    async with sandbox(gateway_api_key=API_KEY, outbound_from=FROM, calls_per_second=50.0) as box:
        store = box.app.state.gateway.dialer.store
        await store.remember("/calls:died-3", orjson.dumps({"pending": time.time() - 120}).decode())
        answers = await asyncio.gather(post_call(box, "died-3"), post_call(box, "died-3"))
        assert sorted(status for status, _ in answers) == [201, 409]
        assert len(box.rest.created) == 1
