"""Runs this agent on one call with neither Cartesia nor an LLM: for tests, and to try the tools
against a gateway's control URL by hand.

A stand-in for Cartesia's harness talks to the SDK's own websocket endpoint
(`VoiceAgentApp.websocket_endpoint`): it sends the `start` message carrying the call's metadata,
then each of the caller's turns the way the harness does (`user_state` speaking, the transcript,
`user_state` idle). The SDK runs the agent as on a real call (get_agent, LlmAgent, its tool
dispatch), except that the one LiteLLM call it makes per completion is answered by LiteLLM's own
`mock_response` with the next scripted reply instead of by a model provider.

    python scripted_call.py SCRIPT.json RESULT.json

SCRIPT.json:  {"metadata": {...}, "turns": [{"user": "what the caller says", "model": [REPLY, ...]}]}
REPLY:        {"say": "text"?, "tool_calls": [{"name": "send_dtmf", "arguments": {"digits": "1"}}]?}
              the model's replies within that turn, in order: a tool's result asks for another
RESULT.json:  {"completions": [{"turn", "messages", "tools"}], "harness": [what the agent sent
              the harness], "unused": [replies left over per turn], "errors": [...]}
"""

import asyncio
import itertools
import json
import os
import sys
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of LiteLLM's price list
os.environ.setdefault("LLM_API_KEY", "scripted")  # LlmAgent wants one; no provider is called

import main
from fastapi import WebSocketDisconnect
from line.llm_agent import http_provider
from litellm import ModelResponse
from litellm.types.utils import ChatCompletionMessageToolCall, Choices, Function, Message

TURN_TIMEOUT_S = 30.0
_call_ids = itertools.count(1)


def model_response(reply: dict[str, Any]) -> ModelResponse:
    """One scripted reply as the complete response LiteLLM would have streamed."""
    calls = [
        ChatCompletionMessageToolCall(
            id=f"call_{next(_call_ids)}",
            type="function",
            function=Function(name=call["name"], arguments=json.dumps(call.get("arguments", {}))),
        )
        for call in reply.get("tool_calls", [])
    ]
    message = Message(role="assistant", content=reply.get("say"), tool_calls=calls or None)
    finish = "tool_calls" if calls else "stop"
    return ModelResponse(choices=[Choices(index=0, message=message, finish_reason=finish)])


class ScriptedModel:
    """Stands in for `litellm.acompletion` where the SDK's HTTP provider calls it: notes what the
    model is given, then lets LiteLLM answer with the turn's next scripted reply."""

    def __init__(self, turns: list[dict[str, Any]]) -> None:
        self.replies = [list(turn.get("model", [])) for turn in turns]
        self.turn = -1  # the introduction, before the first turn, asks no model
        self.completions: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._acompletion = http_provider.acompletion

    async def acompletion(self, **kwargs: Any) -> Any:
        self.completions.append(
            {"turn": self.turn, "messages": kwargs.get("messages"), "tools": kwargs.get("tools") or []}
        )
        left = self.replies[self.turn] if 0 <= self.turn < len(self.replies) else []
        if left:
            reply = left.pop(0)
        else:
            last = (kwargs.get("messages") or [{}])[-1]
            self.errors.append(
                f"turn {self.turn}: the model was asked once more than scripted, after"
                f" {last.get('role')} {last.get('name') or ''}: {last.get('content')!r}"
            )
            reply = {"say": "(no scripted reply left)"}
        return await self._acompletion(**kwargs, mock_response=model_response(reply))


class Harness:
    """Cartesia's side of the agent's websocket, as far as one scripted call needs it."""

    def __init__(self, start: dict[str, Any]) -> None:
        self._inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._inbox.put_nowait(start)
        self._turns_over: asyncio.Queue[None] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []

    async def accept(self) -> None:
        pass

    async def receive_json(self) -> dict[str, Any]:
        message = await self._inbox.get()
        if message is None:
            raise WebSocketDisconnect(1000)
        return message

    async def send_json(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind != "log_metric":
            self.sent.append(data)
        if kind == "message":  # spoken at once: the harness reports what the caller heard
            self._inbox.put_nowait({"type": "agent_speech", "content": data["content"]})
        elif kind == "response_end":
            self._turns_over.put_nowait(None)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self._inbox.put_nowait(None)

    def caller_says(self, text: str) -> None:
        for message in (
            {"type": "user_state", "value": "speaking"},
            {"type": "message", "content": text},
            {"type": "user_state", "value": "idle"},
        ):
            self._inbox.put_nowait(message)

    async def agent_done(self) -> None:
        """Until the agent has finished its reply (the SDK's `response_end`)."""
        await asyncio.wait_for(self._turns_over.get(), TURN_TIMEOUT_S)

    def hang_up(self) -> None:
        self._inbox.put_nowait(None)


async def run(script: dict[str, Any]) -> dict[str, Any]:
    turns = script["turns"]
    metadata = script.get("metadata") or {}
    model = ScriptedModel(turns)
    http_provider.acompletion = model.acompletion  # the SDK's one call into LiteLLM
    start = {
        "type": "start",
        "call_id": str(metadata.get("call_sid", "scripted")),
        "from": str(metadata.get("from", "unknown")),
        "to": str(metadata.get("to", "unknown")),
        "agent": {"id": "agent_scripted"},
        "metadata": metadata,
    }
    harness = Harness(start)
    endpoint = asyncio.create_task(main.app.websocket_endpoint(harness))  # type: ignore[arg-type]
    errors: list[str] = []
    try:
        await harness.agent_done()  # the introduction
        for index, turn in enumerate(turns):
            model.turn = index
            harness.caller_says(turn["user"])
            await harness.agent_done()
    except TimeoutError:
        errors.append(f"turn {model.turn}: the agent did not finish within {TURN_TIMEOUT_S} s")
    harness.hang_up()
    try:
        await asyncio.wait_for(endpoint, TURN_TIMEOUT_S)
    except TimeoutError:
        errors.append("the SDK did not end the call after the harness hung up")
    errors += model.errors
    errors += [f"the SDK reported: {m.get('content')}" for m in harness.sent if m.get("type") == "error"]
    return {
        "completions": model.completions,
        "harness": harness.sent,
        "unused": model.replies,
        "errors": errors,
    }


def cli() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        script = json.load(f)
    result = asyncio.run(run(script))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f, indent=1, default=str)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(cli())
