"""`line-gateway doctor` and `setup-number` against the real things: the gateway served over TLS
at https://gateway.test (a self-signed certificate trusted through SSL_CERT_FILE, as a public CA's
would be; the name pinned to 127.0.0.1 with `--resolve`, as before a DNS cut-over), the Twilio
REST fake, the agent emulator (which checks the API key) and a throwaway redis-server."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway import doctor
from gateway.app import create_app
from gateway.sandbox.agent import AgentBehaviour, AgentEmulator
from gateway.sandbox.servers import free_port, serve
from gateway.sandbox.twilio_rest_fake import TwilioRestFake
from gateway.settings import Settings
from tests.redis_server import RedisServer

ACCOUNT_SID = "AC" + "d0" * 16
ROUTED = "+15550001111"  # in AGENT_ROUTES, pointed at the gateway
ELSEWHERE = "+15550002222"  # pointed at another app
REPO = Path(__file__).resolve().parent.parent
HOST = "gateway.test"  # reserved for tests (RFC 6761): never a real host
PIN = {HOST: "127.0.0.1"}


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={HOST}",
         "-addext", f"subjectAltName=DNS:{HOST}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class World:
    env: dict[str, str]  # the doctor's environment: everything right
    rest: TwilioRestFake
    agent: AgentEmulator
    redis: RedisServer
    public_url: str
    cert: Path

    def settings(self, **changes: str) -> Settings:
        return Settings.from_env({**self.env, **changes})


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    token = secrets.token_hex(16)
    rest = TwilioRestFake(ACCOUNT_SID, token)
    api_key = "sk_doctor_" + secrets.token_hex(8)
    agent = AgentEmulator(AgentBehaviour(greeting_s=1.0), api_key=api_key)
    port = free_port()
    public_url = f"https://{HOST}:{port}"
    with RedisServer() as redis_server:
        async with serve(rest.app) as rest_url, agent.running():
            env = {
                "PUBLIC_URL": public_url,
                "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
                "TWILIO_AUTH_TOKEN": token,
                "TWILIO_API_BASE": rest_url,
                "CARTESIA_API_KEY": api_key,
                "CARTESIA_AGENT_ID": "agent_default",
                "CARTESIA_URL": agent.url,
                "REDIS_URL": redis_server.url,
                "AGENT_ROUTES": json.dumps({ROUTED: "agent_routed"}),
            }
            app = create_app(Settings.from_env(env))
            async with serve(app, port, ssl_certfile=str(cert), ssl_keyfile=str(key)):
                rest.account.add_number(
                    ROUTED,
                    voice_url=f"{public_url}/twilio/voice",
                    status_callback=f"{public_url}/twilio/status",
                )
                rest.account.add_number(ELSEWHERE, voice_url="https://elsewhere.example.com/voice")
                yield World(env, rest, agent, redis_server, public_url, cert)


@pytest.fixture(autouse=True)
def trusted(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The doctor trusts the test certificate as it would a public CA's."""
    monkeypatch.setenv("SSL_CERT_FILE", str(world.cert))


async def run_doctor(settings: Settings, *numbers: str) -> tuple[int, str]:
    out = io.StringIO()
    code = await doctor.run(settings, list(numbers), out, agent_wait_s=3.0, resolve=PIN)
    return code, out.getvalue()


def lines(report: str, status: str) -> list[str]:
    return [line.strip() for line in report.splitlines() if line.strip().startswith(status + " ")]


def subprocess_env(world: World, **changes: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "CARTESIA_", "REDIS_"))}
    keep.pop("PUBLIC_URL", None)
    return {**keep, **world.env, "SSL_CERT_FILE": str(world.cert), **changes}


async def line_gateway(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """The real command in its own process (the servers keep running in this loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_doctor_passes_when_all_is_well(world: World):
    code, out, err = await line_gateway(subprocess_env(world), "doctor", "--resolve", f"{HOST}:127.0.0.1")
    assert code == 0, out + err
    assert lines(out, "FAIL") == []
    ok = "\n".join(lines(out, "OK"))
    assert "PUBLIC_URL: " in ok and "trusted certificate" in ok
    assert "signed webhook: the gateway accepts webhooks signed with TWILIO_AUTH_TOKEN" in ok
    assert f"Twilio credentials: account {ACCOUNT_SID[:6]}" in ok and "is active, via api.twilio.com" in ok
    assert f"number {ROUTED}: Voice URL and status callback point at this gateway" in ok
    for agent_id in ("agent_default", "agent_routed"):  # CARTESIA_AGENT_ID and AGENT_ROUTES'
        assert re.search(
            rf"agent {agent_id}: ack in \d+ ms, first audio \d+ ms after the ack; it speaks mu-law 8 kHz",
            ok,
        ), ok
    assert "Redis: redis://127.0.0.1:" in ok and "maxmemory-policy noeviction" in ok
    assert world.rest.auth_token not in out + err  # Twilio's account fetch returns it
    assert "All checks passed" in out


async def test_bad_twilio_credentials_fail_with_the_fix(world: World):
    code, out, _ = await line_gateway(
        subprocess_env(world, TWILIO_AUTH_TOKEN="0" * 32), "doctor", "--resolve", f"{HOST}:127.0.0.1"
    )
    assert code == 1
    failed = "\n".join(lines(out, "FAIL"))
    assert "Twilio credentials: api.twilio.com refused them (HTTP 401, code 20003)" in failed
    assert "fix: copy the Account SID and Auth Token again from the Twilio console" in out
    # and the running gateway, which has the real token, refuses webhooks signed with this one
    assert "signed webhook: the gateway at" in failed and "another TWILIO_AUTH_TOKEN" in failed
    assert "SKIP  numbers: the Twilio credentials did not work" in out


async def test_a_number_pointed_elsewhere_fails_and_names_setup_number(world: World):
    code, out = await run_doctor(world.settings(), ELSEWHERE)
    assert code == 1
    (failed,) = lines(out, "FAIL")
    assert failed.startswith(
        f"FAIL  number {ELSEWHERE}: its Voice URL is https://elsewhere.example.com/voice"
    )
    assert f"not {world.public_url}/twilio/voice" in failed and "its status callback is not set" in failed
    assert f"fix: line-gateway setup-number {ELSEWHERE}" in out
    assert f"OK    number {ROUTED}" in out  # AGENT_ROUTES' number is still checked


async def test_with_no_number_named_the_account_is_listed_and_one_must_point_here(world: World):
    code, out = await run_doctor(world.settings(AGENT_ROUTES=""))
    assert code == 0, out
    assert f"OK    number {ROUTED}: points at this gateway" in out
    assert f"SKIP  number {ELSEWHERE}: points elsewhere" in out
    code, out = await run_doctor(world.settings(AGENT_ROUTES="", PUBLIC_URL="https://gw.example.com"))
    assert "FAIL  numbers: none of the account's 2 numbers points at https://gw.example.com/" in out


async def test_an_agent_that_refuses_the_key_fails(world: World):
    code, out = await run_doctor(world.settings(CARTESIA_API_KEY="sk_wrong"))
    assert code == 1
    failed = lines(out, "FAIL")
    assert len(failed) == 2  # both agents, and nothing else
    assert all("refused the API key" in f and "(HTTP 401)" in f for f in failed)
    assert "fix: set CARTESIA_API_KEY to a valid key" in out


async def test_an_agent_speaking_another_format_than_configured_fails(world: World):
    code, out = await run_doctor(world.settings(CARTESIA_OUTPUT_FORMAT="pcm_24000", AGENT_ROUTES=""))
    assert code == 1
    (failed,) = lines(out, "FAIL")
    assert "agent agent_default" in failed
    assert "it speaks mu-law 8 kHz, but CARTESIA_OUTPUT_FORMAT=pcm_24000" in failed
    assert "fix: set CARTESIA_OUTPUT_FORMAT to mulaw_8000" in out


async def test_redis_down_fails(world: World):
    down = RedisServer()  # a port nobody listens on
    code, out = await run_doctor(world.settings(REDIS_URL=down.url))
    down.close()
    assert code == 1
    (failed,) = lines(out, "FAIL")
    assert failed.startswith(f"FAIL  Redis: cannot reach redis://127.0.0.1:{down.port}/0")
    assert "fix: start Redis, or correct REDIS_URL" in out


async def test_a_redis_that_would_evict_call_records_fails(world: World):
    client = aioredis.from_url(world.redis.url)
    try:
        await client.config_set("maxmemory-policy", "volatile-lru")
        code, out = await run_doctor(world.settings())
        assert "WARN  Redis:" in out and "evicts nothing while maxmemory is 0" in out
        assert code == 0
        await client.config_set("maxmemory", "64mb")
        code, out = await run_doctor(world.settings())
        assert code == 1
        (failed,) = lines(out, "FAIL")
        assert "maxmemory-policy volatile-lru with maxmemory 67108864 bytes evicts" in failed
        assert "fix: CONFIG SET maxmemory-policy noeviction" in out
    finally:
        await client.config_set("maxmemory", "0")
        await client.config_set("maxmemory-policy", "noeviction")
        await client.aclose()


async def test_an_http_public_url_fails_with_the_fix(world: World):
    code, out = await run_doctor(world.settings(PUBLIC_URL="http://gw.example.com"))
    assert code == 1
    assert "FAIL  PUBLIC_URL: http://gw.example.com is not https://" in out
    assert "fix: terminate TLS in front of the gateway" in out


async def test_an_untrusted_certificate_fails(world: World, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SSL_CERT_FILE")
    code, out = await run_doctor(world.settings())
    assert code == 1
    assert "FAIL  PUBLIC_URL: " in out and "its TLS certificate is not trusted" in out


async def test_a_suspended_account_fails(world: World):
    world.rest.account.status = "suspended"
    try:
        code, out = await run_doctor(world.settings())
    finally:
        world.rest.account.status = "active"
    assert code == 1
    assert f"FAIL  Twilio credentials: account {ACCOUNT_SID[:6]}" in out and "is suspended" in out


async def test_setup_number_points_a_number_here_and_doctor_then_passes(world: World):
    sid = world.rest.account.add_number(
        "+15550003333", voice_url="https://old.example.com/voice", voice_application_sid="AP" + "1" * 32
    )
    env = subprocess_env(world)
    code, out, err = await line_gateway(env, "setup-number", "+15550003333", "--agent", "a1")
    assert code == 0, out + err
    number = world.rest.account.numbers[sid]
    assert number["voice_url"] == f"{world.public_url}/twilio/voice?agent=a1"
    assert number["voice_method"] == "POST"
    assert number["status_callback"] == f"{world.public_url}/twilio/status"
    assert number["status_callback_method"] == "POST"
    assert number["voice_application_sid"] == ""  # a TwiML App would take the calls instead
    assert "before: Voice URL https://old.example.com/voice" in out
    code, report = await run_doctor(world.settings(), "+15550003333")
    assert code == 0, report
    assert "agent a1: ack in" in report  # the agent its Voice URL names is checked too
    code, _, err = await line_gateway(subprocess_env(world), "setup-number", "+15559999999")
    assert code == 1 and "is not a number of account" in err
    code, _, err = await line_gateway(
        subprocess_env(world, PUBLIC_URL="http://127.0.0.1:1"), "setup-number", "+15550003333"
    )
    assert code == 2 and "set it to the https:// origin Twilio reaches" in err


async def test_doctor_settings_check_reports_what_serve_warns_of(world: World):
    broken = dataclasses.replace(world.settings(), twilio_auth_token="")
    code, out = await run_doctor(broken)
    assert code == 1
    assert "FAIL  settings: TWILIO_AUTH_TOKEN is not set" in out
    assert "SKIP  signed webhook: TWILIO_AUTH_TOKEN is not set" in out
