"""A real scrape for the dashboard: a sandbox gateway carrying simulated calls, scraped by
Prometheus, then its panels drawn by deploy/grafana/render.py. Not part of CI.

    python scripts/dashboard_demo.py --minutes 5 --out docs/dashboard.png

Runs in one process: the gateway (gateway.sandbox.harness: real HTTP and WebSockets on
127.0.0.1), the Line agent emulator, the Twilio REST fake, and simulated callers: most hang up,
some press `#` (the agent says goodbye and hangs up), some have the agent's tool POST end_call
or a transfer nobody takes (back to an agent), some hang up before the agent does (Twilio
answers the hang-up 404), some lose their agent's socket mid-call (the gateway reopens it);
forged webhooks and upgrades, bad control requests and junk frames now and then. The agent has
bad moments too (see `agent_weather`): busy, so that the calls starting then get the fallback;
restarting, so that every call's agent is reopened, slowly. Every series is the gateway's own
count. Prometheus (Debian's `prometheus`, started here with a scrape config of its own in a
temporary folder) scrapes /metrics every 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from websockets.asyncio.client import connect

from gateway import logging as gateway_logging
from gateway.sandbox.agent import AgentBehaviour, AgentCall
from gateway.sandbox.harness import Sandbox, sandbox
from gateway.sandbox.script import CallScript
from gateway.sandbox.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRAPE_S = 5
TROUBLE_EVERY_S = 60


async def post_json(url: str, body: dict[str, Any]) -> int:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
        return resp.status


async def one_call(box: Sandbox, rng: random.Random) -> None:
    call = await box.connect_call()
    kinds = {"hangup": 40, "goodbye": 18, "tool_end": 14, "dropped": 10, "transfer": 8, "gone": 5, "junk": 5}
    (kind,) = rng.choices(list(kinds), list(kinds.values()))
    talk = rng.uniform(4, 12)
    if kind == "hangup":
        await call.run(CallScript(hangup_at=talk, max_s=30))
    elif kind == "dropped":  # its agent's socket goes, with no close frame or with 1011
        runner = asyncio.create_task(call.run(CallScript(hangup_at=talk, max_s=30)))
        await asyncio.sleep(rng.uniform(1.5, talk - 1.5))
        for agent_call in live_agent_calls(box):
            if agent_call.metadata.get("call_sid") == call.call_sid:
                box.agent.drop(agent_call, rng.choice([None, 1011]), "internal error")
        await runner
    elif kind == "junk":
        runner = asyncio.create_task(call.run(CallScript(hangup_at=talk, max_s=30)))
        await asyncio.sleep(1)
        await call.send("not a Twilio frame")
        await runner
    elif kind in ("goodbye", "gone"):
        if kind == "gone":
            box.rest.forget_call(call.call_sid)  # Twilio has ended it already: the hang-up gets 404
        await call.run(CallScript(dtmf=[(talk, "#")], max_s=30))
    elif kind == "tool_end":
        await call.run(CallScript(dtmf=[(talk, "7")], max_s=30))
    else:
        await call.run(CallScript(dtmf=[(talk, "9")], max_s=30))  # the agent's tool: transfer
        redirects = box.rest.redirects(call.call_sid)
        found = redirects and re.search(r'action="([^"]+)"', redirects[-1].form["Twiml"])
        if not found:
            return
        action = found.group(1).replace("&amp;", "&")[len(box.url) :]
        form = {**call.webhook_form(), "CallStatus": "in-progress", "DialCallStatus": "busy"}
        status, twiml = await call.post(action, {**form, "DialCallSid": "CA" + "d" * 32})
        if status == 200 and call.follow(twiml):
            call.ended.clear()
            await call.open_stream()
            await call.run(CallScript(hangup_at=rng.uniform(3, 6), max_s=30))


async def noise(box: Sandbox, rng: random.Random) -> None:
    """Now and then: a forged webhook or upgrade, a control request for no call, a bad one."""
    choice = rng.choice(["webhook", "upgrade", "no_call", "bad_action"])
    if choice == "webhook":
        await box.new_call().dial(signature="Zm9yZ2Vk")
    elif choice == "upgrade":
        call = box.new_call()
        if await call.dial() == 200:
            with contextlib.suppress(Exception):
                await connect(call.stream_url, additional_headers={"X-Twilio-Signature": "x"}, proxy=None)
            box.rest.complete_call(call.call_sid)
    elif choice == "no_call":
        await post_json(f"{box.url}/control/{'x' * 43}", {"action": "end_call"})
    elif live := live_agent_calls(box):
        await post_json(rng.choice(live).metadata["control_url"], {"action": "dance"})


def live_agent_calls(box: Sandbox) -> list[AgentCall]:
    return [a for a in box.agent.calls if a.start is not None and not a.closed.is_set()]


async def agent_weather(box: Sandbox, rng: random.Random, seconds: float) -> None:
    """The agent emulator's behaviour, set here only: an ack delay that wanders (~100 ms, a long
    tail) and, every TROUBLE_EVERY_S, in turn: busy (429 for 5 s: the calls that start then get
    the fallback) or restarting (every socket closed 1012, 503 for 1 s, then acks 4.2 s late
    for 5 s: each call's agent is reopened, and the caller audio held meanwhile outgrows its
    5 s bound, so some is dropped)."""
    b, trouble = box.agent.behaviour, itertools.cycle(["busy", "restart"])
    deadline, next_trouble = time.monotonic() + seconds, time.monotonic() + TROUBLE_EVERY_S / 2
    while time.monotonic() < deadline:
        b.ack_delay_s = rng.lognormvariate(-2.3, 0.6)
        await asyncio.sleep(0.2)
        if time.monotonic() < next_trouble:
            continue
        next_trouble += TROUBLE_EVERY_S
        if next(trouble) == "busy":
            b.refuse_status = 429
            await asyncio.sleep(5)
        else:
            for agent_call in live_agent_calls(box):
                box.agent.drop(agent_call, 1012, "service restart")
            b.refuse_status = 503
            await asyncio.sleep(1)
            b.refuse_status, b.ack_delay_s = 0, 4.2
            await asyncio.sleep(5)
        b.refuse_status = 0


def forget(box: Sandbox) -> None:
    """The sandbox keeps every call (and what its caller heard) for tests to read; here, only
    the live ones, so that the process's memory is mostly the gateway's."""
    for sid in [sid for sid, call in box.calls.items() if call.ended.is_set()]:
        del box.calls[sid]
    box.agent.calls[:] = [a for a in box.agent.calls if not a.closed.is_set()]
    del box.rest.requests[:-200]


async def drive(box: Sandbox, seconds: float, concurrency: int, seed: int) -> None:
    rng, tasks = random.Random(seed), set[asyncio.Task[None]]()
    deadline = time.monotonic() + seconds
    weather = asyncio.create_task(agent_weather(box, random.Random(seed + 1), seconds))
    while time.monotonic() < deadline:
        # The load swells and ebbs (a few minutes' cycle), so the panels have a shape.
        phase = (time.monotonic() % 240) / 240
        target = max(1, round(concurrency * (0.55 + 0.45 * abs(2 * phase - 1))))
        if len(tasks) < target:
            forget(box)
            task = asyncio.create_task(one_call(box, rng))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if rng.random() < 0.08:
            task = asyncio.create_task(noise(box, rng))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(rng.uniform(0.2, 0.8))
    await asyncio.gather(weather, *tasks, return_exceptions=True)


@contextlib.contextmanager
def prometheus(target: str, port: int) -> Any:
    with tempfile.TemporaryDirectory(prefix="line-gateway-prom-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {SCRAPE_S}s\n  evaluation_interval: {SCRAPE_S}s\n"
            f"scrape_configs:\n  - job_name: line-gateway\n    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        cmd = ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp}/data"]
        cmd += [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
        proc = subprocess.Popen(cmd)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=20)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    args = parser.parse_args()
    log_path = Path(tempfile.gettempdir()) / "line-gateway-dashboard-demo.log"
    gateway_logging.configure("warning", "json", stream=log_path.open("w"))
    print(f"gateway log: {log_path}")
    behaviour = AgentBehaviour(greeting_s=1.5, goodbye_s=0.8, extra_frames=("{not json",), pace=1.0)
    async with sandbox(behaviour, transfer_allow=("+1555*",)) as box:
        with prometheus(box.url.removeprefix("http://"), free_port()) as prom:
            print(f"gateway {box.url}, prometheus {prom}; {args.minutes:g} min of calls", flush=True)
            await asyncio.sleep(2 * SCRAPE_S)
            await drive(box, args.minutes * 60, args.concurrency, args.seed)
            await asyncio.sleep(3 * SCRAPE_S)  # the last calls' end, scraped
            caption = (
                "Rendered by deploy/grafana/render.py (uPlot in headless Chromium), not Grafana, "
                f"from the panels' PromQL evaluated by Prometheus {prometheus_version()} that scraped "
                "a sandbox gateway carrying simulated calls (scripts/dashboard_demo.py); every series "
                "is the gateway's own count. CPU and RSS are of the one process running the gateway, "
                "agent and callers."
            )
            render = [sys.executable, str(ROOT / "deploy" / "grafana" / "render.py"), "--prometheus", prom]
            render += ["--minutes", f"{args.minutes + 0.5:g}", "--out", args.out, "--caption", caption]
            await asyncio.to_thread(subprocess.run, render, check=True)


def prometheus_version() -> str:
    out = subprocess.run(["prometheus", "--version"], capture_output=True, text=True).stdout
    found = re.search(r"version (\d+\.\d+\.\d+)", out)
    return found.group(1) if found else ""


if __name__ == "__main__":
    asyncio.run(main())
