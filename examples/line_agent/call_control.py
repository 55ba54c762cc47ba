"""Tools that steer the phone call through line-gateway's control URL.

line-gateway hands every call's agent a secret control URL in the call's metadata, under
`vox_session_control_url` (the key agents written for Voximplant's Cartesia connector read) and
`control_url` (the same URL). Each tool here POSTs one JSON action to it. The gateway answers
`{"ok": true, ...}` or `{"ok": false, "error": {"code", "message"}}` with a 4xx/5xx status; a
refusal comes back to the model as one short sentence it can act on, never as an exception.
"""

import inspect
import json
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

import aiohttp
from line.llm_agent import ToolEnv, loopback_tool

VOXIMPLANT_KEY = "vox_session_control_url"
GATEWAY_KEY = "control_url"

# What the model is told for the gateway's error codes (README.md, "Control URLs"); any other code
# comes with the gateway's own message.
_EXPLAINED = {
    "destination_not_allowed": "that destination is not allowed",
    "invalid_destination": "that is not a valid phone number or SIP address",
    "invalid_caller_id": "the caller ID for the transfer is not valid",
    "not_found": "the call has already ended",
    "call_ending": "the call is already ending",
    "call_transferring": "the call is already being transferred",
    "call_not_live": "the call's audio is not connected yet; try again in a moment",
    "call_busy": "too many call actions are pending; try again in a moment",
    "rate_limited": "too many call actions; try again in a moment",
}


class CallControl:
    """The call's control URL, and the three tools the model uses on it.

    `end_call` and `transfer_call` yield nothing when they succeed: the SDK then records the
    result as "success" and ends the turn without asking the model again (the model said its
    goodbye or "transferring you now" before calling them). `send_dtmf` reports what it sent, so
    the model can carry on. Failures are yielded as text: the SDK hands them to the model as the
    tool's result and asks it for another reply.
    """

    def __init__(self, url: str | None, *, timeout_s: float = 10.0) -> None:
        self.url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any] | None, key: str = VOXIMPLANT_KEY) -> "CallControl":
        """The control URL from the call's metadata (`CallRequest.metadata` in the SDK)."""
        url = (metadata or {}).get(key)
        return cls(url if isinstance(url, str) and url else None)

    def tools(self) -> list[Any]:
        return [self.end_call, self.transfer_call, self.send_dtmf]

    async def post(self, what: str, body: dict[str, Any]) -> str | None:
        """POST one action; None when the gateway took it, else a sentence for the model."""
        if self.url is None:
            return f"{what} unavailable: this call has no control URL (is it coming through the gateway?)"
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as http,
                http.post(self.url, json=body) as resp,
            ):
                status, text = resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{what} failed: the gateway could not be reached ({type(exc).__name__})"
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if status < 300 and isinstance(answer, dict) and answer.get("ok") is True:
            return None
        error = answer.get("error") if isinstance(answer, dict) else None
        error = error if isinstance(error, dict) else {}
        code = str(error.get("code") or f"http_{status}")
        explained = _EXPLAINED.get(code) or str(error.get("message") or "the gateway refused it")
        verb = "refused" if 400 <= status < 500 else "failed"
        return f"{what} {verb}: {explained} ({code})"

    @loopback_tool
    async def end_call(
        self,
        ctx: ToolEnv,
        reason: Annotated[str, "Why the call is ending, in a few words (for the logs)"] = "",
    ) -> AsyncIterator[str]:
        """Hang up the phone call.

        ALWAYS say a short goodbye to the caller first, in the same reply, before calling this
        (for example "Thanks for calling, goodbye!"): your last words are played to the caller
        and then the call is hung up. Use it only when the caller is finished or asks to hang up.
        """
        refused = await self.post("end call", {"action": "end_call", "reason": reason})
        if refused:
            yield refused

    @loopback_tool
    async def transfer_call(
        self,
        ctx: ToolEnv,
        destination: Annotated[
            str, "A phone number in E.164 form (+14155551234) or a SIP URI (sip:desk@pbx.example.com)"
        ],
        summary: Annotated[str, "One or two sentences for whoever takes the call: who is calling and why"],
    ) -> AsyncIterator[str]:
        """Transfer the caller to a person or another line.

        Tell the caller you are transferring them, in the same reply, before calling this. If the
        transfer is refused, tell the caller and offer what else you can do.
        """
        body = {"action": "call_transfer", "to": destination, "summary": summary}
        refused = await self.post("transfer", body)
        if refused:
            yield refused

    @loopback_tool
    async def send_dtmf(
        self,
        ctx: ToolEnv,
        digits: Annotated[str, "The keys to press: 0-9, * and #; a w waits half a second. At most 64."],
    ) -> AsyncIterator[str]:
        """Press keys on the phone line (DTMF tones), for example to enter a PIN or choose an
        option in an automated phone menu."""
        refused = await self.post("DTMF", {"action": "send_dtmf", "digits": digits})
        yield refused or f"sent DTMF {digits}"


# The SDK hands a tool's docstring to the model as it is; drop the source code's indentation.
for _tool in (CallControl.end_call, CallControl.transfer_call, CallControl.send_dtmf):
    _tool.description = inspect.cleandoc(_tool.description)
