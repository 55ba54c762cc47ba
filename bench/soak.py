"""Soak test: one `line-gateway serve` on a real redis-server, many calls with churn, agent sockets
dropped at random, Redis restarted at the midpoint. Not run in CI.

    python -m bench.soak --calls 100 --minutes 30              # the full soak
    nice -n 10 python -m bench.soak --calls 20 --minutes 3     # a short form (the warm-up scales)

What runs: a throwaway redis-server (tests/redis_server.py); the gateway in its own process
(`python -m gateway.cli serve`, REDIS_URL set, LOG_LEVEL=info, its log to bench/results/); in
this process the sandbox's agent emulator talking without end (`AgentBehaviour(continuous=True)`)
and the Twilio REST fake; and the simulated Twilio callers (`gateway.sandbox.caller.
SimulatedCall`) in `--workers` processes of their own (`python -m bench.soak --worker`, driven
over JSON lines): callers and agent together cost about 2 % of a core per call.

Each call lives a random 20-120 s (`--life-s`), then hangs up and a new one takes its place.
Every `--drop-every-s` one live call's agent socket is dropped (no close frame, 1011, 1001, or
1000 "connection idle timeout", at random; at most 2 per call, below AGENT_RECONNECTS); the
gateway is expected to reopen it with `metadata.resumed`. Halfway, Redis is restarted (its data
lost) and the gateway's calls are expected back in it within 5 s.

Each caller frame carries its sequence number in its first bytes (quiet mu-law, so the agent
never takes it for speech), so the frames each agent session received are matched against those
the caller sent: a frame may be lost only inside the caller-side audio gap a drop made (from the
old session's last audio the caller heard to the new one's first), or in flight just before it.

Targets (PASS/FAIL, exit status 1 on any FAIL): no caller frame lost outside those gaps; every
drop resumed, with a caller-side gap of at most `--max-gap-s`; every call started and ran to its
own hang-up; the registry back within 5 s of the Redis restart; the gateway's RSS grew at most
5 % from 1/6 of the run (minute 5 of 30) to its end; after the last call: no `lgw:call:*` or
`lgw:token:*` key in Redis, `gateway_calls_active` 0, no agent socket open or opened late; no
exception in the gateway's log. A JSON of everything measured goes beside the log.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import itertools
import json
import math
import os
import random
import resource
import secrets
import signal
import subprocess
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import redis.asyncio as aioredis

from gateway.sandbox.agent import AgentBehaviour, AgentCall, AgentEmulator
from gateway.sandbox.caller import SimulatedCall
from gateway.sandbox.harness import ACCOUNT_SID
from gateway.sandbox.script import CallScript
from gateway.sandbox.servers import free_port, serve, tune_gc
from gateway.sandbox.twilio_rest_fake import TwilioRestFake
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
KEY_PREFIX = "lgw:"  # the Redis registry's default key prefix

# Targets
MAX_RSS_GROWTH = 0.05  # from the end of the warm-up to the end of the run
WARMUP_FRACTION = 1 / 6  # minute 5 of 30
REDIS_RECOVERY_S = 5.0  # the instance re-registers its calls within this long (tests/test_cluster.py)
DEFAULT_MAX_GAP_S = 1.5  # tests/test_survival.py's bound on the caller's silence around a drop

# The soak's own timing
SAMPLE_EVERY_S = 10.0
RAMP_S = 10.0  # the first calls start spread over at most this long
CALLS_PER_WORKER = 40  # callers per worker process, by default
MAX_DROPS_PER_CALL = 2  # below AGENT_RECONNECTS (3): a drop never exhausts a call's reconnects
SETTLED_BEFORE_DROP_S = 3.0  # a call's agent session has talked this long before it is dropped
LEFT_AFTER_DROP_S = 10.0  # and the call has this long still to live
RESUME_WAIT_S = 10.0  # a drop not resumed within this long counts as not resumed
AROUND_DROP_S = 1.0  # the gap around a drop is looked for from this long before it to this long
# after the new session's first audio
IN_FLIGHT_S = 0.5  # frames sent this long before a drop's gap may have been unread by the dead agent
LONG_GAP_S = 0.5  # a caller-side gap this long away from any drop is reported
STALL_S = 0.1  # a soak process's event loop this late is a stall of its own
STOP_DROPPING_BEFORE_END_S = 15.0
END_WAIT_S = 30.0  # after the last hang-up: for the registry and the gauge to empty

# Agent drops: kind -> (close code or None for no close frame, reason)
DROP_KINDS: dict[str, tuple[int | None, str]] = {
    "abort": (None, ""),
    "1011": (1011, "internal error"),
    "1001": (1001, "going away"),
    "1000_idle": (1000, "connection idle timeout"),
}

# Caller frames: 160 bytes of mu-law; the first 6 carry the sequence number, a nibble each in
# 0xF0-0xFF (the quietest mu-law codes: about -63 dBFS at most, never speech to the agent), then a
# 2-byte marker, then silence.
FRAME_BYTES = 160
STAMP_NIBBLES = 6
MARKER = b"\x7e\x7d"
TAIL = b"\xff" * (FRAME_BYTES - STAMP_NIBBLES - len(MARKER))


def stamp(seq: int) -> bytes:
    return bytes(0xF0 | ((seq >> (4 * i)) & 0xF) for i in range(STAMP_NIBBLES)) + MARKER + TAIL


def read_stamps(audio: bytes | bytearray) -> tuple[array[int], int]:
    """The sequence numbers of the whole frames in `audio` (and how many bytes that took); a
    frame without the marker reads -1."""
    whole = len(audio) - len(audio) % FRAME_BYTES
    frames = np.frombuffer(bytes(audio[:whole]), dtype=np.uint8).reshape(-1, FRAME_BYTES)
    marker = np.frombuffer(MARKER, dtype=np.uint8)
    marked = np.all(frames[:, STAMP_NIBBLES : STAMP_NIBBLES + len(MARKER)] == marker, axis=1)
    nibbles = (frames[:, :STAMP_NIBBLES] & 0xF).astype(np.int64)
    seqs = (nibbles << np.arange(0, 4 * STAMP_NIBBLES, 4)).sum(axis=1)
    seqs[~marked] = -1
    return array("q", seqs.tobytes()), whole


def pack(values: array[float]) -> str:
    return base64.b64encode(values.tobytes()).decode()


def unpack(text: str) -> array[float]:
    values: array[float] = array("d")
    values.frombytes(base64.b64decode(text))
    return values


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Pauses:
    """A soak process's own stalls, so that a gap the callers hear then is not blamed on the
    gateway: its event loop running late, its garbage collections, its own bookkeeping."""

    def __init__(self) -> None:
        self.stalls: list[tuple[float, float]] = []  # (monotonic start, ms late)
        self.longest_ms: dict[str, float] = {"gc": 0.0, "bookkeeping": 0.0}
        self._gc_began = 0.0

    def install(self) -> None:
        # Collect garbage as the gateway does (many calls' worth of objects, few cycles).
        tune_gc()
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_began = time.perf_counter()
        elif self._gc_began:
            self.timed("gc", self._gc_began)

    def timed(self, what: str, began: float) -> None:
        self.longest_ms[what] = max(self.longest_ms.get(what, 0.0), (time.perf_counter() - began) * 1000)

    async def watch(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.05)
            late = time.monotonic() - before - 0.05
            if late > STALL_S:
                self.stalls.append((before, round(late * 1000)))


# The callers' side: `python -m bench.soak --worker`


class ArrivalTimes(list[tuple[float, int]]):
    """Stands in for SimulatedCall.media_arrivals: keeps each arrival's time only, compactly."""

    def __init__(self) -> None:
        super().__init__()
        self.times: array[float] = array("d")

    def append(self, item: tuple[float, int]) -> None:
        self.times.append(item[0])


class SoakCall(SimulatedCall):
    """A simulated caller whose every frame is stamped with its sequence number and send time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.send_times: array[float] = array("d")
        self.stop_seq: int | None = None  # frames sent before `stop`
        self.arrivals = ArrivalTimes()
        self.media_arrivals = self.arrivals

    async def send_media(self, mulaw: bytes) -> None:
        seq = len(self.send_times)
        self.send_times.append(time.monotonic())
        await super().send_media(stamp(seq))

    async def send_stop(self) -> None:
        if self.stop_seq is None:
            self.stop_seq = len(self.send_times)
        await super().send_stop()


class CallerWorker:
    """Runs its share of the call slots; tells the driver when each call is live and, when it
    ends, everything the caller measured (JSON lines on `out`)."""

    def __init__(self, config: dict[str, Any], out: asyncio.StreamWriter) -> None:
        self.cfg = config
        self.out = out
        self.rng = random.Random(f"{config['seed']}/{config['index']}")
        self.numbers = itertools.count(1)
        self.stopping = asyncio.Event()
        self.live: dict[str, SoakCall] = {}
        self.pauses = Pauses()

    def emit(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message).encode() + b"\n")

    async def run(self, commands: asyncio.StreamReader) -> None:
        self.pauses.install()
        helpers = [asyncio.create_task(self.pauses.watch()), asyncio.create_task(self._housekeeping())]
        slots = [asyncio.create_task(self._slot(slot)) for slot in self.cfg["slots"]]
        listener = asyncio.create_task(self._listen(commands))
        await asyncio.gather(*slots)
        for task in [*helpers, listener]:
            task.cancel()
        self.emit(
            {
                "ev": "done",
                "cpu_s": self_cpu_s(),
                "stalls": self.pauses.stalls,
                "longest_ms": self.pauses.longest_ms,
            }
        )
        await self.out.drain()

    async def _listen(self, commands: asyncio.StreamReader) -> None:
        while line := await commands.readline():
            if json.loads(line).get("cmd") == "stop":
                self.stopping.set()
        self.stopping.set()  # the driver has gone: wind down

    async def _housekeeping(self) -> None:
        """Let go of what the simulated callers keep and the soak does not need."""
        while True:
            await asyncio.sleep(SAMPLE_EVERY_S)
            began = time.perf_counter()
            for call in self.live.values():
                call.received.clear()
                del call.heard[:]
                del call.sent_audio[:]
            self.pauses.timed("bookkeeping", began)

    async def _slot(self, slot: int) -> None:
        await asyncio.sleep(slot * self.cfg["ramp_step_s"])
        while not self.stopping.is_set():
            try:
                await self._one_call(slot)
            except Exception as exc:  # the soak goes on
                print(f"soak worker {self.cfg['index']}: slot {slot}: {exc!r}", file=sys.stderr)
                await asyncio.sleep(1)

    async def _one_call(self, slot: int) -> None:
        cfg = self.cfg
        planned = self.rng.uniform(*cfg["life_s"])
        call = SoakCall(
            cfg["gateway_url"],
            cfg["auth_token"],
            account_sid=cfg["account_sid"],
            from_=f"+1555{cfg['index']}{next(self.numbers):06d}",
        )
        base = {
            "sid": call.call_sid,
            "slot": slot,
            "planned_s": round(planned, 1),
            "started": time.monotonic(),
        }
        failure = ""
        try:
            async with asyncio.timeout(15):
                status = await call.dial()
                if status != 200:
                    failure = f"webhook answered {status}"
                else:
                    await call.open_stream()
        except Exception as exc:
            failure = f"did not start: {exc!r}"[:200]
        if failure:
            self.emit({"ev": "failed", **base, "failure": failure})
            await asyncio.sleep(1)  # no tight loop against a gateway that refuses
            return
        self.emit({"ev": "live", **base})
        self.live[call.call_sid] = call
        try:
            failure = await self._talk(call, planned)
        finally:
            self.live.pop(call.call_sid, None)
        self.emit(
            {
                "ev": "ended",
                "sid": call.call_sid,
                "ended": time.monotonic(),
                "end_reason": call.end_reason,
                "failure": failure,
                "frames_sent": call.stop_seq if call.stop_seq is not None else len(call.send_times),
                "send_times": pack(call.send_times),
                "arrivals": pack(call.arrivals.times),
            }
        )
        await self.out.drain()

    async def _talk(self, call: SoakCall, planned: float) -> str:
        """Until the call's own hang-up (or the soak's end); what went wrong, if anything."""
        script = CallScript(max_s=planned)
        runner = asyncio.create_task(call.run(script))
        stop = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({runner, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not runner.done():
                script.hangup_at = 0.0  # the caller's own loop hangs up at its next frame
            try:
                async with asyncio.timeout(10):
                    await runner
            except TimeoutError:
                await call.hang_up()
                return "the simulated caller did not hang up within 10 s"
        finally:
            stop.cancel()
        ws = getattr(call, "_ws", None)  # how the gateway closed the media socket, if it did
        closed = f"media socket closed {getattr(ws, 'close_code', None)} {getattr(ws, 'close_reason', '')!r}"
        if call.first_audio_at is None:
            return f"never heard the agent ({closed})"
        if call.end_reason != "caller hung up" or call.stream_lost:
            return f"ended by the other side: {call.end_reason!r}, stream lost: {call.stream_lost}, {closed}"
        return ""


async def worker_main() -> int:
    """A caller worker: its config is the first line on stdin, then commands; its events go out on
    what was stdout (anything printed goes to stderr instead, not into the events)."""
    loop = asyncio.get_running_loop()
    events_fd = os.dup(1)
    os.dup2(2, 1)
    commands = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(events_fd, "wb", buffering=0)
    )
    out = asyncio.StreamWriter(transport, protocol, None, loop)
    config = json.loads(await commands.readline())
    await CallerWorker(config, out).run(commands)
    transport.close()
    return 0


# The driver's side: what is measured


@dataclass
class Drop:
    call_sid: str
    kind: str
    at_s: float  # since the run started
    at: float = 0.0  # monotonic
    resumed: bool = False
    resumed_meta: dict[str, Any] = field(default_factory=dict)
    resumed_at: float | None = None  # the new session's first audio, as the agent sent it (monotonic)
    resume_ms: float | None = None  # drop -> resumed_at
    gap_ms: float | None = None  # the longest caller-side gap around the drop
    switch_gap_ms: float | None = None  # the old session's last audio heard -> the new one's first
    gap: tuple[float, float] | None = None  # (the drop or that last audio, that first audio), monotonic
    lost_frames: int = 0  # caller frames this drop cost (inside its gap, or in flight before it)
    lost_first_ms: float | None = None  # send time of the first and last of them, from the drop
    lost_last_ms: float | None = None


@dataclass
class CallResult:
    call_sid: str
    slot: int
    started_s: float
    planned_s: float
    lived_s: float = 0.0
    failure: str = ""  # did not start, never heard the agent, or ended other than by its hang-up
    end_reason: str = ""
    sessions: int = 0
    drops: int = 0
    frames_sent: int = 0
    frames_received: int = 0  # distinct, by the agent, over all its sessions
    lost_in_gaps: int = 0
    lost_outside: int = 0
    lost_outside_at_s: list[float] = field(default_factory=list)  # send times (run time), first 10
    duplicated: int = 0
    reordered: int = 0
    unstamped: int = 0
    # Caller-side gaps > LONG_GAP_S away from any drop: (start in run time s, into the call s, ms)
    long_gaps: list[tuple[float, float, float]] = field(default_factory=list)


@dataclass
class Sample:
    t_s: float
    rss_kib: int
    live_calls: int
    gateway_cpu_s: float


@dataclass
class Live:
    result: CallResult
    started: float  # monotonic
    ends_at: float
    drops: list[Drop] = field(default_factory=list)
    session_since: float = 0.0  # when its current agent session started talking (0: not yet)
    dropping: asyncio.Task[None] | None = None


# Processes


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def proc_cpu_s(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Gateway:
    """`python -m gateway.cli serve` in its own process (as tests/test_cluster.py's
    GatewayProcess), its log written to a file: a pipe nobody reads would stall it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        inherited = {
            k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "CARTESIA_", "REDIS_"))
        }
        self.env = {**inherited, "PUBLIC_URL": self.url, **env, "PORT": str(self.port)}
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        self.proc = subprocess.Popen(  # noqa: ASYNC220 (starting a child does not block)
            [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/readyz") as resp:
                        if resp.status == 200:
                            return
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
        raise RuntimeError(f"the gateway did not start; its log: {self.log_path}")

    def stop(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return None if self.proc is None else self.proc.returncode


class WorkerProcess:
    """One `python -m bench.soak --worker`: the callers of some of the slots."""

    def __init__(self, index: int, slots: list[int]) -> None:
        self.index = index
        self.slots = slots
        self.proc: asyncio.subprocess.Process | None = None
        self.done = asyncio.Event()
        self.stats: dict[str, Any] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(
        self, config: dict[str, Any], on_event: Callable[[WorkerProcess, dict[str, Any]], None]
    ) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.soak",
            "--worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            limit=1 << 26,
        )
        self.send({**config, "index": self.index, "slots": self.slots})
        self._reader = asyncio.create_task(self._read(on_event))

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        with contextlib.suppress(ConnectionError):
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")

    async def _read(self, on_event: Callable[[WorkerProcess, dict[str, Any]], None]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if message.get("ev") == "done":
                    self.stats = message
                on_event(self, message)
        finally:
            self.done.set()

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                if proc.stdin is not None:
                    proc.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            self._reader.cancel()


def parse_metrics(text: str) -> dict[str, float]:
    series: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                series[name] = float(value)
    return series


@dataclass
class LogSummary:
    lines: int = 0
    levels: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)  # event -> count, level warning
    errors: dict[str, int] = field(default_factory=dict)  # event -> count, level error and above
    exceptions: list[str] = field(default_factory=list)  # lines with a traceback (first 20)
    error_lines: list[str] = field(default_factory=list)  # the first 20 error-level lines
    other_lines: list[str] = field(default_factory=list)  # lines that are not JSON (first 20)


def scan_log(path: Path) -> LogSummary:
    summary = LogSummary()
    levels: Counter[str] = Counter()
    warnings: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        summary.lines += 1
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError
        except ValueError:
            if line.strip() and len(summary.other_lines) < 20:
                summary.other_lines.append(line[:300])
            if "Traceback" in line and len(summary.exceptions) < 20:
                summary.exceptions.append(line[:1000])
            continue
        level = str(record.get("level", "?"))
        event = str(record.get("event", "?"))
        levels[level] += 1
        if level == "warning":
            warnings[event] += 1
        elif level in ("error", "critical", "exception"):
            errors[event] += 1
            if len(summary.error_lines) < 20:
                summary.error_lines.append(line[:600])
        if ("exception" in record or "exc_info" in record or "Traceback" in line) and len(
            summary.exceptions
        ) < 20:
            summary.exceptions.append(line[:2000])
    summary.levels = dict(levels)
    summary.warnings = dict(warnings.most_common())
    summary.errors = dict(errors.most_common())
    return summary


def pctl(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def measure_gap(drop: Drop, arrivals: array[float], call_ended: float) -> None:
    """The caller-side gaps around a resumed drop, from the times the caller heard agent audio."""
    if drop.resumed_at is None:
        return
    since = drop.at - AROUND_DROP_S
    until = min(drop.resumed_at + AROUND_DROP_S, call_ended)
    times = np.frombuffer(arrivals, dtype=np.float64)
    heard = times[(times > since) & (times < until)].tolist()
    edges = [since, *heard, until]
    drop.gap_ms = round(max(b - a for a, b in itertools.pairwise(edges)) * 1000, 1)
    # The silence the drop itself made: from the old session's last audio the caller heard (or
    # the drop, if earlier) to the new session's first.
    new_first = next((t for t in heard if t >= drop.resumed_at), until)
    old_last = max((t for t in heard if t < new_first), default=drop.at)
    drop.gap = (min(drop.at, old_last), new_first)
    drop.switch_gap_ms = round((new_first - old_last) * 1000, 1)


# The soak


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.duration_s = args.minutes * 60.0
        self.warmup_s = self.duration_s * WARMUP_FRACTION
        stamp_utc = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        RESULTS_DIR.mkdir(exist_ok=True)
        self.log_path = RESULTS_DIR / f"soak-{stamp_utc}-gateway.log"
        self.json_path = Path(args.json) if args.json else RESULTS_DIR / f"soak-{stamp_utc}.json"
        self.auth_token = secrets.token_hex(16)
        self.rest = TwilioRestFake(ACCOUNT_SID, self.auth_token)
        self.rest.on_update = self._carrier_update
        self.rest_updates: list[tuple[str, dict[str, str]]] = []
        self.agent = AgentEmulator(AgentBehaviour(continuous=True, greeting_s=0.3))
        self.redis_server = RedisServer()
        self.redis: aioredis.Redis | None = None
        self.gateway: Gateway | None = None
        self.workers: list[WorkerProcess] = []
        self.t0 = 0.0
        self.live: dict[str, Live] = {}
        self.finishing: dict[str, Live] = {}
        self.finishers: set[asyncio.Task[None]] = set()
        self.accounted: set[str] = set()
        self.results: list[CallResult] = []
        self.drops: list[Drop] = []
        self.samples: list[Sample] = []
        self.end_sample: Sample | None = None
        self.session_stamps: dict[int, array[int]] = {}  # id(AgentCall) -> stamps read so far
        self.redis_restart: dict[str, Any] = {}
        self.end: dict[str, Any] = {}
        self.metrics_at_end: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.pauses = Pauses()
        self.orphans: list[dict[str, Any]] = []  # agent sessions of calls already over

    def now_s(self) -> float:
        return time.monotonic() - self.t0

    async def _carrier_update(self, call_sid: str, form: dict[str, str]) -> None:
        # The gateway updated a call through Twilio's REST API (a fallback, or a hang-up): the
        # callers are in other processes, so it is noted, not played.
        self.rest_updates.append((call_sid, dict(form)))

    # Running

    async def run(self) -> int:
        self.redis_server.start()
        self.redis = aioredis.Redis.from_url(self.redis_server.url)
        try:
            async with serve(self.rest.app) as rest_url, self.agent.running():
                self.gateway = Gateway(
                    {
                        "REDIS_URL": self.redis_server.url,
                        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
                        "TWILIO_AUTH_TOKEN": self.auth_token,
                        "TWILIO_API_BASE": rest_url,
                        "CARTESIA_API_KEY": "sk_soak",
                        "CARTESIA_AGENT_ID": "agent_soak",
                        "CARTESIA_URL": self.agent.url,
                        "CARTESIA_OUTPUT_FORMAT": "mulaw_8000",
                        "END_CALL_DRAIN_S": "2",
                        "LOG_LEVEL": "info",
                    },
                    self.log_path,
                )
                try:
                    await self.gateway.start()
                    await self._soak()
                finally:
                    for worker in self.workers:
                        await worker.stop()
                    self.end["gateway_exit_code"] = self.gateway.stop()
        finally:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
            await asyncio.to_thread(self.redis_server.close)
        return self.report()

    async def _soak(self) -> None:
        assert self.gateway is not None
        args = self.args
        count = args.workers or math.ceil(args.calls / CALLS_PER_WORKER)
        self.workers = [WorkerProcess(i, list(range(i, args.calls, count))) for i in range(count)]
        print(
            f"soak: {args.calls} calls ({count} caller processes) for {args.minutes:g} min, a drop every "
            f"{args.drop_every_s:g} s, seed {args.seed}; gateway pid {self.gateway.pid}, "
            f"log {self.log_path.relative_to(ROOT)}",
            flush=True,
        )
        self.pauses.install()
        self.t0 = time.monotonic()
        cpu0, gw_cpu0 = self_cpu_s(), proc_cpu_s(self.gateway.pid)
        config = {
            "gateway_url": self.gateway.url,
            "auth_token": self.auth_token,
            "account_sid": ACCOUNT_SID,
            "seed": args.seed,
            "life_s": args.life_s,
            "ramp_step_s": min(RAMP_S / args.calls, 0.2),
        }
        for worker in self.workers:
            await worker.start(config, self._on_event)
        helpers = [
            asyncio.create_task(self._sampler()),
            asyncio.create_task(self.pauses.watch()),
            asyncio.create_task(self._dropper()),
            asyncio.create_task(self._restart_redis_at(self.duration_s / 2)),
        ]
        await asyncio.sleep(self.duration_s)
        self._sample()  # the end of the run, at full load
        self.end_sample = self.samples[-1] if self.samples else None
        self.end["live_at_stop"] = len(self.live)
        stopped = time.monotonic()
        for worker in self.workers:
            worker.send({"cmd": "stop"})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                for worker in self.workers:
                    await worker.done.wait()
        if self.finishers:
            await asyncio.wait(self.finishers, timeout=30)
        self.end["hang_up_s"] = round(time.monotonic() - stopped, 2)
        self.end["calls_stuck"] = len(self.live) + len(self.finishing)
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        elapsed = time.monotonic() - self.t0
        worker_cpu = sum(w.stats.get("cpu_s", 0.0) for w in self.workers)
        self.cpu = {
            "gateway_core": (proc_cpu_s(self.gateway.pid) - gw_cpu0) / elapsed,
            "driver_core": (self_cpu_s() - cpu0) / elapsed,
            "callers_core": worker_cpu / elapsed,
        }
        await self._wait_empty()

    def _on_event(self, worker: WorkerProcess, message: dict[str, Any]) -> None:
        event, sid = message.get("ev"), message.get("sid", "")
        if event in ("live", "failed"):
            started = message["started"]
            result = CallResult(sid, message["slot"], round(started - self.t0, 2), message["planned_s"])
            self.results.append(result)
            if event == "failed":
                result.failure = message["failure"]
                return
            self.rest.add_call(sid)
            self.live[sid] = Live(result, started, ends_at=started + message["planned_s"])
        elif event == "ended":
            live = self.live.pop(sid, None)
            if live is None:
                return
            self.finishing[sid] = live
            task = asyncio.create_task(self._finish(live, message))
            self.finishers.add(task)
            task.add_done_callback(self.finishers.discard)

    async def _finish(self, live: Live, message: dict[str, Any]) -> None:
        """The call has ended: the frames its agent sessions received against those sent."""
        result = live.result
        sid = result.call_sid
        try:
            result.lived_s = round(message["ended"] - live.started, 1)
            result.end_reason = message["end_reason"]
            result.failure = message["failure"]
            if live.dropping is not None:
                with contextlib.suppress(Exception):
                    await live.dropping
            sessions = self._sessions(sid)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    for session in sessions:
                        await session.closed.wait()
            began = time.perf_counter()
            arrivals = unpack(message["arrivals"])
            for drop in live.drops:
                measure_gap(drop, arrivals, message["ended"])
            self._account(live, sessions, message["frames_sent"], unpack(message["send_times"]))
            self._long_gaps(live, arrivals)
            self.pauses.timed("accounting", began)
        finally:
            self.accounted.add(sid)
            self.finishing.pop(sid, None)
            self.rest.calls.pop(sid, None)

    def _sessions(self, call_sid: str) -> list[AgentCall]:
        return [c for c in self.agent.calls if c.metadata.get("call_sid") == call_sid]

    def _account(self, live: Live, sessions: list[AgentCall], sent: int, send_times: array[float]) -> None:
        result = live.result
        result.sessions = len(sessions)
        result.drops = len(live.drops)
        result.frames_sent = sent
        seen: set[int] = set()
        highest = -1
        for session in sessions:
            for seq in self._drain_stamps(session):
                if seq < 0:
                    result.unstamped += 1
                    continue
                if seq in seen:
                    result.duplicated += 1
                    continue
                if seq < highest:
                    result.reordered += 1
                seen.add(seq)
                highest = max(highest, seq)
            self.session_stamps.pop(id(session), None)
            with contextlib.suppress(ValueError):
                self.agent.calls.remove(session)
        if not sessions:  # the call never reached an agent: its failure says why, not its frames
            return
        result.frames_received = len(seen & set(range(sent)))
        windows = [(d, d.gap[0] - IN_FLIGHT_S, d.gap[1]) for d in live.drops if d.gap is not None]
        for seq in range(sent):
            if seq in seen:
                continue
            at = send_times[seq]
            owner = next((d for d, lo, hi in windows if lo <= at <= hi), None)
            if owner is None:
                result.lost_outside += 1
                if len(result.lost_outside_at_s) < 10:
                    result.lost_outside_at_s.append(round(at - self.t0, 3))
                continue
            result.lost_in_gaps += 1
            owner.lost_frames += 1
            offset_ms = (at - owner.at) * 1000
            owner.lost_first_ms = min(
                offset_ms, owner.lost_first_ms if owner.lost_first_ms is not None else 1e9
            )
            owner.lost_last_ms = max(
                offset_ms, owner.lost_last_ms if owner.lost_last_ms is not None else -1e9
            )

    def _long_gaps(self, live: Live, arrivals: array[float]) -> None:
        """Caller-side gaps longer than LONG_GAP_S that no drop explains."""
        times = np.frombuffer(arrivals, dtype=np.float64)
        if times.size < 2:
            return
        around = [
            (d.at - AROUND_DROP_S, (d.resumed_at or d.at + RESUME_WAIT_S) + AROUND_DROP_S) for d in live.drops
        ]
        for i in np.flatnonzero(np.diff(times) > LONG_GAP_S).tolist():
            lo, hi = float(times[i]), float(times[i + 1])
            if not any(a <= hi and lo <= b for a, b in around):
                live.result.long_gaps.append(
                    (round(lo - self.t0, 3), round(lo - live.started, 2), round((hi - lo) * 1000))
                )

    def _drain_stamps(self, session: AgentCall) -> array[int]:
        """The stamps of everything `session` has received so far; its audio is let go of."""
        seqs, used = read_stamps(session.audio_in)
        del session.audio_in[:used]
        kept = self.session_stamps.setdefault(id(session), array("q"))
        kept.extend(seqs)
        return kept

    # Sampling and housekeeping

    def _sample(self) -> None:
        assert self.gateway is not None
        with contextlib.suppress(OSError):
            self.samples.append(
                Sample(
                    round(self.now_s(), 1),
                    proc_rss_kib(self.gateway.pid),
                    len(self.live),
                    proc_cpu_s(self.gateway.pid),
                )
            )

    async def _sampler(self) -> None:
        next_at = self.t0
        while True:
            self._sample()
            began = time.perf_counter()
            self._housekeeping()
            self.pauses.timed("bookkeeping", began)
            last = self.samples[-1] if self.samples else None
            if last is not None and len(self.samples) % 6 == 1:
                resumed = sum(1 for d in self.drops if d.resumed)
                print(
                    f"  t={last.t_s:6.0f} s  live {last.live_calls:4d}  RSS {last.rss_kib / 1024:7.1f} MiB  "
                    f"calls {len(self.results)}  drops {len(self.drops)} ({resumed} resumed)",
                    flush=True,
                )
            next_at += SAMPLE_EVERY_S
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def _housekeeping(self) -> None:
        """Let go of what the agent emulator keeps and the soak does not need (its memory stays
        flat over a long run); sessions of calls already over are orphans."""
        for session in list(self.agent.calls):
            session.frames_in.clear()
            del session.audio_out[1:-50]  # the first is when the session started talking
            sid = session.metadata.get("call_sid")
            if sid in self.live:
                self._drain_stamps(session)
            elif sid not in self.finishing and session.closed.is_set():
                meta = session.metadata
                self.orphans.append(
                    {
                        "call_sid": sid,
                        "call": "accounted" if sid in self.accounted else "unknown or never live",
                        "resumed": meta.get("resumed"),
                        "resume_reason": meta.get("resume_reason"),
                    }
                )
                self.agent.calls.remove(session)
                self.session_stamps.pop(id(session), None)

    # Faults

    def _current_session(self, call_sid: str) -> AgentCall | None:
        for session in reversed(self.agent.calls):
            if (
                session.metadata.get("call_sid") == call_sid
                and not session.closed.is_set()
                and session.audio_out
            ):
                return session
        return None

    async def _dropper(self) -> None:
        every = self.args.drop_every_s
        if every <= 0:
            return
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            if self.now_s() > self.duration_s - STOP_DROPPING_BEFORE_END_S:
                continue
            for sid, live in self.live.items():
                if not live.session_since and (session := self._current_session(sid)) is not None:
                    live.session_since = session.audio_out[0][0]
            candidates = [
                (sid, live)
                for sid, live in self.live.items()
                if (live.dropping is None or live.dropping.done())
                and len(live.drops) < MAX_DROPS_PER_CALL
                and live.session_since
                and now - live.session_since >= SETTLED_BEFORE_DROP_S
                and live.ends_at - now >= LEFT_AFTER_DROP_S
            ]
            if not candidates:
                continue
            sid, live = self.rng.choice(candidates)
            session = self._current_session(sid)
            if session is None:
                continue
            kind = self.rng.choice(list(DROP_KINDS))
            live.dropping = asyncio.create_task(self._drop(sid, live, session, kind))

    async def _drop(self, sid: str, live: Live, session: AgentCall, kind: str) -> None:
        drop = Drop(sid, kind, round(self.now_s(), 2), at=time.monotonic())
        live.drops.append(drop)
        self.drops.append(drop)
        live.session_since = 0.0
        code, reason = DROP_KINDS[kind]
        # The new session is none of these (held here, so that no new object takes one's id).
        existing = list(self.agent.calls)
        before = {id(s) for s in existing}
        self.agent.drop(session, code, reason)
        new: AgentCall | None = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RESUME_WAIT_S):
                while new is None:
                    await asyncio.sleep(0.02)
                    new = next(
                        (
                            s
                            for s in reversed(self.agent.calls)
                            if id(s) not in before and s.metadata.get("call_sid") == sid and s.audio_out
                        ),
                        None,
                    )
        del existing
        if new is None:
            return
        drop.resumed = True
        drop.resumed_at = new.audio_out[0][0]
        drop.resumed_meta = {k: new.metadata.get(k) for k in ("resumed", "resume_reason")}
        drop.resume_ms = round((drop.resumed_at - drop.at) * 1000, 1)
        live.session_since = drop.resumed_at

    async def _restart_redis_at(self, at_s: float) -> None:
        await asyncio.sleep(max(0.0, self.t0 + at_s - time.monotonic()))
        # Calls talking for 2 s at least: registered for sure.
        now = time.monotonic()
        watch = {
            sid
            for sid, live in self.live.items()
            if now - live.started > 2.0 and self._current_session(sid) is not None
        }
        before = await self._missing(watch)
        started = time.monotonic()
        self.redis_restart = {"at_s": round(self.now_s(), 1), "watched_calls": len(watch)}
        self.redis_restart["missing_before"] = len(before)
        await asyncio.to_thread(self.redis_server.restart)
        self.redis_restart["down_ms"] = round((time.monotonic() - started) * 1000)
        recovered_s: float | None = None
        missing: set[str] = set(watch)
        while time.monotonic() - started < 20:
            missing = await self._missing({sid for sid in watch if sid in self.live})
            if not missing:
                recovered_s = time.monotonic() - started
                break
            await asyncio.sleep(0.25)
        still = {sid for sid in watch if sid in self.live}
        self.redis_restart.update(
            recovered_s=None if recovered_s is None else round(recovered_s, 2),
            still_live=len(still),
            missing_after_20s=len(missing),
        )
        print(
            f"  t={self.now_s():6.0f} s  Redis restarted at {self.redis_restart['at_s']:.0f} s: "
            + (
                f"{len(still)} live calls back in the registry after {recovered_s:.2f} s"
                if recovered_s is not None
                else f"{len(missing)} of {len(still)} live calls still missing after 20 s"
            ),
            flush=True,
        )

    async def _missing(self, sids: set[str]) -> set[str]:
        """Which of these calls have no record in Redis (all of them while Redis does not answer)."""
        assert self.redis is not None
        if not sids:
            return set()
        ordered = sorted(sids)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for sid in ordered:
                    pipe.exists(f"{KEY_PREFIX}call:{sid}")
                found = await pipe.execute()
        except (aioredis.RedisError, OSError):
            return set(sids)
        return {sid for sid, hit in zip(ordered, found, strict=True) if not hit}

    # The end

    async def _keys(self, pattern: str) -> int | None:
        assert self.redis is not None
        try:
            return len([k async for k in self.redis.scan_iter(match=KEY_PREFIX + pattern, count=1000)])
        except (aioredis.RedisError, OSError):
            return None

    async def _metrics(self) -> dict[str, float]:
        assert self.gateway is not None
        try:
            async with aiohttp.ClientSession() as http, http.get(self.gateway.url + "/metrics") as resp:
                return parse_metrics(await resp.text())
        except aiohttp.ClientError:
            return {}

    async def _wait_empty(self) -> None:
        """After the last hang-up: until no call is active and no call is in the registry."""
        started = time.monotonic()
        active: float | None = None
        call_keys: int | None = None
        token_keys: int | None = None
        while time.monotonic() - started < END_WAIT_S:
            metrics = await self._metrics()
            active = metrics.get("gateway_calls_active")
            call_keys = await self._keys("call:*")
            token_keys = await self._keys("token:*")
            if active == 0 and call_keys == 0 and token_keys == 0:
                break
            await asyncio.sleep(0.5)
        self.end.update(
            empty_after_s=round(time.monotonic() - started, 2),
            calls_active=active,
            call_keys=call_keys,
            token_keys=token_keys,
            agent_sockets_open=self.agent.live_sockets(),
        )
        self.end["leftovers"] = await self._leftovers() if call_keys or token_keys else []
        self._housekeeping()  # every call is over: any agent session left is an orphan
        self.metrics_at_end = await self._metrics()
        self._sample()

    async def _leftovers(self) -> list[dict[str, Any]]:
        """What is left of calls in Redis after every call ended: key, TTL, and when its call ran."""
        assert self.redis is not None
        by_sid = {r.call_sid: r for r in self.results}
        found: list[dict[str, Any]] = []
        try:
            for pattern in ("call:*", "token:*"):
                async for key in self.redis.scan_iter(match=KEY_PREFIX + pattern, count=1000):
                    name = key.decode()
                    sid = name.rsplit(":", 1)[1]
                    if pattern == "token:*":
                        sid = ((await self.redis.get(key)) or b"").decode()
                    r = by_sid.get(sid)
                    ran = None if r is None else [r.started_s, round(r.started_s + r.lived_s, 2)]
                    found.append(
                        {
                            "key": name[:40],
                            "call_sid": sid,
                            "ttl_s": await self.redis.ttl(key),
                            "call_ran_s": ran,
                            "call_failure": None if r is None else r.failure,
                        }
                    )
                    if len(found) >= 20:
                        return found
        except (aioredis.RedisError, OSError) as exc:
            found.append({"error": repr(exc)})
        return found

    def _stalls(self) -> list[tuple[str, float, float]]:
        """Every soak process's own stalls: (process, run time s, ms)."""
        found = [("driver", t - self.t0, ms) for t, ms in self.pauses.stalls]
        for w in self.workers:
            found += [(f"callers {w.index}", t - self.t0, ms) for t, ms in w.stats.get("stalls", [])]
        return sorted(found, key=lambda s: s[1])

    def report(self) -> int:
        args = self.args
        results = [r for r in self.results if r.lived_s or r.failure]
        started = [r for r in results if not r.failure.startswith(("webhook", "did not start"))]
        failed_start = [r for r in results if r not in started]
        ended_wrong = [r for r in started if r.failure]
        drops = self.drops
        resumed = [d for d in drops if d.resumed]
        gaps = [d.gap_ms for d in drops if d.gap_ms is not None]
        short = [r for r in results if r.lost_outside or r.duplicated or r.unstamped]
        sent = sum(r.frames_sent for r in results if r.sessions)
        received = sum(r.frames_received for r in results)
        lost_in = sum(r.lost_in_gaps for r in results)
        lost_out = sum(r.lost_outside for r in results)
        long_gaps = sorted((g[2], g[0], g[1], r.call_sid) for r in results for g in r.long_gaps)
        stalls = self._stalls()
        log = scan_log(self.log_path)

        lines: list[str] = []
        out = lines.append
        out("")
        out("=" * 100)
        out(
            f"line-gateway soak: {args.calls} concurrent calls, {args.minutes:g} min, call life "
            f"{args.life_s[0]:g}-{args.life_s[1]:g} s, a drop every {args.drop_every_s:g} s, seed {args.seed}"
        )
        out(f"gateway log: {self.log_path.relative_to(ROOT)}   JSON: {self.json_path}")
        out("")
        out(
            f"calls: {len(results)} ({len(started)} started, {len(failed_start)} failed to start); "
            f"{len(ended_wrong)} did not run to their own hang-up; REST updates by the gateway "
            f"{len(self.rest_updates)}"
        )
        for r in (failed_start + ended_wrong)[:10]:
            out(f"  {r.call_sid} at {r.started_s:.1f} s: {r.failure}")
        out("")
        by_kind = Counter(d.kind for d in drops)
        out(
            f"agent drops: {len(drops)} ({', '.join(f'{k} {n}' for k, n in sorted(by_kind.items()))}); "
            f"resumed {len(resumed)}"
        )
        reasons = Counter(
            f"{d.resumed_meta.get('resumed')}/{d.resumed_meta.get('resume_reason')}" for d in resumed
        )
        out(f"  new session's metadata (resumed/resume_reason): {dict(reasons)}")
        out("  caller-side audio around a drop, ms. longest: the longest gap from 1 s before the drop to")
        out("  1 s after the new session's first audio; drop gap: the old session's last audio heard -> the")
        out("  new one's first; resume: drop -> the new session's first audio (as the agent sent it)")
        out(
            f"  {'kind':10} {'n':>4} {'longest p50':>11} {'p95':>6} {'max':>6}   {'drop gap p50':>12} "
            f"{'max':>6}   {'resume p50':>10} {'max':>6}"
        )
        for kind in [*sorted(by_kind), "all"]:
            ds = [d for d in drops if kind in ("all", d.kind)]
            g = [d.gap_ms for d in ds if d.gap_ms is not None]
            sw = [d.switch_gap_ms for d in ds if d.switch_gap_ms is not None]
            rs = [d.resume_ms for d in ds if d.resume_ms is not None]
            out(
                f"  {kind:10} {len(ds):4d} {fmt_ms(pctl(g, 50)):>11} {fmt_ms(pctl(g, 95)):>6} "
                f"{fmt_ms(max(g, default=None)):>6}   {fmt_ms(pctl(sw, 50)):>12} "
                f"{fmt_ms(max(sw, default=None)):>6}   {fmt_ms(pctl(rs, 50)):>10} "
                f"{fmt_ms(max(rs, default=None)):>6}"
            )
        for d in [d for d in drops if not d.resumed][:10]:
            out(f"  NOT RESUMED: {d.kind} drop of {d.call_sid} at {d.at_s:.1f} s")
        out("")
        out(
            f"caller frames (calls that reached an agent): sent {sent}, received by the agent {received}; "
            f"lost inside drop gaps {lost_in}, lost outside them {lost_out}; duplicated "
            f"{sum(r.duplicated for r in results)}, reordered {sum(r.reordered for r in results)}, "
            f"unreadable {sum(r.unstamped for r in results)}"
        )
        costly = [d for d in drops if d.lost_frames]
        if costly:
            per_kind = {
                k: (sum(d.lost_frames for d in costly if d.kind == k), sum(1 for d in drops if d.kind == k))
                for k in sorted(by_kind)
            }
            out(
                "  frames lost per drop (kind: lost / drops): "
                + ", ".join(f"{k}: {lost} / {n}" for k, (lost, n) in per_kind.items())
            )
            first = min(d.lost_first_ms for d in costly if d.lost_first_ms is not None)
            last = max(d.lost_last_ms for d in costly if d.lost_last_ms is not None)
            out(f"  lost frames were sent from {first:+.0f} ms to {last:+.0f} ms around their drop")
        for r in short[:10]:
            out(
                f"  SHORT: {r.call_sid}: sent {r.frames_sent}, received {r.frames_received}, "
                f"lost outside gaps {r.lost_outside} (sent at {r.lost_outside_at_s} s), "
                f"in gaps {r.lost_in_gaps}, duplicated {r.duplicated}, unreadable {r.unstamped}, "
                f"drops {r.drops}"
            )
        out(
            f"caller-side gaps > {LONG_GAP_S * 1000:.0f} ms away from any drop: {len(long_gaps)} in "
            f"{len({g[3] for g in long_gaps})} calls"
        )
        if long_gaps:
            starts = sorted(g[1] for g in long_gaps)
            moments = 1 + sum(1 for a, b in itertools.pairwise(starts) if b - a > 0.1)
            stalled = sum(
                1
                for g in long_gaps
                if any(t - STALL_S <= g[1] + g[0] / 1000 and g[1] <= t + ms / 1000 for _, t, ms in stalls)
            )
            into = [g[2] for g in long_gaps]
            out(
                f"  length p50 {pctl([g[0] for g in long_gaps], 50):.0f} ms, max {long_gaps[-1][0]:.0f} ms; "
                f"at {moments} distinct moments (starts 100 ms apart); {stalled} overlap a stall of the "
                f"soak's own processes; into their call: {min(into):.1f}-{max(into):.1f} s"
            )
            for ms, at_s, into_s, sid in sorted(long_gaps, key=lambda g: g[1])[:12]:
                out(f"    at {at_s:8.3f} s ({into_s:6.2f} s into {sid}): {ms:.0f} ms")
        out(f"agent sessions of calls already over (opened after their call ended): {len(self.orphans)}")
        for orphan in self.orphans[:5]:
            out(f"  ORPHAN: {orphan}")
        longest = dict(self.pauses.longest_ms)
        for w in self.workers:
            for what, ms in w.stats.get("longest_ms", {}).items():
                longest[f"callers {what}"] = max(longest.get(f"callers {what}", 0.0), ms)
        out(
            f"the soak's own processes ran > {STALL_S * 1000:.0f} ms late {len(stalls)} times"
            + (f" (at most {max(s[2] for s in stalls):.0f} ms)" if stalls else "")
            + "; their longest pauses: "
            + ", ".join(f"{k} {v:.0f} ms" for k, v in longest.items())
        )
        out("")
        rr = self.redis_restart
        if rr:
            out(
                f"Redis restart at {rr['at_s']:.0f} s (down {rr.get('down_ms')} ms): "
                f"{rr['watched_calls']} live calls watched "
                f"({rr['missing_before']} not in Redis just before); "
                + (
                    f"all {rr['still_live']} still live back in Redis after {rr['recovered_s']:.2f} s"
                    if rr.get("recovered_s") is not None
                    else f"{rr.get('missing_after_20s')} of {rr.get('still_live')} still missing after 20 s"
                )
            )
        out("")
        warm = next((s for s in self.samples if s.t_s >= self.warmup_s - 0.5), None)
        end = self.end_sample
        under_load = self.samples[: self.samples.index(end) + 1] if end is not None else []
        growth: float | None = None
        if warm is not None and end is not None and warm.rss_kib:
            growth = (end.rss_kib - warm.rss_kib) / warm.rss_kib
        out(f"gateway RSS (VmRSS every {SAMPLE_EVERY_S:g} s): t s : live calls : MiB")
        row = [f"{s.t_s:.0f}:{s.live_calls}:{s.rss_kib / 1024:.1f}" for s in self.samples]
        for i in range(0, len(row), 8):
            out("  " + "  ".join(f"{c:>14}" for c in row[i : i + 8]))
        if warm is not None and end is not None:
            peak = max(s.rss_kib for s in under_load if s.t_s >= warm.t_s)
            out(
                f"  warm-up ends at {self.warmup_s:.0f} s: {warm.rss_kib / 1024:.1f} MiB "
                f"(t={warm.t_s:.0f} s); end of run {end.rss_kib / 1024:.1f} MiB (t={end.t_s:.0f} s); "
                f"growth {growth * 100 if growth is not None else float('nan'):+.2f} %; "
                f"peak {peak / 1024:.1f} MiB"
            )
        if self.samples:
            out(f"  after every call ended: {self.samples[-1].rss_kib / 1024:.1f} MiB")
        callers = self.cpu.get("callers_core", 0.0)
        out(
            f"CPU, fraction of a core: gateway {self.cpu.get('gateway_core', 0) * 100:.0f} %, this driver "
            f"(agent emulator, REST fake) {self.cpu.get('driver_core', 0) * 100:.0f} %, callers "
            f"{callers * 100:.0f} % in {len(self.workers)} processes on {os.cpu_count()} cores"
        )
        out("")
        e = self.end
        out(
            f"after the last hang-up ({e.get('live_at_stop')} calls hung up in {e.get('hang_up_s')} s, "
            f"{e.get('calls_stuck')} stuck): gateway_calls_active {e.get('calls_active')}, "
            f"lgw:call:* keys {e.get('call_keys')}, lgw:token:* keys {e.get('token_keys')} "
            f"(waited {e.get('empty_after_s')} s); agent sockets still open {e.get('agent_sockets_open')}"
        )
        for left in e.get("leftovers", [])[:10]:
            out(f"  LEFT IN REDIS: {left}")
        interesting = {
            k: v
            for k, v in self.metrics_at_end.items()
            if k.startswith(
                (
                    "gateway_agent_reconnects_total",
                    "gateway_fallbacks_total",
                    "gateway_frames_dropped_total",
                    "gateway_calls_ended_total",
                    "gateway_calls_answered_total",
                )
            )
        }
        for k, v in sorted(interesting.items()):
            out(f"  {k} {v:g}")
        out("")
        out(f"gateway log: {log.lines} lines; levels {log.levels}; exit code {e.get('gateway_exit_code')}")
        if log.warnings:
            out(f"  warnings: {log.warnings}")
        if log.errors:
            out(f"  errors: {log.errors}")
            for line in log.error_lines[:8]:
                out(f"    {line}")
        for line in log.exceptions[:5]:
            out(f"  EXCEPTION: {line}")
        if log.other_lines:
            out(f"  lines that are not JSON ({len(log.other_lines)}): {log.other_lines[:3]}")
        out("")

        max_gap = max(gaps, default=0.0)
        targets = [
            (
                "no caller frame lost outside the drop gaps",
                not short and lost_out == 0,
                f"{lost_out} frames in {len(short)} calls ({lost_in} lost inside {len(costly)} gaps)",
            ),
            (
                f"every drop resumed, caller-side gap <= {args.max_gap_s * 1000:.0f} ms",
                len(resumed) == len(drops) and max_gap <= args.max_gap_s * 1000,
                f"{len(resumed)}/{len(drops)} resumed, longest gap {max_gap:.0f} ms",
            ),
            (
                "every call started and ran to its own hang-up",
                not failed_start and not ended_wrong,
                f"{len(failed_start)} failed to start, {len(ended_wrong)} ended otherwise",
            ),
            (
                f"registry back within {REDIS_RECOVERY_S:g} s of the Redis restart",
                bool(rr) and rr.get("recovered_s") is not None and rr["recovered_s"] <= REDIS_RECOVERY_S,
                "not measured" if not rr else f"{rr.get('recovered_s')} s for {rr.get('still_live')} calls",
            ),
            (
                f"RSS grew <= {MAX_RSS_GROWTH * 100:.0f} % from {self.warmup_s:.0f} s to the end",
                growth is not None and growth <= MAX_RSS_GROWTH,
                "not measured" if growth is None else f"{growth * 100:+.2f} %",
            ),
            (
                "registry empty after the calls ended (no lgw:call:* or lgw:token:* key)",
                e.get("call_keys") == 0 and e.get("token_keys") == 0,
                f"{e.get('call_keys')} lgw:call:* keys, {e.get('token_keys')} lgw:token:* keys",
            ),
            ("gateway_calls_active back to 0", e.get("calls_active") == 0, f"{e.get('calls_active')}"),
            (
                "no agent socket left open, none opened after its call ended",
                e.get("agent_sockets_open") == 0 and not self.orphans,
                f"{e.get('agent_sockets_open')} open, {len(self.orphans)} opened late",
            ),
            ("no exception in the gateway log", not log.exceptions, f"{len(log.exceptions)} tracebacks"),
        ]
        out("targets:")
        for name, ok, detail in targets:
            out(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
        passed = all(ok for _, ok, _ in targets)
        out(f"soak: {'PASS' if passed else 'FAIL'}")
        print("\n".join(lines), flush=True)

        self.json_path.write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "warmup_s": self.warmup_s,
                    "targets": [{"name": n, "pass": ok, "detail": d} for n, ok, d in targets],
                    "samples": [asdict(s) for s in self.samples],
                    "drops": [
                        {k: v for k, v in asdict(d).items() if k not in ("at", "gap", "resumed_at")}
                        for d in drops
                    ],
                    "calls": [asdict(r) for r in results],
                    "redis_restart": rr,
                    "end": e,
                    "cpu": self.cpu,
                    "stalls": stalls,
                    "longest_pauses_ms": longest,
                    "orphan_agent_sessions": self.orphans,
                    "rest_updates": self.rest_updates[:100],
                    "metrics_at_end": interesting,
                    "log": asdict(log),
                },
                indent=1,
            )
        )
        return 0 if passed else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100, help="concurrent calls (default 100)")
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run (default 30)")
    parser.add_argument(
        "--drop-every-s",
        type=float,
        default=5.0,
        help="drop one live call's agent socket this often (default 5; 0: never)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed: call lives, drops (default 1)")
    parser.add_argument(
        "--life-s",
        type=float,
        nargs=2,
        default=[20.0, 120.0],
        metavar=("MIN", "MAX"),
        help="a call's life (default 20 120)",
    )
    parser.add_argument(
        "--max-gap-s",
        type=float,
        default=DEFAULT_MAX_GAP_S,
        help=f"caller-side silence allowed around a drop (default {DEFAULT_MAX_GAP_S:g})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help=f"caller processes (default: one per {CALLS_PER_WORKER} calls)",
    )
    parser.add_argument("--json", help="write the results here (default bench/results/soak-<utc>.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.calls < 1 or args.minutes <= 0 or args.life_s[0] <= 0 or args.life_s[1] < args.life_s[0]:
        parser.error("--calls, --minutes and --life-s must be positive (MIN <= MAX)")
    if args.workers < 0 or args.workers > args.calls:
        parser.error("--workers must be between 1 and --calls (0: the default)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    async def go() -> int:
        if args.worker:
            return await worker_main()
        return await Soak(args).run()  # built inside the loop: its asyncio objects belong to it

    try:
        import uvloop
    except ImportError:
        return asyncio.run(go())
    return uvloop.run(go())


if __name__ == "__main__":
    sys.exit(main())
