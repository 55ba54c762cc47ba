"""Start-up tells the truth: the real `line-gateway` command in a subprocess where it matters
(help, --version, what `serve` says and does at start, one-line errors, `simulate`'s words),
and /readyz's reasons."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path

import aiohttp
import pytest

from gateway.cli import parser
from gateway.registry.redis import RedisRegistry
from gateway.sandbox.caller import SimulatedCall
from gateway.sandbox.harness import sandbox
from gateway.sandbox.servers import free_port
from tests.redis_server import RedisServer

REPO = Path(__file__).resolve().parent.parent
TOKEN = "f" * 32
GOOD = {  # everything `serve` needs not to refuse every call; no PUBLIC_URL, no agent
    "TWILIO_ACCOUNT_SID": "AC" + "c1" * 16,
    "TWILIO_AUTH_TOKEN": TOKEN,
    "CARTESIA_API_KEY": "sk_cli_test",
    "CARTESIA_URL": "ws://127.0.0.1:9",  # never opened here
    "LOG_LEVEL": "warning",
}


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any gateway setting, plus `settings`."""
    prefixes = ("TWILIO_", "CARTESIA_", "REDIS_", "AGENT_", "PUBLIC_URL", "PORT", "GATEWAY_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    return {**env, **settings}


def run_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gateway.cli", *args]
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@contextlib.asynccontextmanager
async def serving(env: dict[str, str], *args: str) -> AsyncIterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 (starting a child does not block)
        [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url + "/readyz") as resp:
                        if resp.status == 200:
                            break
                assert proc.poll() is None, proc.communicate()[1]
                await asyncio.sleep(0.05)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_version_and_every_command_in_the_top_level_help():
    done = run_cli(clean_env(), "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"line-gateway {version('line-gateway')}"
    done = run_cli(clean_env(), "--help")
    assert done.returncode == 0
    commands = parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    names = list(commands.choices)
    assert {"serve", "simulate", "call", "doctor", "setup-number", "probe"} <= set(names)
    described = {a.dest: a.help for a in commands._choices_actions}
    for name in names:
        (line,) = [ln for ln in done.stdout.splitlines() if ln.strip().startswith(name + " ")]
        assert line.split(None, 1)[1] == described[name] and described[name], line  # on one line


def test_serve_refuses_to_start_when_it_would_refuse_every_call_and_says_why():
    env = clean_env(**{k: v for k, v in GOOD.items() if k not in ("TWILIO_AUTH_TOKEN", "CARTESIA_API_KEY")})
    env.pop("CARTESIA_URL")  # Cartesia's own: a key is needed
    done = run_cli(env, "serve", "--port", str(free_port()), timeout=30)
    assert done.returncode == 2
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("line-gateway: error: ")]
    assert len(errors) == 3, done.stderr
    assert errors[0].startswith("line-gateway: error: TWILIO_AUTH_TOKEN is not set, so every Twilio webhook")
    assert errors[1].startswith("line-gateway: error: CARTESIA_API_KEY is not set, so Cartesia refuses")
    assert "would refuse every call" in errors[2] and "--allow-incomplete" in errors[2]
    assert "Traceback" not in done.stderr


async def test_serve_port_is_public_urls_default_port_and_warnings_are_loud():
    """Without PUBLIC_URL, `serve --port N` builds stream URLs and checks signatures for port N."""
    async with serving(clean_env(**GOOD)) as (url, proc):
        async with aiohttp.ClientSession() as http, http.get(url + "/readyz") as resp:
            assert await resp.json() == {"ok": True, "draining": False, "registry": "ok", "reasons": []}
        call = SimulatedCall(url, TOKEN, voice_query="agent=agent_cli")  # signed over http://127.0.0.1:N
        assert await call.dial() == 200, call.twiml
        assert call.stream_url.startswith(url.replace("http://", "ws://") + "/twilio/media")
    _, stderr = proc.communicate()
    warnings = [ln for ln in stderr.splitlines() if ln.startswith("line-gateway: warning: ")]
    assert any("no agent is set (CARTESIA_AGENT_ID, AGENT_ROUTES)" in w for w in warnings), stderr
    assert any(f"PUBLIC_URL is {url}" in w and "Twilio cannot reach it" in w for w in warnings), stderr


async def test_allow_incomplete_starts_a_gateway_that_refuses_calls_as_it_said():
    env = clean_env(**{k: v for k, v in GOOD.items() if k != "TWILIO_AUTH_TOKEN"})
    async with serving(env, "--allow-incomplete") as (url, proc):
        call = SimulatedCall(url, TOKEN, voice_query="agent=agent_cli")
        assert await call.dial() == 403
    _, stderr = proc.communicate()
    assert "line-gateway: error: TWILIO_AUTH_TOKEN is not set" in stderr


@pytest.mark.parametrize(
    ("settings", "args", "message"),
    [
        ({"AGENT_ROUTES": "{not json"}, ("doctor",), "AGENT_ROUTES is not valid JSON"),
        ({"PORT": "http"}, ("serve",), "PORT must be a TCP port number, got 'http'"),
        ({"TWILIO_REGION": "mars1"}, ("setup-number", "+15550000001"), "TWILIO_REGION must look like ie1"),
        ({"CARTESIA_OUTPUT_FORMAT": "opus"}, ("simulate",), "CARTESIA_OUTPUT_FORMAT must be one of"),
        ({}, ("simulate", "--caller-wav", "/nonexistent.wav"), "cannot play --caller-wav /nonexistent.wav"),
    ],
)
def test_bad_settings_are_one_line_errors_not_tracebacks(settings, args, message):
    done = run_cli(clean_env(**settings), *args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("line-gateway: error: ") and message in done.stderr


def test_simulate_says_what_happened_in_plain_words_in_the_servers_format(tmp_path):
    done = run_cli(
        clean_env(CARTESIA_OUTPUT_FORMAT="pcm_16000"), "simulate", "--output", str(tmp_path / "x.wav")
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "emulator that speaks pcm_16000 (from CARTESIA_OUTPUT_FORMAT)" in out
    for said in (
        "the gateway answered Twilio's voice webhook (HTTP 200)",
        "the media stream opened",
        "the caller starts hearing the agent",
        "barge-in: the agent stopped, its queued audio dropped",
        "the caller pressed *",
        "the gateway hung the call up through Twilio's REST API",
        "DTMF the caller heard from the agent: 147",
        "The call went as expected.",
    ):
        assert said in out, said
    done = run_cli(
        clean_env(), "simulate", "--output-format", "pcm_24000", "--output", str(tmp_path / "y.wav")
    )
    assert "speaks pcm_24000 (from --output-format)" in done.stdout


async def test_readyz_says_why_it_is_not_ready():
    server = RedisServer().start()
    registry = RedisRegistry(server.url)
    try:
        async with sandbox(registry=registry) as box, aiohttp.ClientSession() as http:
            gateway = box.app.state.gateway  # type: ignore[attr-defined]

            async def ready() -> tuple[int, dict]:
                async with http.get(box.url + "/readyz") as resp:
                    return resp.status, await resp.json()

            assert await ready() == (200, {"ok": True, "draining": False, "registry": "ok", "reasons": []})
            gateway.draining = True
            status, body = await ready()
            assert status == 503 and body["reasons"] == [
                "draining: the gateway is shutting down; live calls are finishing"
            ]
            server.stop()
            status, body = await ready()
            assert status == 503 and body["registry"] == "unavailable"
            assert (
                body["reasons"][1]
                == "registry unavailable: the call registry (Redis, REDIS_URL) does not answer"
            )
            gateway.draining = False
            status, body = await ready()
            assert status == 503 and len(body["reasons"]) == 1 and body["reasons"][0].startswith("registry")
            server.start()
    finally:
        server.close()
