"""Outbound batches at scale against a real redis-server: a burst of status callbacks is taken
whole (the store's connection pool waits rather than refusing)."""

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from gateway.registry.redis import RedisRegistry
from gateway.sandbox.harness import sandbox
from gateway.sandbox.twilio_rest_fake import AutoProgress
from tests.redis_server import RedisServer, redis_binary
from tests.test_outbound import API_KEY, api, numbers, wait_for_batch

needs_redis = pytest.mark.skipif(redis_binary() is None, reason="redis-server not installed")


def batch_sandbox(server: RedisServer):
    """A gateway on a real Redis, unpaced and uncapped, its Twilio calls ringing briefly."""
    return sandbox(
        registry=RedisRegistry(server.url),
        redis_url=server.url,
        gateway_api_key=API_KEY,
        calls_per_second=1000.0,
        max_concurrent_calls=1000,
        outbound_from="+15550000001",
    )


@needs_redis
async def test_every_status_callback_of_a_1000_call_batch_is_answered_2xx():
    with RedisServer() as server:
        async with batch_sandbox(server) as box:
            box.rest.auto_progress = AutoProgress(ring_s=0.02, talk_s=0.05)
            started = time.monotonic()
            status, reply = await api("POST", box.url + "/calls/batch", {"recipients": numbers(1000)})
            assert status == 202
            done = await wait_for_batch(box.url, reply["batch_id"], 240)
            took = time.monotonic() - started
            # Twilio posts callbacks as calls progress, hundreds at once when a batch's calls
            # end together: the final callbacks of 500 calls again, all at the same moment.
            rest = box.rest
            burst = [rest.post_status(c.call_sid, c.form, "completed") for c in rest.created[:500]]
            await asyncio.gather(*burst)
            answered = list(rest.callbacks_answered)
    assert done["done"] == 1000, done
    assert len(answered) >= 2500  # initiated, in-progress and the outcome for each call, and the burst
    refused = [s for s in answered if not 200 <= s < 300]
    assert refused == [], f"refused callbacks {sorted(set(refused))} (batch took {took:.0f} s)"


async def _redis_work_per_dial(server: RedisServer, n: int) -> tuple[float, float]:
    """Run an n-recipient batch to its end; the Redis commands and bytes out per dial."""
    client = aioredis.Redis.from_url(server.url)
    try:
        await client.flushall()
        async with batch_sandbox(server) as box:
            box.rest.auto_progress = AutoProgress(ring_s=0.02, talk_s=0.05)
            await client.config_resetstat()
            status, reply = await api("POST", box.url + "/calls/batch", {"recipients": numbers(n)})
            assert status == 202
            async with asyncio.timeout(120):  # polled in Redis itself, not through the API
                while await client.sismember("lgw:batches", reply["batch_id"]):  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
            commands = sum(v["calls"] for v in (await client.info("commandstats")).values())
            bytes_out = (await client.info("stats"))["total_net_output_bytes"]
            status, done = await api("GET", box.url + f"/calls/batch/{reply['batch_id']}")
            assert done["done"] == n, done
    finally:
        await client.aclose()
    return commands / n, bytes_out / n


@needs_redis
async def test_a_dial_costs_the_same_redis_work_in_a_batch_of_1000_as_in_one_of_200():
    with RedisServer() as server:
        small = await _redis_work_per_dial(server, 200)
        large = await _redis_work_per_dial(server, 1000)
    commands_200, bytes_200 = small
    commands_1000, bytes_1000 = large
    # Flat: the large batch's dials cost what the small one's do (before: every dial and every
    # sweep read the whole batch, 139 KiB per dial at 1,000 against 28 KiB at 200).
    assert commands_1000 < 1.3 * commands_200, (small, large)
    assert bytes_1000 < 1.3 * bytes_200, (small, large)
    assert bytes_1000 < 4096, large
