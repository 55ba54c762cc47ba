"""Drives the load engine (bench/node/load.js): the bench agent and the simulated Twilio calls.

The engine is one Node process pinned to the harness's core. This module speaks to it in JSON
lines and does what must be done in Python: it makes each call's webhook form and signs it, and
the media socket's upgrade, with twilio's `RequestValidator.compute_signature` (the webhook
over `PUBLIC_URL/twilio/voice` with the form fields, the upgrade over the stream URL with `{}`).

Why Node and not Python: the same engine written in Python (aiohttp client and server on
uvloop, precomputed frames) cost ~50 % of a core at 100 calls, most of it in the event loop's
own per-message and per-wakeup work, and would have passed 80 % before 200 calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import shutil
from pathlib import Path
from typing import Any

from twilio.request_validator import RequestValidator

from gateway.carriers.twilio import codec

NODE_DIR = Path(__file__).resolve().parent / "node"
ENGINE = NODE_DIR / "load.js"


class LoadError(RuntimeError):
    pass


def ensure_node_deps() -> str:
    """The node binary; installs bench/node's locked dependencies (ws) on first use."""
    node = shutil.which("node")
    if node is None:
        raise LoadError("node (>= 18) is needed for the load engine: apt-get install nodejs")
    if not (NODE_DIR / "node_modules" / "ws").exists():
        npm = shutil.which("npm")
        if npm is None:
            raise LoadError("npm is needed once to install bench/node's dependencies (npm ci)")
        import subprocess

        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300)
    return node


class NodeLoad:
    """One load engine process for the whole run: its agent serves every server under test."""

    def __init__(self, core: int) -> None:
        self.core = core
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0
        self.agent_port = 0
        self.account_sid = "AC" + secrets.token_hex(16)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._index = 0

    @property
    def agent_url(self) -> str:
        return f"ws://127.0.0.1:{self.agent_port}"

    async def start(self) -> None:
        node = ensure_node_deps()
        self.proc = await asyncio.create_subprocess_exec(
            "taskset",
            "-c",
            str(self.core),
            node,
            str(ENGINE),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=NODE_DIR,
            limit=1 << 24,
        )
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(15):
                ready = json.loads(await self.proc.stdout.readline())
        except (TimeoutError, json.JSONDecodeError) as exc:
            await self.close()
            raise LoadError(f"the load engine did not start: {exc!r}") from None
        self.agent_port, self.pid = ready["agent_port"], ready["pid"]
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(json.JSONDecodeError):
                msg = json.loads(line)
                fut = self._pending.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(LoadError("the load engine exited"))

    async def call(self, cmd: str, timeout_s: float = 60.0, **fields: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        if self.proc.returncode is not None:
            raise LoadError(f"the load engine exited with {self.proc.returncode}")
        ident = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = fut
        self.proc.stdin.write(json.dumps({"id": ident, "cmd": cmd, **fields}).encode() + b"\n")
        await self.proc.stdin.drain()
        try:
            async with asyncio.timeout(timeout_s):
                reply = await fut
        finally:
            self._pending.pop(ident, None)
        if not reply.get("ok"):
            raise LoadError(f"{cmd}: {reply.get('error')}")
        return reply

    def _spec(self, public_url: str, validator: RequestValidator) -> dict[str, Any]:
        self._index += 1
        call_sid = "CA" + secrets.token_hex(16)
        form = {
            "CallSid": call_sid,
            "AccountSid": self.account_sid,
            "From": f"+1555{self._index:07d}",
            "To": "+15559870002",
            "CallStatus": "ringing",
            "Direction": "inbound",
        }
        # Each call's stream URL names it (the gateway's signature check binds the upgrade to
        # the call), so each has its own signature, computed here rather than per frame in Node.
        stream_url = codec.stream_url(public_url, call_sid)
        return {
            "call_sid": call_sid,
            "stream_sid": "MZ" + secrets.token_hex(16),
            "account_sid": self.account_sid,
            "form": form,
            "signature": validator.compute_signature(public_url + "/twilio/voice", form),
            "stream_url": stream_url,
            "stream_signature": validator.compute_signature(stream_url, {}),
        }

    async def add_calls(
        self, public_url: str, auth_token: str, count: int, spread_s: float, up_timeout_s: float = 30.0
    ) -> list[dict[str, Any]]:
        """Start `count` calls spread over `spread_s`; returns each call's timings once it hears
        the agent (or has failed)."""
        validator = RequestValidator(auth_token)
        reply = await self.call(
            "add",
            timeout_s=spread_s + up_timeout_s + 30,
            voice_url=public_url + "/twilio/voice",
            calls=[self._spec(public_url, validator) for _ in range(count)],
            spread_s=spread_s,
            up_timeout_s=up_timeout_s,
        )
        return reply["calls"]

    async def window_start(self) -> None:
        await self.call("window_start")

    async def window_end(self, grace_s: float) -> dict[str, Any]:
        return await self.call("window_end", timeout_s=grace_s + 60, grace_s=grace_s)

    async def hang_up_all(self) -> None:
        await self.call("hang_up_all", timeout_s=60)

    async def status(self) -> dict[str, Any]:
        return await self.call("status")

    async def close(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.call("exit", timeout_s=5)
            with contextlib.suppress(Exception):
                if proc.stdin is not None:
                    proc.stdin.close()
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
