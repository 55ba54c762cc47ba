"""Outbound batches at scale against a real redis-server: a burst of status callbacks is taken
whole (the store's connection pool waits rather than refusing)."""

import asyncio
import time

import pytest

from gateway.registry.redis import RedisRegistry
from gateway.sandbox.harness import sandbox
from gateway.sandbox.twilio_rest_fake import AutoProgress
from tests.redis_server import RedisServer, redis_binary
from tests.test_outbound import API_KEY, api, numbers, wait_for_batch

needs_redis = pytest.mark.skipif(redis_binary() is None, reason="redis-server not installed")


@needs_redis
async def test_every_status_callback_of_a_1000_call_batch_is_answered_2xx():
    with RedisServer() as server:
        async with sandbox(
            registry=RedisRegistry(server.url),
            redis_url=server.url,
            gateway_api_key=API_KEY,
            calls_per_second=1000.0,
            max_concurrent_calls=1000,
            outbound_from="+15550000001",
        ) as box:
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
    assert [s for s in answered if not 200 <= s < 300] == [], f"refused callbacks (batch took {took:.0f} s)"
