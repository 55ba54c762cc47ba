"""`line-gateway simulate`: one whole call on this machine (the gateway, the agent emulator and
Twilio's REST fake), told in plain words."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
from pathlib import Path

from gateway.audio import OUTPUT_FORMATS
from gateway.settings import SettingsError

DEFAULT_FORMAT = "mulaw_8000"  # Settings' default for CARTESIA_OUTPUT_FORMAT

# What the simulated caller notes in its timeline, said for a reader.
PLAIN = (
    (r"webhook answered (\d+)", r"the gateway answered Twilio's voice webhook (HTTP \1)"),
    (r"stream started", "the media stream opened; the agent starts its greeting"),
    (r"caller hears the agent", "the caller starts hearing the agent"),
    (r"gateway cleared playback \(barge-in\)", "barge-in: the agent stopped, its queued audio dropped"),
    (r"caller pressed (.)", r"the caller pressed \1"),
    (r"call hung up via REST", "the gateway hung the call up through Twilio's REST API"),
    (r"call redirected via REST", "the gateway redirected the call through Twilio's REST API"),
    (r"caller hung up", "the caller hung up"),
    (r"script time is up", "the caller's script ran out of time"),
    (r"gateway closed the stream", "the gateway closed the media stream"),
)  # fmt: skip


def plain(what: str) -> str:
    for pattern, words in PLAIN:
        if re.fullmatch(pattern, what):
            return re.sub(pattern, words, what)
    return what


def output_format(chosen: str | None) -> tuple[str, str]:
    """The agent's format and where it came from: --output-format, else the server's own
    setting (CARTESIA_OUTPUT_FORMAT), else its default."""
    if chosen:
        return chosen, "--output-format"
    configured = os.environ.get("CARTESIA_OUTPUT_FORMAT", "").strip()
    if not configured:
        return DEFAULT_FORMAT, "CARTESIA_OUTPUT_FORMAT's default"
    if configured not in OUTPUT_FORMATS:
        known = ", ".join(OUTPUT_FORMATS)
        raise SettingsError(f"CARTESIA_OUTPUT_FORMAT must be one of {known}, got {configured!r}")
    return configured, "CARTESIA_OUTPUT_FORMAT"


async def simulate(fmt: str, source: str, caller_wav: str | None, output: str | None) -> int:
    from gateway.audio import pcm16_to_ulaw, tone_pcm16
    from gateway.dtmf import detect_dtmf
    from gateway.sandbox.agent import AgentBehaviour
    from gateway.sandbox.harness import sandbox
    from gateway.sandbox.script import CallScript, wav_to_mulaw

    behaviour = AgentBehaviour(output_format=fmt, greeting_s=2.0)
    # The caller talks over the greeting (barge-in), asks the agent for DTMF with '*',
    # then presses '#', on which the agent says goodbye and ends the call.
    if caller_wav:
        try:
            voice = wav_to_mulaw(caller_wav)
        except (OSError, ValueError, EOFError) as exc:
            print(f"line-gateway: error: cannot play --caller-wav {caller_wav}: {exc}", file=sys.stderr)
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
    out = Path(output or Path(tempfile.gettempdir()) / f"line-gateway-{call.call_sid}.wav")
    call.write_wav(out)
    tones = detect_dtmf(call.heard_pcm16()) or "none"
    received = len(agent_call.audio_in)
    print(f"A simulated call ({call.call_sid}) on this machine: the gateway, a local Line agent")
    print(f"emulator that speaks {fmt} (from {source}), and a fake of Twilio's REST API.")
    if caller_wav:
        print(f"caller audio: {caller_wav} ({len(voice) / 8000:.2f} s)")
    print("The caller speaks over the agent's greeting, presses * (the agent answers with tones),")
    print("then # (the agent says goodbye and ends the call).")
    print()
    print("What happened, in seconds from the first ring:")
    for at, what in call.timeline:
        print(f"  {at:6.2f} s  {plain(what)}")
    print()
    print(f"The agent heard the caller: agent received {received} bytes of caller audio "
          f"({received / 8000:.2f} s), and the keys {', '.join(agent_call.dtmf_in) or 'none'}.")  # fmt: skip
    sent = sum(n for _, n in call.media_arrivals) / 8000
    dropped = sum(call.cleared_s)
    print(f"The caller heard {sent - dropped:.2f} s of the agent's audio; times the caller spoke over "
          f"it and the rest ({dropped:.2f} s) was dropped: clears {call.clears}.")  # fmt: skip
    print(f"DTMF the caller heard from the agent: {tones}")
    print(f"Twilio confirmed playing the agent's audio {len(call.marks_echoed)} times (marks echoed).")
    print(f"Twilio REST hang-ups recorded: {len(hangups)} (the agent ended the call; the gateway "
          "hung it up through Twilio)")  # fmt: skip
    print(f"recording of what the caller heard: {out}")
    print()
    wrong = []
    if not hangups:
        wrong.append("the gateway never hung the call up through Twilio")
    if call.first_audio_at is None:
        wrong.append("the caller never heard the agent")
    if call.protocol_errors:
        wrong.append(f"the gateway broke Twilio's protocol: {'; '.join(call.protocol_errors[:3])}")
    if wrong:
        print(f"line-gateway: error: the call did not go as expected: {'; '.join(wrong)}", file=sys.stderr)
        return 1
    print("The call went as expected.")
    return 0
