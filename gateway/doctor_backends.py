"""`doctor`'s checks of what the gateway talks to besides Twilio: the Line agents (a real Calls
API session each) and Redis.

Agent: the session is opened as a call's is (gateway.agents.cartesia), with silence for caller
audio; reported are the time to the `ack`, the time from the ack to the agent's first audio,
and the encoding that audio is in (gateway.format_sniff), against CARTESIA_OUTPUT_FORMAT. An
agent that says nothing within the wait is a warning: some wait for the caller to speak.

Redis: reachable, version 6.2 or newer (the registry uses SET ... GET and KEEPTTL), and an
eviction policy that cannot drop the gateway's keys. Every key the gateway writes has a TTL
(call records, control-token hashes, heartbeats), so the volatile-* policies evict them as
readily as allkeys-*: only noeviction is safe once maxmemory is set. With no maxmemory nothing
is evicted, which is a warning (a limit set later would start evicting).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.agents.cartesia import AgentConfig, AgentUnavailable, CartesiaAgent, agent_http_session
from gateway.audio import OUTPUT_FORMATS
from gateway.events import AgentAudio
from gateway.format_sniff import SNIFF_BYTES, looks_like
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.doctor import Report

SILENCE_FRAME = base64.b64encode(b"\xff" * 160).decode()  # 20 ms of mu-law silence
MAX_SNIFF_WINDOWS = 25
MIN_REDIS = (6, 2)
REDIS_TIMEOUT_S = 3.0


def _agents(s: Settings, from_numbers: list[str]) -> list[str]:
    ids = [s.cartesia_agent_id, *(r["agent"] for r in s.agent_routes.values()), *from_numbers]
    return [a for a in dict.fromkeys(ids) if a]


async def check_agents(s: Settings, report: Report, from_numbers: list[str], wait_s: float) -> None:
    agents = _agents(s, from_numbers)
    if not agents:
        report.add(
            "FAIL",
            "agent",
            "no agent to check: CARTESIA_AGENT_ID and AGENT_ROUTES are empty",
            "set CARTESIA_AGENT_ID to your Line agent's id",
        )
        return
    config = AgentConfig(s.cartesia_url, s.cartesia_api_key, s.cartesia_version)
    async with agent_http_session() as http:
        for agent_id in agents:
            await _check_agent(s, report, http, config, agent_id, wait_s)


async def _check_agent(
    s: Settings,
    report: Report,
    http: aiohttp.ClientSession,
    config: AgentConfig,
    agent_id: str,
    wait_s: float,
) -> None:
    name = f"agent {agent_id}"
    started = time.monotonic()
    metadata = {"from": "", "to": "", "direction": "inbound", "line_gateway_doctor": True}
    try:
        agent = await CartesiaAgent.open(
            http, config, agent_id, stream_id="doctor-" + secrets.token_hex(6), metadata=metadata
        )
    except AgentUnavailable as exc:
        if exc.status in (401, 403):
            fix = "set CARTESIA_API_KEY to a valid key of the organisation that owns the agent"
        elif exc.status == 404:
            fix = "check the agent id (CARTESIA_AGENT_ID, AGENT_ROUTES, ?agent=) and CARTESIA_URL"
        else:
            fix = f"check CARTESIA_URL ({s.cartesia_url}) and that the agent is deployed"
        report.add("FAIL", name, str(exc), fix)
        return
    ack_s = time.monotonic() - started
    try:
        first_s, heard = await _listen(agent, wait_s)
    finally:
        await agent.close(1000, "line-gateway doctor done")
    report.add(*_verdict(s, name, agent.output_format, ack_s, first_s, heard, wait_s))


async def _listen(agent: CartesiaAgent, wait_s: float) -> tuple[float | None, str | None]:
    """Silence to the agent every 20 ms, until its first audio and a verdict on its encoding:
    (seconds from the ack to the first audio, "mulaw" / "pcm" / None)."""
    acked = time.monotonic()
    first: float | None = None
    sniffed = bytearray()
    windows = MAX_SNIFF_WINDOWS

    async def talk() -> None:
        while True:
            await agent.send_audio(SILENCE_FRAME)
            await asyncio.sleep(0.02)

    talker = asyncio.create_task(talk())
    try:
        async with asyncio.timeout(wait_s):
            async for event in agent.events():
                if not isinstance(event, AgentAudio):
                    continue
                if first is None:
                    first = time.monotonic() - acked
                sniffed += base64.b64decode(event.payload)
                if len(sniffed) >= SNIFF_BYTES:
                    heard = looks_like(bytes(sniffed))
                    sniffed.clear()
                    windows -= 1
                    if heard or not windows:
                        return first, heard
    except TimeoutError:
        pass
    finally:
        talker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await talker
    return first, None


def _verdict(
    s: Settings,
    name: str,
    acked_as: str,
    ack_s: float,
    first_s: float | None,
    heard: str | None,
    wait_s: float,
) -> tuple[str, str, str, str]:
    setting = s.cartesia_output_format
    timing = f"ack in {ack_s * 1000:.0f} ms"
    if first_s is None:
        return (
            "WARN",
            name,
            f"{timing}; it said nothing within {wait_s:g} s, so its audio format was not checked "
            "(an agent that waits for the caller to speak first is fine)",
            "",
        )
    timing += f", first audio {first_s * 1000:.0f} ms after the ack"
    if acked_as and acked_as != setting:
        return (
            "WARN",
            name,
            f"{timing}; its ack says it speaks {acked_as}, CARTESIA_OUTPUT_FORMAT says {setting} "
            "(the gateway follows the ack)",
            f"set CARTESIA_OUTPUT_FORMAT={acked_as}",
        )
    expected = OUTPUT_FORMATS[setting][0]
    if heard is None:
        return ("OK", name, f"{timing}; its audio was too quiet or short to tell its encoding", "")
    if heard != expected:
        spoken = "mu-law 8 kHz" if heard == "mulaw" else "16-bit PCM"
        fix = "mulaw_8000" if heard == "mulaw" else "the agent's pcm_* rate (pcm_16000, pcm_24000, pcm_44100)"
        return (
            "FAIL",
            name,
            f"{timing}; it speaks {spoken}, but CARTESIA_OUTPUT_FORMAT={setting}: callers would hear noise",
            f"set CARTESIA_OUTPUT_FORMAT to {fix}",
        )
    spoken = "mu-law 8 kHz" if heard == "mulaw" else "16-bit PCM (its rate cannot be told from the audio)"
    return ("OK", name, f"{timing}; it speaks {spoken}, as CARTESIA_OUTPUT_FORMAT={setting} says", "")


def _where(url: str) -> str:
    """REDIS_URL without its password."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


async def check_redis(s: Settings, report: Report) -> None:
    if not s.redis_url:
        report.add("SKIP", "Redis", "REDIS_URL is not set: the embedded registry serves one instance")
        return
    where = _where(s.redis_url)
    client = aioredis.from_url(
        s.redis_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
    )
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S * 2):
            await client.ping()
            server = await client.info("server")
            memory = await client.info("memory")
    except (RedisError, OSError, TimeoutError) as exc:
        report.add(
            "FAIL",
            "Redis",
            f"cannot reach {where}: {type(exc).__name__}: {exc}",
            "start Redis, or correct REDIS_URL (redis://[:password@]host:port/db, rediss:// for TLS)",
        )
        return
    finally:
        await client.aclose()
    version = str(server.get("redis_version", "0"))
    numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if numbers < MIN_REDIS:
        report.add("FAIL", "Redis", f"{where} runs Redis {version}; the gateway needs 6.2 or newer",
                   "upgrade Redis to 6.2 or newer")  # fmt: skip
        return
    policy = str(memory.get("maxmemory_policy", "unknown"))
    limit = int(memory.get("maxmemory", 0) or 0)
    if policy == "noeviction":
        report.add("OK", "Redis", f"{where} answers, Redis {version}, maxmemory-policy noeviction")
    elif not limit:
        report.add(
            "WARN",
            "Redis",
            f"{where} answers, Redis {version}; maxmemory-policy {policy} evicts nothing while "
            "maxmemory is 0, but would evict call records once a limit is set",
            "CONFIG SET maxmemory-policy noeviction (or your provider's setting)",
        )
    else:
        report.add(
            "FAIL",
            "Redis",
            f"{where}: maxmemory-policy {policy} with maxmemory {limit} bytes evicts the gateway's "
            "call records and control tokens when memory fills (every one has a TTL, so volatile-* "
            "policies take them too)",
            "CONFIG SET maxmemory-policy noeviction (or your provider's setting), "
            "and give Redis room for the calls",
        )
