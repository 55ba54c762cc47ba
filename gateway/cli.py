"""line-gateway: Twilio phone calls to Cartesia Line voice agents."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import sys
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, NoReturn

import uvicorn

from gateway import logging as gateway_logging
from gateway import preflight
from gateway.settings import Settings, SettingsError

if TYPE_CHECKING:
    from gateway.services import Gateway

PROG = "line-gateway"
E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


def _error(message: object, code: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("line-gateway")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _serve(args: argparse.Namespace) -> int:
    from gateway.app import create_app
    from gateway.sandbox.servers import tune_gc, uvicorn_config

    env = dict(os.environ)
    if args.port:
        env["PORT"] = str(args.port)  # and so PUBLIC_URL's default port, which signatures use
    settings = Settings.from_env(env)
    found = preflight.problems(settings)
    for problem in found:
        print(f"{PROG}: {'error' if problem.fatal else 'warning'}: {problem.message}", file=sys.stderr)
    if any(p.fatal for p in found) and not args.allow_incomplete:
        return _error(
            "this gateway would refuse every call, so it does not start: fix the above, "
            "or start it anyway with `serve --allow-incomplete`"
        )
    gateway_logging.configure(settings.log_level, settings.log_format, settings.secrets)
    extra = {"loop": "uvloop", "http": "httptools"} if _has("uvloop") and _has("httptools") else {}
    app = create_app(settings)
    grace = settings.shutdown_grace_s if args.grace is None else args.grace
    config = uvicorn_config(app, args.host, settings.port, **extra)
    server = GracefulServer(config, app.state.gateway, grace)
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
    from gateway.simulate import output_format, simulate

    fmt, source = output_format(args.output_format)
    gateway_logging.configure("warning" if not args.verbose else "info", "console")
    return asyncio.run(simulate(fmt, source, args.caller_wav, args.output))


def _call(args: argparse.Namespace) -> int:
    """One outbound call through a running gateway's API."""
    settings = Settings.from_env()
    if not settings.gateway_api_key:
        return _error("set GATEWAY_API_KEY (the gateway's key for POST /calls)")
    body: dict[str, object] = {"to": args.to}
    for key, value in (("agent", args.agent), ("from", args.from_)):
        if value:
            body[key] = value
    if args.metadata:
        try:
            body["metadata"] = json.loads(args.metadata)
        except json.JSONDecodeError as exc:
            return _error(f"--metadata is not JSON: {exc}")
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
        return _error(f"HTTP {exc.code} {error.get('code', '')}: {error.get('message', '')}", 1)
    except (urllib.error.URLError, TimeoutError) as exc:
        return _error(f"cannot reach the gateway at {gateway}: {exc}", 1)
    print(reply["call_sid"])
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from gateway.doctor import main as doctor

    bad = [n for n in args.numbers if not E164.match(n)]
    if bad:
        return _error(f"not E.164 numbers (+ and country code): {', '.join(bad)}")
    pins = {}
    for pin in args.resolve:
        host, _, address = pin.partition(":")  # host names hold no colon; IPv6 addresses do
        try:
            ipaddress.ip_address(address)
        except ValueError:
            return _error(f"--resolve takes HOST:ADDRESS (an IP address), got {pin!r}")
        pins[host] = address
    gateway_logging.configure("error", "console")  # the report is the output
    return doctor(Settings.from_env(), args.numbers, sys.stdout, args.agent_wait, pins)


def _setup_number(args: argparse.Namespace) -> int:
    if not E164.match(args.number):
        return _error(f"{args.number} is not an E.164 number (+ and country code)")
    s = Settings.from_env()
    if not s.twilio_account_sid or not s.twilio_auth_token:
        return _error("set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN (Twilio console, Account info)")
    if preflight.is_loopback(s.public_url) or not s.public_url.startswith("https://"):
        return _error(f"PUBLIC_URL is {s.public_url}: set it to the https:// origin Twilio reaches")
    return asyncio.run(_point_number(s, args.number, args.agent))


async def _point_number(s: Settings, phone: str, agent: str | None) -> int:
    from twilio.base.exceptions import TwilioRestException

    from gateway.carriers.twilio.numbers import TwilioAccount, problems

    account = TwilioAccount(
        s.twilio_account_sid,
        s.twilio_auth_token,
        s.twilio_api_base,
        region=s.twilio_region,
        edge=s.twilio_edge,
    )
    try:
        number = await account.find(phone)
        if number is None:
            return _error(f"{phone} is not a number of account {s.twilio_account_sid}", 1)
        if number.trunk_sid:
            return _error(f"{phone} belongs to SIP trunk {number.trunk_sid}: take it off the trunk first", 1)
        print(f"{phone} ({number.sid}) before: Voice URL {number.voice_url or '(none)'} "
              f"({number.voice_method}), status callback {number.status_callback or '(none)'}")  # fmt: skip
        updated = await account.point_here(number, s.public_url, agent)
    except TwilioRestException as exc:
        return _error(f"Twilio refused ({account.host}): HTTP {exc.status} code {exc.code}: {exc.msg}", 1)
    except (OSError, TimeoutError) as exc:
        return _error(f"cannot reach Twilio ({account.host}): {type(exc).__name__}: {exc}", 1)
    finally:
        await account.close()
    print(f"{phone} now:    Voice URL {updated.voice_url} ({updated.voice_method}), "
          f"status callback {updated.status_callback} ({updated.status_callback_method})")  # fmt: skip
    left = problems(updated, s.public_url)
    if left:
        return _error(f"Twilio did not take every change: {'; '.join(left)}", 1)
    return 0


def _probe(args: argparse.Namespace) -> int:
    from gateway.probe import probe

    token = os.environ.get("TWILIO_AUTH_TOKEN", "").strip()
    if not token:
        print(f"{PROG}: warning: TWILIO_AUTH_TOKEN is not set: the webhook's signature will not "
              "match a gateway that checks signatures", file=sys.stderr)  # fmt: skip
    gateway_logging.configure("error", "console")
    return asyncio.run(
        probe(
            args.url,
            auth_token=token,
            account_sid=os.environ.get("TWILIO_ACCOUNT_SID", "").strip() or "AC" + "0" * 32,
            public_url=args.public_url,
            wav=args.wav,
            seconds=args.seconds,
            output=args.output,
            to=args.to,
            from_=args.from_,
            agent=args.agent,
        )
    )


class _Formatter(argparse.HelpFormatter):
    """Room for `setup-number` beside its description: one line per command."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=24, width=100)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        # argparse measures subcommands one indent short of where it prints them
        self._action_max_length = max(self._action_max_length, len("setup-number") + 6)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog=PROG, description=__doc__, formatter_class=_Formatter)
    top.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = top.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway: Twilio webhooks, media streams, control API")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument(
        "--port", type=int, default=0, help="default: $PORT or 8080 (also PUBLIC_URL's default port)"
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=None,
        help="on SIGTERM, seconds live calls get to finish before they are ended "
        "(default: SHUTDOWN_GRACE_S, 15)",
    )
    serve.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="start even when the settings would make it refuse every call",
    )
    serve.set_defaults(run=_serve)

    simulate = sub.add_parser("simulate", help="run a whole call on this machine: no credentials, no network")
    simulate.add_argument(
        "--output-format",
        choices=["mulaw_8000", "pcm_16000", "pcm_24000", "pcm_44100"],
        help="the agent emulator's audio format (default: CARTESIA_OUTPUT_FORMAT, mulaw_8000)",
    )
    simulate.add_argument("--output", help="where to write the caller's recording (WAV)")
    simulate.add_argument(
        "--caller-wav",
        metavar="PATH",
        help="a WAV file (any rate, channels, width) the caller says instead of a tone",
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

    doctor = sub.add_parser("doctor", help="check a deployment for real: Twilio, numbers, agents, Redis")
    doctor.add_argument(
        "numbers",
        nargs="*",
        metavar="NUMBER",
        help="numbers that must point at this gateway, besides AGENT_ROUTES' "
        "(none named anywhere: all the account's numbers are listed, one must)",
    )
    doctor.add_argument(
        "--agent-wait",
        type=float,
        default=5.0,
        help="seconds to wait for each agent's first audio (default 5)",
    )
    doctor.add_argument(
        "--resolve",
        action="append",
        default=[],
        metavar="HOST:ADDRESS",
        help="reach PUBLIC_URL's host at this IP address, as curl's --resolve (before DNS points there)",
    )
    doctor.set_defaults(run=_doctor)

    setup = sub.add_parser("setup-number", help="point a Twilio number's voice URL and status callback here")
    setup.add_argument("number", help="the Twilio number, E.164 (+15551234567)")
    setup.add_argument(
        "--agent", help="name this agent in the Voice URL (?agent=); default: keep the one named"
    )
    setup.set_defaults(run=_setup_number)

    probe = sub.add_parser("probe", help="place a signed synthetic call against a running gateway")
    probe.add_argument("url", help="the gateway's URL, e.g. https://gw.example.com")
    probe.add_argument(
        "--public-url", help="the gateway's PUBLIC_URL, when it is not URL (signatures use it)"
    )
    probe.add_argument("--wav", help="what the caller says (any PCM WAV; default: a tone)")
    probe.add_argument("--seconds", type=float, default=8.0, help="how long the call lasts (default 8)")
    probe.add_argument("--output", help="where to write what the caller heard (WAV)")
    probe.add_argument(
        "--to", default="+15550100001", metavar="NUMBER", help="the called number (AGENT_ROUTES picks by it)"
    )
    probe.add_argument(
        "--from", dest="from_", default="+15550100002", metavar="NUMBER", help="the caller's number"
    )
    probe.add_argument("--agent", help="name an agent in the Voice URL (?agent=)")
    probe.set_defaults(run=_probe)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except SettingsError as exc:
        return _error(exc)
    except OSError as exc:  # a file that cannot be read, a port in use, ...
        return _error(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
