"""RedisRegistry against a throwaway redis-server: records, routing, liveness, rate limits, outages."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.registry.base import (
    HEARTBEAT_TTL_S,
    LIVE_TTL_S,
    ROUTE_TIMEOUT_S,
    CallRecord,
    OwnerGone,
    RegistryUnavailable,
    digest,
    new_secret,
)
from gateway.registry.redis import MAX_INFLIGHT_ROUTES, RedisRegistry

try:
    from tests.redis_server import RedisServer, TcpProxy, free_port, redis_binary, redis_server
except ModuleNotFoundError:  # plain `pytest` (not `python -m pytest`): tests/ itself is on sys.path
    from redis_server import RedisServer, TcpProxy, free_port, redis_binary, redis_server  # type: ignore[no-redef]

__all__ = ["redis_server"]  # the fixture, re-exported for pytest

# DESIGN.md: an instance re-registers its live calls within 5 s of Redis answering again.
RECOVERY_S = 5.0

needs_redis = pytest.mark.skipif(redis_binary() is None, reason="redis-server not installed")

MakeRegistry = Callable[..., Awaitable[RedisRegistry]]


def make_record(owner: str, state: str = "ringing") -> CallRecord:
    return CallRecord(
        call_sid="CA" + uuid.uuid4().hex,
        owner=owner,
        state=state,
        from_="+15550001111",
        to="+15550002222",
        agent_id="agent_123",
        direction="inbound",
        token_hash=digest(new_secret()),
        account_sid="AC" + "0" * 32,
        sip_headers={"X-Custom": "v"},
        metadata={"nested": {"list": [1, 2.5, "x"]}},
    )


async def echo(request: dict[str, Any]) -> dict[str, Any]:
    return {"status": 200, "body": {"ok": True, "echo": request}}


async def wait_until(check: Callable[[], Awaitable[bool]], within: float, step: float = 0.05) -> float:
    """Poll until check() is true; returns the seconds it took, fails the test after `within` s."""
    start = time.monotonic()
    while True:
        try:
            if await check():
                return time.monotonic() - start
        except (aioredis.RedisError, OSError):
            pass
        if time.monotonic() - start > within:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(step)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def make(redis_server: RedisServer, prefix: str) -> AsyncIterator[MakeRegistry]:
    """Registries on the session server (or `url=`), closed at teardown."""
    made: list[RedisRegistry] = []

    async def factory(
        handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = echo,
        *,
        url: str | None = None,
        start: bool = True,
        **tunables: float,
    ) -> RedisRegistry:
        registry = RedisRegistry(url or redis_server.url, key_prefix=prefix)
        for name, value in tunables.items():
            setattr(registry, name, value)
        made.append(registry)
        if start and handler is not None:
            await registry.start(handler)
        return registry

    yield factory
    for registry in made:
        await registry.close()


# Records


@needs_redis
async def test_put_get_by_token(make: MakeRegistry, raw: aioredis.Redis, prefix: str) -> None:
    a = await make(start=False)
    record = make_record(a.instance_id)
    await a.put(record, 60)

    assert await a.get(record.call_sid) == record
    assert await a.by_token(record.token_hash) == record
    assert await a.by_token(digest("not a token")) is None
    assert await a.get("CA-unknown") is None
    # Stored as JSON under the call key; the token key maps the hash to the call, same TTL.
    stored = orjson.loads(await raw.get(f"{prefix}call:{record.call_sid}"))
    assert CallRecord.from_dict(stored) == record
    assert await raw.get(f"{prefix}token:{record.token_hash}") == record.call_sid.encode()
    for key in (f"{prefix}call:{record.call_sid}", f"{prefix}token:{record.token_hash}"):
        assert 55_000 < await raw.pttl(key) <= 60_000


@needs_redis
@pytest.mark.parametrize("owned", [True, False], ids=["owned", "foreign"])
async def test_set_state_keeps_ttl(make: MakeRegistry, raw: aioredis.Redis, prefix: str, owned: bool) -> None:
    a = await make(start=False)
    record = make_record(a.instance_id if owned else "gw-elsewhere")
    await a.put(record, 30)
    key = f"{prefix}call:{record.call_sid}"
    await raw.pexpire(key, 20_000)  # make "TTL kept" distinguishable from "TTL reset"

    await a.set_state(record.call_sid, "live")

    got = await a.get(record.call_sid)
    assert got is not None and got.state == "live"
    assert got.metadata == record.metadata and got.started_at == record.started_at
    assert 15_000 < await raw.pttl(key) <= 20_000
    await a.set_state("CA-missing", "live")  # no record: nothing happens, nothing is created
    assert not await raw.exists(f"{prefix}call:CA-missing")


@needs_redis
@pytest.mark.parametrize("owned", [True, False], ids=["owned", "foreign"])
async def test_refresh_and_delete(make: MakeRegistry, raw: aioredis.Redis, prefix: str, owned: bool) -> None:
    a = await make(start=False)
    record = make_record(a.instance_id if owned else "gw-elsewhere")
    await a.put(record, 5)
    keys = (f"{prefix}call:{record.call_sid}", f"{prefix}token:{record.token_hash}")

    await a.refresh(record.call_sid, 100)
    for key in keys:
        assert 95_000 < await raw.pttl(key) <= 100_000

    await a.delete(record.call_sid)
    assert await a.get(record.call_sid) is None
    assert await a.by_token(record.token_hash) is None
    assert await raw.exists(*keys) == 0
    await a.delete(record.call_sid)  # twice is fine


@needs_redis
async def test_records_expire(make: MakeRegistry) -> None:
    a = await make(start=False)
    owned, foreign = make_record(a.instance_id), make_record("gw-elsewhere")
    await a.put(owned, 0.3)
    await a.put(foreign, 0.3)
    assert await a.get(owned.call_sid) is not None
    await asyncio.sleep(0.45)
    for record in (owned, foreign):
        assert await a.get(record.call_sid) is None
        assert await a.by_token(record.token_hash) is None


@needs_redis
async def test_put_with_new_token_retires_old_one(make: MakeRegistry) -> None:
    a = await make(start=False)
    record = make_record(a.instance_id)
    await a.put(record, 60)
    old_hash, record.token_hash = record.token_hash, digest(new_secret())
    await a.put(record, 60)
    assert await a.by_token(old_hash) is None
    assert await a.by_token(record.token_hash) == record


@needs_redis
async def test_other_instances_see_records(make: MakeRegistry) -> None:
    a, b = await make(), await make()
    record = make_record(a.instance_id)
    await a.put(record, 60)
    assert await b.by_token(record.token_hash) == record
    assert await b.get(record.call_sid) == record
    foreign = make_record(a.instance_id)
    await b.put(foreign, 60)  # a record for another owner: stored in Redis only
    assert await a.get(foreign.call_sid) == foreign
    await b.set_state(record.call_sid, "transferring")
    assert (await a.get(record.call_sid)).state == "transferring"  # type: ignore[union-attr]


# Routing


@needs_redis
async def test_route_reaches_the_owner(make: MakeRegistry) -> None:
    async def handler_a(request: dict[str, Any]) -> dict[str, Any]:
        return {"status": 200, "body": {"ok": True, "by": "a", "echo": request}}

    a = await make(handler_a)
    b = await make()
    request = {"call_sid": "CA1", "payload": {"action": "end_call"}}
    reply = await b.route(a.instance_id, request)
    assert reply == {"status": 200, "body": {"ok": True, "by": "a", "echo": request}}
    assert await a.route(a.instance_id, request) == reply  # to itself: straight to the handler


@needs_redis
async def test_route_handlers_run_concurrently_and_errors_answer_500(make: MakeRegistry) -> None:
    async def handler(request: dict[str, Any]) -> dict[str, Any]:
        if request["kind"] == "slow":
            await asyncio.sleep(1.5)
        if request["kind"] == "boom":
            raise RuntimeError("handler bug")
        return {"status": 200, "body": {"kind": request["kind"]}}

    a, b = await make(handler), await make()
    slow = asyncio.create_task(b.route(a.instance_id, {"kind": "slow"}))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    assert await b.route(a.instance_id, {"kind": "fast"}) == {"status": 200, "body": {"kind": "fast"}}
    assert time.monotonic() - started < 0.5, "a slow action must not hold up others"
    boom = await b.route(a.instance_id, {"kind": "boom"})
    assert boom is not None and boom["status"] == 500 and boom["body"]["ok"] is False
    assert await slow == {"status": 200, "body": {"kind": "slow"}}


@needs_redis
async def test_route_to_unknown_owner_raises_owner_gone_at_once(make: MakeRegistry) -> None:
    b = await make()
    started = time.monotonic()
    with pytest.raises(OwnerGone):
        await b.route("gw-nobody", {"call_sid": "CA1"})
    assert time.monotonic() - started < 0.5  # nobody subscribed: no point waiting


@needs_redis
async def test_route_to_silent_owner_times_out(make: MakeRegistry) -> None:
    never = asyncio.Event()

    async def stuck(_request: dict[str, Any]) -> dict[str, Any]:
        await never.wait()
        return {}

    a, b = await make(stuck), await make()
    started = time.monotonic()
    assert await b.route(a.instance_id, {"call_sid": "CA1"}) is None
    elapsed = time.monotonic() - started
    assert ROUTE_TIMEOUT_S - 0.1 <= elapsed <= ROUTE_TIMEOUT_S + 0.6


@needs_redis
async def test_route_overload_and_malformed_messages(
    make: MakeRegistry, raw: aioredis.Redis, prefix: str
) -> None:
    release = asyncio.Event()

    async def blocked(request: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        return {"status": 200, "body": {"n": request["n"]}}

    a = await make(blocked)
    channel = f"{prefix}route:{a.instance_id}"
    # Garbage is logged and ignored; so is a reply key outside the registry's namespace.
    for junk in (b"not json", b"[]", b'{"reply_to": 1, "request": {}}', b'{"request": {}}',
                 orjson.dumps({"reply_to": "somebody:else", "request": {"n": 0}}),
                 orjson.dumps({"reply_to": f"{prefix}reply:x", "request": "not an object"})):  # fmt: skip
        assert await raw.publish(channel, junk) == 1

    n = MAX_INFLIGHT_ROUTES + 1
    keys = [f"{prefix}reply:test:{i}" for i in range(n)]
    for i, key in enumerate(keys):
        await raw.publish(channel, orjson.dumps({"reply_to": key, "request": {"n": i}}))
    # The one beyond the bound is turned away at once instead of queueing.
    popped = await raw.blpop([keys[-1]], timeout=2)
    assert popped is not None
    busy = orjson.loads(popped[1])
    assert busy["status"] == 503 and busy["body"]["error"]["code"] == "owner_busy"
    release.set()
    for i, key in enumerate(keys[:-1]):
        popped = await raw.blpop([key], timeout=2)
        assert popped is not None and orjson.loads(popped[1]) == {"status": 200, "body": {"n": i}}
    assert not await raw.exists("somebody:else")


# Liveness


@needs_redis
async def test_owner_alive_follows_heartbeat_and_close(
    make: MakeRegistry, raw: aioredis.Redis, prefix: str
) -> None:
    a, b = await make(), await make()
    assert await b.owner_alive(a.instance_id)
    assert await a.owner_alive(a.instance_id)
    assert not await b.owner_alive("gw-nobody")
    assert 0 < await raw.pttl(f"{prefix}instance:{a.instance_id}") <= HEARTBEAT_TTL_S * 1000
    await a.close()
    assert not await b.owner_alive(a.instance_id)
    assert not await raw.exists(f"{prefix}instance:{a.instance_id}")


@needs_redis
async def test_owner_alive_false_once_heartbeat_expires(make: MakeRegistry) -> None:
    a = await make(heartbeat_interval_s=0.2, heartbeat_ttl_s=0.6)
    b = await make()
    await asyncio.sleep(0.7)  # beats keep it alive past one TTL
    assert await b.owner_alive(a.instance_id)
    assert a._beat_task is not None
    a._beat_task.cancel()  # the instance hangs or dies without saying goodbye
    await asyncio.sleep(0.8)
    assert not await b.owner_alive(a.instance_id)


@needs_redis
async def test_heartbeat_keeps_live_calls_not_ringing_ones(
    make: MakeRegistry, raw: aioredis.Redis, prefix: str
) -> None:
    a = await make(heartbeat_interval_s=0.1)
    live, ringing = make_record(a.instance_id, state="live"), make_record(a.instance_id)
    await a.put(live, LIVE_TTL_S)
    await a.put(ringing)  # RINGING_TTL_S: forgotten unless the media arrives
    for record in (live, ringing):
        await raw.pexpire(f"{prefix}call:{record.call_sid}", 1000)
        await raw.pexpire(f"{prefix}token:{record.token_hash}", 1000)
    await asyncio.sleep(0.35)
    assert await raw.pttl(f"{prefix}call:{live.call_sid}") > (LIVE_TTL_S - 5) * 1000
    assert await raw.pttl(f"{prefix}token:{live.token_hash}") > (LIVE_TTL_S - 5) * 1000
    assert await raw.pttl(f"{prefix}call:{ringing.call_sid}") < 1000


@needs_redis
async def test_close_leaves_no_task_running(make: MakeRegistry) -> None:
    a = await make()
    b = await make()
    await b.route(a.instance_id, {"x": 1})
    tasks = {a._beat_task, a._sub_task}
    await a.close()
    await a.close()  # idempotent
    assert all(t is not None and t.done() for t in tasks)
    assert not a._inflight and not a._overflow
    mine = [t for t in asyncio.all_tasks() if a.instance_id in t.get_name()]
    assert mine == []


@needs_redis
async def test_ready(make: MakeRegistry) -> None:
    a = await make(start=False)
    assert await a.ready()
    dead = await make(start=False, url=f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    assert await dead.ready() is False
    assert time.monotonic() - started < 1.0


# Rate limiting


@needs_redis
async def test_rate_limit_is_shared_between_instances(make: MakeRegistry) -> None:
    a, b = await make(start=False), await make(start=False)
    results = [await (a if i % 2 else b).hit("rate:tok", 20, 10) for i in range(21)]
    assert results == [True] * 20 + [False]
    assert not await a.hit("rate:tok", 20, 10)
    assert await b.hit("rate:other", 20, 10)  # keys are independent


@needs_redis
async def test_rate_limit_window_slides(make: MakeRegistry) -> None:
    a, b = await make(start=False), await make(start=False)
    assert [await a.hit("k", 2, 0.4), await b.hit("k", 2, 0.4), await a.hit("k", 2, 0.4)] == [
        True,
        True,
        False,
    ]
    await asyncio.sleep(0.45)
    assert await b.hit("k", 2, 0.4)


# Outages


@needs_redis
async def test_outage_then_restart_reregisters_within_5s(prefix: str) -> None:
    with RedisServer() as server:
        a = RedisRegistry(server.url, key_prefix=prefix)
        b = RedisRegistry(server.url, key_prefix=prefix)
        checker = aioredis.Redis.from_url(server.url)
        try:
            await a.start(echo)
            await b.start(echo)
            live = make_record(a.instance_id, state="live")
            ringing = make_record(a.instance_id)
            await a.put(live, LIVE_TTL_S)
            await a.put(ringing)
            assert await b.route(a.instance_id, {"n": 1}) is not None

            server.stop()

            # Reads of our own calls answer from memory, quickly.
            started = time.monotonic()
            assert await a.get(live.call_sid) == live
            assert await a.by_token(live.token_hash) == live
            assert time.monotonic() - started < 1.0
            # Writes do not raise.
            await a.set_state(live.call_sid, "ending")
            await a.refresh(live.call_sid, LIVE_TTL_S)
            await a.delete(ringing.call_sid)
            late = make_record(a.instance_id)
            await a.put(late, LIVE_TTL_S)
            assert (await a.get(live.call_sid)).state == "ending"  # type: ignore[union-attr]
            assert await a.get(ringing.call_sid) is None
            # What cannot be answered or kept anywhere says so.
            with pytest.raises(RegistryUnavailable):
                await b.get(live.call_sid)
            with pytest.raises(RegistryUnavailable):
                await a.put(make_record("gw-elsewhere"))
            assert await a.hit("rate:x", 1, 10) and not await a.hit("rate:x", 1, 10)  # local fallback
            assert await a.ready() is False
            assert await b.route(a.instance_id, {"n": 2}) is None
            await asyncio.sleep(1.0)  # let the loops back off a little

            server.start()
            restarted = time.monotonic()

            async def reregistered() -> bool:
                raw = await checker.get(f"{prefix}call:{live.call_sid}")
                return raw is not None and orjson.loads(raw)["state"] == "ending"

            await wait_until(reregistered, RECOVERY_S)
            assert await checker.get(f"{prefix}token:{live.token_hash}") == live.call_sid.encode()
            assert (
                await checker.exists(f"{prefix}call:{late.call_sid}", f"{prefix}token:{late.token_hash}") == 2
            )
            assert not await checker.exists(f"{prefix}call:{ringing.call_sid}")
            assert 0 < await checker.pttl(f"{prefix}call:{live.call_sid}") <= LIVE_TTL_S * 1000

            async def routable() -> bool:
                return await b.route(a.instance_id, {"n": 3}) is not None

            await wait_until(routable, RECOVERY_S - (time.monotonic() - restarted))
            assert await b.owner_alive(a.instance_id)
            assert await b.by_token(live.token_hash) == await a.get(live.call_sid)
            assert time.monotonic() - restarted < RECOVERY_S
        finally:
            await a.close()
            await b.close()
            await checker.aclose()


@needs_redis
async def test_partition_replays_deferred_writes_and_deletes(redis_server: RedisServer, prefix: str) -> None:
    """Redis keeps its data but this instance loses it for a while: what it did meanwhile lands."""
    proxy = await TcpProxy(redis_server.port).start()
    a = RedisRegistry(proxy.url, key_prefix=prefix)
    checker = aioredis.Redis.from_url(redis_server.url)
    try:
        await a.start(echo)
        kept, ended = make_record(a.instance_id), make_record(a.instance_id)
        await a.put(kept, LIVE_TTL_S)
        await a.put(ended, LIVE_TTL_S)

        await proxy.cut()
        await a.set_state(kept.call_sid, "live")
        await a.delete(ended.call_sid)
        assert (await a.get(kept.call_sid)).state == "live"  # type: ignore[union-attr]
        assert await a.by_token(ended.token_hash) is None
        # Redis itself never heard of either change.
        assert orjson.loads(await checker.get(f"{prefix}call:{kept.call_sid}"))["state"] == "ringing"
        assert await checker.exists(f"{prefix}call:{ended.call_sid}")

        await proxy.restore()

        async def replayed() -> bool:
            raw = await checker.get(f"{prefix}call:{kept.call_sid}")
            gone = not await checker.exists(
                f"{prefix}call:{ended.call_sid}", f"{prefix}token:{ended.token_hash}"
            )
            return gone and raw is not None and orjson.loads(raw)["state"] == "live"

        await wait_until(replayed, RECOVERY_S)
    finally:
        await a.close()
        await proxy.close()
        await checker.aclose()


@needs_redis
async def test_data_loss_without_errors_is_healed(
    make: MakeRegistry, raw: aioredis.Redis, prefix: str
) -> None:
    """Redis restarts between two commands (or fails over, or is flushed): no error is seen, but
    the keys are gone. The owner still answers for its calls and puts them back."""
    a, b = await make(), await make()
    mine, deleted_elsewhere = make_record(a.instance_id), make_record(a.instance_id)
    await a.put(mine, LIVE_TTL_S)
    await a.put(deleted_elsewhere, LIVE_TTL_S)
    # Another instance ends one of a's calls (e.g. Twilio's status callback landed there):
    # Redis is right, a's memory is stale, and a must believe Redis.
    await b.delete(deleted_elsewhere.call_sid)
    assert await a.get(deleted_elsewhere.call_sid) is None

    for key in await raw.keys(f"{prefix}*"):
        await raw.delete(key)
    assert await a.get(mine.call_sid) == mine
    assert await a.by_token(mine.token_hash) == mine

    async def healed() -> bool:
        return bool(
            await raw.exists(f"{prefix}call:{mine.call_sid}", f"{prefix}token:{mine.token_hash}") == 2
        )

    await wait_until(healed, RECOVERY_S)
    assert await b.owner_alive(a.instance_id)


@needs_redis
async def test_a_read_during_the_resync_after_lost_data_never_loses_a_live_record(
    make: MakeRegistry, raw: aioredis.Redis, prefix: str
) -> None:
    """Redis lost its data; while the resync replays deferred deletes, a control POST reads the
    call: it is answered from the mirror, and the record is restored and stays."""
    registry = await make()
    record = make_record(registry.instance_id, "live")
    await registry.put(record, LIVE_TTL_S)
    for key in await raw.keys(prefix + "*"):  # what a restart without persistence leaves
        await raw.delete(key)
    registry._tombstones["CAold"] = "tok_old"  # a delete deferred from an earlier outage
    replay = registry._delete_keys

    async def slow_replay(*args: Any) -> None:  # each replayed delete is a round trip
        await asyncio.sleep(0.2)
        await replay(*args)

    registry._delete_keys = slow_replay  # type: ignore[method-assign]
    registry._wake.set()  # the next heartbeat notices, and resyncs
    await asyncio.sleep(0.05)
    found = await registry.by_token(record.token_hash)
    assert found is not None and found.call_sid == record.call_sid
    await wait_until(lambda: raw.exists(f"{prefix}call:{record.call_sid}"), within=3)
    await asyncio.sleep(0.5)
    assert await raw.exists(f"{prefix}call:{record.call_sid}")
    assert (await registry.by_token(record.token_hash)) is not None
