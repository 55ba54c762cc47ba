"""`line-gateway serve | simulate | doctor`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import uvicorn

from gateway import logging as gateway_logging
from gateway.app import create_app
from gateway.sandbox.servers import tune_gc, uvicorn_config
from gateway.services import Gateway
from gateway.settings import Settings, SettingsError


def _serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    gateway_logging.configure(settings.log_level, settings.log_format, settings.secrets)
    port = args.port or settings.port
    extra = {"loop": "uvloop", "http": "httptools"} if _has("uvloop") and _has("httptools") else {}
    app = create_app(settings)
    grace = settings.shutdown_grace_s if args.grace is None else args.grace
    server = GracefulServer(uvicorn_config(app, args.host, port, **extra), app.state.gateway, grace)
    tune_gc()
    server.run()
    return 0


class GracefulServer(uvicorn.Server):
    """On SIGTERM, drain calls first (readiness off, calls end gracefully), then stop.

    uvicorn alone would close every media socket at once with 1012 before the app hears of
    the shutdown: callers cut off mid-sentence, agents never told.
    """

    def __init__(self, config: uvicorn.Config, gateway: Gateway, grace_s: float) -> None:
        super().__init__(config)
        self._gateway = gateway
        self._grace_s = grace_s
        self._draining: asyncio.Future[None] | None = None

    async def startup(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: object) -> None:
        if self._draining is not None or self.should_exit:
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        loop = self._loop
        self._draining = asyncio.run_coroutine_threadsafe(self._drain_then_exit(sig, frame), loop)  # type: ignore[assignment]

    async def _drain_then_exit(self, sig: int, frame: object) -> None:
        try:
            await self._gateway.drain(self._grace_s)
        finally:
            super().handle_exit(sig, frame)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _simulate(args: argparse.Namespace) -> int:
    gateway_logging.configure("warning" if not args.verbose else "info", "console")
    return asyncio.run(_simulate_call(args))


async def _simulate_call(args: argparse.Namespace) -> int:
    from gateway.audio import pcm16_to_ulaw, tone_pcm16
    from gateway.dtmf import detect_dtmf
    from gateway.sandbox.agent import AgentBehaviour
    from gateway.sandbox.harness import sandbox
    from gateway.sandbox.script import CallScript, wav_to_mulaw

    behaviour = AgentBehaviour(output_format=args.output_format, greeting_s=2.0)
    # The caller talks over the greeting (barge-in), asks the agent for DTMF with '*',
    # then presses '#', on which the agent says goodbye and ends the call.
    if args.caller_wav:
        try:
            voice = wav_to_mulaw(args.caller_wav)
        except (OSError, ValueError, EOFError) as exc:
            print(f"error: cannot play --caller-wav {args.caller_wav}: {exc}", file=sys.stderr)
            return 2
    else:
        voice = pcm16_to_ulaw(tone_pcm16(300.0, 0.6, 8000, amplitude=0.5))
    speak_at = 1.0
    ask_at = max(2.5, speak_at + len(voice) / 8000 + 0.5)  # once the caller has finished
    script = CallScript(
        audio=voice, speak_at=speak_at, dtmf=[(ask_at, "*"), (ask_at + 2.0, "#")], max_s=ask_at + 17.5
    )
    async with sandbox(behaviour) as box:
        call = await box.connect_call()
        await call.run(script)
        agent_call = await box.agent.wait_for_call()
        await asyncio.wait_for(agent_call.closed.wait(), 5)
        hangups = box.rest.hangups(call.call_sid)
    out = Path(args.output or Path(tempfile.gettempdir()) / f"line-gateway-{call.call_sid}.wav")
    call.write_wav(out)
    print(f"Simulated call {call.call_sid} (agent output {args.output_format})")
    if args.caller_wav:
        print(f"caller audio: {args.caller_wav} ({len(voice) / 8000:.2f} s)")
    print()
    for at, what in call.timeline:
        print(f"  {at:6.2f} s  {what}")
    print()
    print(f"  agent received {len(agent_call.audio_in)} bytes of caller audio, digits {agent_call.dtmf_in}")
    print(f"  caller heard {len(call.heard) / 8000:.2f} s; clears {call.clears}")
    print(f"  DTMF the caller heard from the agent: {detect_dtmf(call.heard_pcm16()) or 'none'}")
    print(f"  marks echoed {len(call.marks_echoed)}")
    print(f"  Twilio REST hang-ups recorded: {len(hangups)}")
    print(f"  recording of what the caller heard: {out}")
    ok = bool(hangups) and call.first_audio_at is not None and not call.protocol_errors
    if not ok:
        print("simulation FAILED", file=sys.stderr)
    return 0 if ok else 1


def _call(args: argparse.Namespace) -> int:
    """One outbound call through a running gateway's API."""
    settings = Settings.from_env()
    if not settings.gateway_api_key:
        print("error: set GATEWAY_API_KEY (the gateway's key for POST /calls)", file=sys.stderr)
        return 2
    body: dict[str, object] = {"to": args.to}
    for key, value in (("agent", args.agent), ("from", args.from_)):
        if value:
            body[key] = value
    if args.metadata:
        try:
            body["metadata"] = json.loads(args.metadata)
        except json.JSONDecodeError as exc:
            print(f"error: --metadata is not JSON: {exc}", file=sys.stderr)
            return 2
    if args.machine_detection:
        body["machine_detection"] = True
    gateway = (args.gateway or f"http://127.0.0.1:{settings.port}").rstrip("/")
    request = urllib.request.Request(
        gateway + "/calls",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {settings.gateway_api_key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            reply = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        reply = json.loads(exc.read() or b"{}")
        error = reply.get("error", {})
        print(f"error: HTTP {exc.code} {error.get('code', '')}: {error.get('message', '')}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, TimeoutError) as exc:
        print(f"error: cannot reach the gateway at {gateway}: {exc}", file=sys.stderr)
        return 1
    print(reply["call_sid"])
    return 0


def _doctor(_args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}")
        return 1
    problems = []
    if not settings.twilio_account_sid or not settings.twilio_auth_token:
        problems.append("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN are needed for hang-ups and signatures")
    if not settings.cartesia_api_key:
        problems.append("CARTESIA_API_KEY is not set")
    if not settings.cartesia_agent_id:
        problems.append("CARTESIA_AGENT_ID is not set: every number's Voice URL must carry ?agent=")
    if settings.public_url.startswith("http://127.0.0.1"):
        problems.append("PUBLIC_URL is not set: Twilio cannot reach 127.0.0.1")
    if not settings.twilio_validate_signatures:
        problems.append("TWILIO_VALIDATE_SIGNATURES=false: anyone can post calls to this gateway")
    print(f"voice URL:  {settings.public_url}/twilio/voice")
    print(f"status URL: {settings.public_url}/twilio/status")
    print(f"registry:   {'redis' if settings.redis_url else 'embedded (one instance)'}")
    for problem in problems:
        print(f"warning: {problem}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="line-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=0, help="default: $PORT or 8080")
    serve.add_argument(
        "--grace",
        type=float,
        default=None,
        help="on SIGTERM, seconds live calls get to finish before they are ended "
        "(default: SHUTDOWN_GRACE_S, 15)",
    )
    serve.set_defaults(run=_serve)
    simulate = sub.add_parser("simulate", help="run a whole call locally: no credentials, no network")
    simulate.add_argument(
        "--output-format",
        default="pcm_24000",
        choices=["mulaw_8000", "pcm_16000", "pcm_24000", "pcm_44100"],
        help="the sandbox agent's audio format",
    )
    simulate.add_argument("--output", help="where to write the caller's recording (WAV)")
    simulate.add_argument(
        "--caller-wav",
        metavar="PATH",
        help="a WAV file (any rate, channels, width) the caller says instead of the test tone",
    )
    simulate.add_argument("--verbose", action="store_true", help="show the gateway's logs")
    simulate.set_defaults(run=_simulate)
    call = sub.add_parser("call", help="start one outbound call through a running gateway")
    call.add_argument("to", help="E.164 number or sip: URI to call")
    call.add_argument("--agent", help="agent id (default: the gateway's CARTESIA_AGENT_ID)")
    call.add_argument("--from", dest="from_", help="caller ID (default: the gateway's OUTBOUND_FROM)")
    call.add_argument("--metadata", help="JSON object handed to the agent")
    call.add_argument("--machine-detection", action="store_true", help="ask Twilio to detect machines")
    call.add_argument("--gateway", help="the gateway's URL (default: http://127.0.0.1:$PORT)")
    call.set_defaults(run=_call)
    doctor = sub.add_parser("doctor", help="check the settings in the environment")
    doctor.set_defaults(run=_doctor)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
