"""The example Line agent (examples/line_agent/) with the real cartesia-line SDK, on sandbox calls.

cartesia-line pins websockets<14 and starlette<1.0, so it cannot live in the gateway's test
environment: the agent runs in a virtualenv of its own (built once, reused while the pinned version
and this Python stay the same), as a subprocess driven by examples/line_agent/scripted_call.py.
That script talks to the SDK's own websocket endpoint the way Cartesia's harness does, so the call's
metadata reaches the agent as the SDK's `CallRequest.metadata`, and the SDK's LlmAgent dispatches
the tool calls of a scripted model (LiteLLM's `mock_response` stands in for the provider). The
tools POST to the sandbox gateway's control URL; the checks read what the caller heard and what
Twilio's REST fake recorded.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gateway.dtmf import detect_dtmf
from gateway.sandbox.agent import AgentBehaviour
from gateway.sandbox.harness import sandbox
from gateway.sandbox.script import CallScript

SDK = "cartesia-line==0.2.19"
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "line_agent"
VENV = ROOT / "build" / "line-sdk-venv"  # build/ is gitignored
INSTALL_TIMEOUT_S = 900
DRIVER_TIMEOUT_S = 120
ALLOW = ("+1555*", "sip:*@pbx.example.com")
REFUSED = "+19005550100"
BILLING = "+15551234567"


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _stamp() -> str:
    return f"{SDK} python{sys.version_info.major}.{sys.version_info.minor}"


def _pypi_reachable() -> str | None:
    """None when the package index answers, else why not."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        with urllib.request.urlopen(f"{index}/cartesia-line/", timeout=15) as resp:
            resp.read(1)
    except (urllib.error.URLError, OSError) as exc:
        return f"{index}: {exc}"
    return None


def _run(cmd: list[str | Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )


def _build_venv() -> None:
    shutil.rmtree(VENV, ignore_errors=True)
    made = _run([sys.executable, "-m", "venv", VENV])
    if made.returncode != 0:
        pytest.fail(f"could not create a virtualenv with {sys.executable}:\n{made.stderr[-3000:]}")
    pip = [_venv_python(), "-m", "pip", "install", "--no-input", "--disable-pip-version-check"]
    installed = _run([*pip, "--timeout", "30", "--retries", "2", SDK])
    if installed.returncode != 0:
        pytest.fail(f"pip install {SDK} failed:\n{(installed.stdout + installed.stderr)[-5000:]}")
    (VENV / "ready").write_text(_stamp())


@pytest.fixture(scope="session")
def line_python() -> Path:
    """A Python with cartesia-line installed, in a virtualenv of its own under build/."""
    VENV.parent.mkdir(exist_ok=True)
    with open(VENV.parent / "line-sdk-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time across pytest processes
        ready = VENV / "ready"
        if not (ready.exists() and ready.read_text() == _stamp() and _venv_python().exists()):
            unreachable = _pypi_reachable()
            if unreachable is not None:
                pytest.skip(f"PyPI is unreachable, so {SDK} cannot be installed ({unreachable})")
            _build_venv()
    return _venv_python()


async def drive_agent(
    python: Path, tmp_path: Path, metadata: dict[str, Any], turns: list[dict[str, Any]], **env: str
) -> dict[str, Any]:
    """Run the example agent in the SDK's venv over `turns`; what its model saw and it sent."""
    script, result = tmp_path / "script.json", tmp_path / "result.json"
    script.write_text(json.dumps({"metadata": metadata, "turns": turns}))
    # Nothing may reach a model provider: any proxied HTTP(S) request fails at once, while the
    # control URL (127.0.0.1) is reached directly.
    no_network = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    no_network["no_proxy"] = "127.0.0.1,localhost"
    no_network |= {name.upper(): value for name, value in no_network.items()}
    child_env = {**os.environ, **no_network, "LITELLM_LOCAL_MODEL_COST_MAP": "True", **env}
    child = await asyncio.create_subprocess_exec(
        str(python),
        str(EXAMPLE / "scripted_call.py"),
        str(script),
        str(result),
        cwd=EXAMPLE,
        env=child_env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(child.communicate(), DRIVER_TIMEOUT_S)
    except TimeoutError:
        child.kill()
        await child.wait()
        raise
    log = output.decode(errors="replace")[-8000:]
    assert result.exists(), f"the agent's run left no result (exit {child.returncode}):\n{log}"
    outcome = json.loads(result.read_text())
    assert outcome["errors"] == [], f"{outcome['errors']}\n{log}"
    assert all(left == [] for left in outcome["unused"]), f"replies never asked for: {outcome['unused']}"
    assert child.returncode == 0, log
    return outcome


async def live_call(box: Any, **kwargs: Any) -> tuple[Any, dict[str, Any], asyncio.Task[None]]:
    """A connected call streaming in the background; its agent's start metadata."""
    call = await box.connect_call(**kwargs)
    runner = asyncio.create_task(call.run(CallScript(max_s=60)))  # outlives the agent run
    async with asyncio.timeout(10):
        while not (mine := [a for a in box.agent.calls if a.metadata.get("call_sid") == call.call_sid]):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return call, dict(mine[0].metadata), runner


def tool_results(outcome: dict[str, Any], turn: int) -> list[str]:
    """The tool results the model was given back in `turn` (after the caller spoke), in order."""
    messages = [c for c in outcome["completions"] if c["turn"] == turn][-1]["messages"]
    spoke = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [m["content"] for m in messages[spoke:] if m["role"] == "tool"]


def harness_events(outcome: dict[str, Any]) -> list[tuple[str, str]]:
    """What the agent sent to Cartesia's side, reduced to (kind, text) in order."""
    events = []
    for sent in outcome["harness"]:
        if sent["type"] == "message":
            events.append(("say", sent["content"]))
        elif sent["type"] == "tool_call" and sent.get("result") is not None:
            events.append((sent["name"], sent["result"]))
    return events


async def test_voximplant_agent_sends_dtmf_is_refused_a_destination_then_transfers(
    line_python: Path, tmp_path: Path
) -> None:
    turns = [
        {
            "user": "My PIN is one two three, please enter it.",
            "model": [
                {"tool_calls": [{"name": "send_dtmf", "arguments": {"digits": "123"}}]},
                {"say": "I've entered your PIN."},
            ],
        },
        {
            "user": "Put me through to plus one nine hundred, five five five, zero one hundred.",
            "model": [
                {
                    "say": "Let me transfer you.",
                    "tool_calls": [
                        {
                            "name": "transfer_call",
                            "arguments": {"destination": REFUSED, "summary": "Caller asked for that line."},
                        }
                    ],
                },
                {"say": "Sorry, I can't transfer you to that number. I can put you through to billing."},
            ],
        },
        {
            "user": "Billing then, please.",
            "model": [
                {
                    "say": "Transferring you to billing now.",
                    "tool_calls": [
                        {
                            "name": "transfer_call",
                            "arguments": {"destination": BILLING, "summary": "Caller with PIN entered."},
                        }
                    ],
                }
            ],
        },
    ]
    async with sandbox(AgentBehaviour(greeting_s=0.2), transfer_allow=ALLOW) as box:
        call, metadata, runner = await live_call(box, to="+15559870002")
        assert metadata["vox_session_control_url"] == metadata["control_url"]
        outcome = await drive_agent(line_python, tmp_path, metadata, turns)
        await asyncio.wait_for(runner, 15)  # the transfer's redirect ends the stream

    # The model was offered the three tools, with the fields the gateway takes.
    offered = {t["function"]["name"]: t["function"] for t in outcome["completions"][0]["tools"]}
    assert set(offered) == {"end_call", "transfer_call", "send_dtmf"}
    assert offered["transfer_call"]["parameters"]["required"] == ["destination", "summary"]
    assert "goodbye" in offered["end_call"]["description"].lower()

    # send_dtmf: the caller heard the tones, and the model was told they went.
    assert detect_dtmf(call.heard_pcm16()) == "123"
    assert tool_results(outcome, 0) == ["sent DTMF 123"]

    # The refused destination reached the model as a sentence it can use, and it carried on.
    assert tool_results(outcome, 1) == [
        "transfer refused: that destination is not allowed (destination_not_allowed)"
    ]
    assert ("say", "Sorry, I can't transfer you to that number. I can put you through to billing.") in (
        harness_events(outcome)
    )

    # The allowed transfer: one redirect, to a <Dial> of billing; nobody hung up.
    (redirect,) = box.rest.redirects(call.call_sid)
    twiml = redirect.form["Twiml"]
    assert "<Dial" in twiml and f"<Number>{BILLING}</Number>" in twiml
    assert REFUSED not in twiml
    assert box.rest.hangups(call.call_sid) == []
    # A transfer that went through ends the turn: the model was not asked again.
    assert [c["turn"] for c in outcome["completions"]] == [0, 0, 1, 1, 2]
    assert call.end_reason == "redirected via REST"
    assert harness_events(outcome)[-2:] == [
        ("say", "Transferring you to billing now."),
        ("transfer_call", "success"),
    ]


async def test_control_url_variant_says_goodbye_then_ends_the_call(line_python: Path, tmp_path: Path) -> None:
    turns = [
        {
            "user": "That's all, thank you.",
            "model": [
                {
                    "say": "Thanks for calling Example Corp, goodbye!",
                    "tool_calls": [{"name": "end_call", "arguments": {"reason": "caller is done"}}],
                }
            ],
        }
    ]
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        call, metadata, runner = await live_call(box)
        del metadata["vox_session_control_url"]  # this variant must find its URL under control_url
        outcome = await drive_agent(line_python, tmp_path, metadata, turns, CONTROL_URL_KEY="control_url")
        await asyncio.wait_for(runner, 15)
        hangups = box.rest.hangups(call.call_sid)
        redirects = box.rest.redirects(call.call_sid)

    assert len(hangups) == 1 and redirects == []
    assert call.end_reason == "hung up via REST"
    # The goodbye went out before the tool ran; the hang-up ended the turn without another completion.
    assert harness_events(outcome)[-2:] == [
        ("say", "Thanks for calling Example Corp, goodbye!"),
        ("end_call", "success"),
    ]
    assert [c["turn"] for c in outcome["completions"]] == [0]


async def test_a_resumed_session_does_not_greet_again_and_knows_where_it_was(
    line_python: Path, tmp_path: Path
) -> None:
    """What the gateway sends when it reopens a dropped agent or moves the call: `resumed` and the
    agent's own last `custom` state. The example agent carries on instead of greeting again."""
    turns = [{"user": "Are you still there?", "model": [{"say": "Yes, sorry about that."}]}]
    fresh = await drive_agent(line_python, tmp_path, {"call_sid": "CAfresh"}, turns)
    assert harness_events(fresh)[0] == ("say", "Hello, Example Corp, how can I help you?")
    metadata = {
        "call_sid": "CAresumed",
        "resumed": True,
        "resume_reason": "agent_dropped",
        "agent_state": {"topic": "billing"},
    }
    resumed = await drive_agent(line_python, tmp_path, metadata, turns)
    assert harness_events(resumed) == [("say", "Yes, sorry about that.")]
    system = resumed["completions"][0]["messages"][0]
    assert system["role"] == "system" and '{"topic": "billing"}' in system["content"]


async def test_without_a_control_url_the_tools_answer_in_words(line_python: Path, tmp_path: Path) -> None:
    """Outside the gateway (no control URL in the metadata) a tool call is a sentence, not a crash."""
    turns = [
        {
            "user": "Bye.",
            "model": [
                {"say": "Goodbye!", "tool_calls": [{"name": "end_call", "arguments": {}}]},
                {"say": "Please hang up when you're ready."},
            ],
        }
    ]
    outcome = await drive_agent(line_python, tmp_path, {"call_sid": "CAnone"}, turns)
    (result,) = tool_results(outcome, 0)
    assert result.startswith("end call unavailable: this call has no control URL")


def test_simulate_runs_in_an_environment_that_also_has_cartesia_line(line_python: Path) -> None:
    """Users put the gateway and the Line SDK in one environment; the SDK pins websockets<14
    and starlette<1.0, and `line-gateway simulate` must still run a whole call there."""
    installed = _run([line_python, "-m", "pip", "install", "--no-input", "--disable-pip-version-check", ROOT])
    assert installed.returncode == 0, (installed.stdout + installed.stderr)[-5000:]
    versions = _run([line_python, "-c", "import websockets, starlette; print(websockets.__version__)"])
    assert int(versions.stdout.split(".")[0]) < 14, versions.stdout  # the SDK's pin held
    simulated = subprocess.run(
        [str(VENV / "bin" / "line-gateway"), "simulate", "--output-format", "pcm_16000"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DRIVER_TIMEOUT_S,
        check=False,
    )
    assert simulated.returncode == 0, (simulated.stdout + simulated.stderr)[-5000:]
    assert "Twilio REST hang-ups recorded: 1" in simulated.stdout
