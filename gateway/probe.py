"""`line-gateway probe URL`: a synthetic call against any running gateway, signed as Twilio
signs it, so a deployed gateway can be checked end to end without a phone.

It POSTs the voice webhook signed with TWILIO_AUTH_TOKEN (over --public-url, default URL),
opens the media stream the TwiML names, plays a WAV (or a 300 Hz tone) as the caller, saves
what it heard as a WAV, and reports the time to the agent's first audio.

The control round trip: a call's control URL carries a secret token that only its agent is
given, so the probe cannot act on its own call. It measures the two round trips it can make
honestly: `GET /control/<a random token>` (the control API's route, token hashing and registry
lookup, answered 404 as it must be) and the signed `completed` status callback Twilio itself
sends when a call ends (answered 204; it also retires the call's record).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
from websockets.exceptions import InvalidHandshake, InvalidStatus

from gateway.audio import pcm16_to_ulaw, tone_pcm16
from gateway.sandbox.caller import SimulatedCall
from gateway.sandbox.script import CallScript, wav_to_mulaw

HTTP_TIMEOUT_S = 10.0
SPEAK_AT_S = 1.0  # the caller speaks after the greeting has begun
CONNECT_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, InvalidHandshake)
ENDINGS = {
    "caller hung up": "the probe hung up when its time was up",
    "hung up via REST": "the gateway hung up through Twilio's REST API (the agent ended the call)",
    "redirected via REST": "the gateway redirected the call through Twilio's REST API (a transfer)",
    "gateway closed the stream": "the gateway closed the media stream",
}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


class ProbeFailed(Exception):
    """The probe could not go on: why, in one line."""


async def _control_round_trip(url: str) -> tuple[float, int]:
    token = secrets.token_urlsafe(32)
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        started = time.monotonic()
        async with http.get(f"{url}/control/{token}") as resp:
            await resp.read()
            return time.monotonic() - started, resp.status


async def _status_round_trip(call: SimulatedCall) -> tuple[float, int]:
    form = {**call.webhook_form(), "CallStatus": "completed", "CallDuration": "1"}
    started = time.monotonic()
    status, _ = await call.post("/twilio/status", form)
    return time.monotonic() - started, status


async def probe(
    url: str,
    *,
    auth_token: str,
    account_sid: str,
    public_url: str | None,
    wav: str | None,
    seconds: float,
    output: str | None,
    to: str,
    from_: str,
    agent: str | None,
) -> int:
    url = url.rstrip("/")
    try:
        voice = wav_to_mulaw(wav) if wav else pcm16_to_ulaw(tone_pcm16(300.0, 0.6, 8000, amplitude=0.5))
    except (OSError, ValueError, EOFError) as exc:
        print(f"line-gateway: error: cannot play --wav {wav}: {exc}", file=sys.stderr)
        return 2
    call = SimulatedCall(
        url,
        auth_token,
        account_sid=account_sid,
        from_=from_,
        to=to,
        voice_query=urlencode({"agent": agent}) if agent else "",
    )
    print(f"Probe of {url}: call {call.call_sid} from {from_} to {to}")
    try:
        await _call(call, url, public_url, voice, seconds)
    except ProbeFailed as exc:
        print(f"line-gateway: error: {exc}", file=sys.stderr)
        return 1
    finally:
        sys.stdout.flush()
    out = Path(output or Path(tempfile.gettempdir()) / f"line-gateway-probe-{call.call_sid}.wav")
    call.write_wav(out)
    print(f"  what the caller heard: {out}")
    if not call.media_arrivals:
        print(f"line-gateway: error: the agent said nothing in {seconds:g} s", file=sys.stderr)
        return 1
    return 0


async def _call(call: SimulatedCall, url: str, public_url: str | None, voice: bytes, seconds: float) -> None:
    started = time.monotonic()
    try:
        status = await call.dial((public_url or url).rstrip("/"))
    except CONNECT_ERRORS as exc:
        raise ProbeFailed(f"cannot reach {url}/twilio/voice: {type(exc).__name__}: {exc}") from None
    if status == 403:
        raise ProbeFailed(
            "the gateway refused the webhook's signature (403): TWILIO_AUTH_TOKEN here is not the "
            f"gateway's, or its PUBLIC_URL is not {public_url or url} (say which with --public-url)"
        )
    if status != 200 or not call.stream_url:
        raise ProbeFailed(f"the voice webhook answered {status} without a stream: {call.twiml[:300]!r}")
    print(f"  webhook: {status} in {_ms(time.monotonic() - started)}; the TwiML streams to {call.stream_url}")
    stream_from = time.monotonic()
    try:
        await call.open_stream()
    except InvalidStatus as exc:
        code = exc.response.status_code
        raise ProbeFailed(f"the media stream was refused: HTTP {code}") from None
    except CONNECT_ERRORS as exc:
        raise ProbeFailed(f"cannot open the media stream: {type(exc).__name__}: {exc}") from None
    opened = time.monotonic()
    print(f"  media stream: open in {_ms(opened - stream_from)}")
    script = CallScript(audio=voice, speak_at=SPEAK_AT_S, max_s=seconds)
    runner = asyncio.create_task(call.run(script))
    try:
        control_s, control_status = await _control_round_trip(url)
        await asyncio.wait_for(asyncio.shield(runner), seconds + 10)
    except CONNECT_ERRORS as exc:
        raise ProbeFailed(f"the control API did not answer: {type(exc).__name__}: {exc}") from None
    finally:
        if not runner.done():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    if call.media_arrivals:
        first = call.media_arrivals[0][0]
        spoken = sum(n for _, n in call.media_arrivals) / 8000
        print(
            f"  agent: first audio {_ms(first - call.t0)} after the webhook "
            f"({_ms(first - opened)} after the stream opened); {spoken:.2f} s of its audio"
        )
    else:
        print(f"  agent: no audio in {seconds:g} s")
    verdict = "as it should" if control_status == 404 else "(expected 404: is this line-gateway?)"
    print(f"  control API round trip: {_ms(control_s)} (GET /control/<random token> answered "
          f"{control_status} {verdict}; the call's own token goes only to its agent)")  # fmt: skip
    try:
        status_s, status_code = await _status_round_trip(call)
    except CONNECT_ERRORS as exc:
        raise ProbeFailed(f"the status callback failed: {type(exc).__name__}: {exc}") from None
    print(f"  status callback round trip: {_ms(status_s)} (signed CallStatus=completed, "
          f"answered {status_code})")  # fmt: skip
    print(f"  call ended: {ENDINGS.get(call.end_reason, call.end_reason or 'the probe hung up')}")
