"""What Twilio does with a call's TwiML around its media stream, for the simulated call.

- `<Connect><Stream>` opens the stream; what follows `</Connect>` runs only when the *server*
  closes the WebSocket (Twilio's docs for `<Connect>`); an abrupt drop (no close frame, error
  31903) runs nothing here, since Twilio does not document that it does.
- `<Redirect>` POSTs the call's parameters, signed, to its URL and runs the TwiML answered.
- A REST update with `Twiml` ends the current stream (`stop`, then closed) and runs the new
  TwiML: a new `<Connect><Stream>`, a `<Say>` then a hang-up, a `<Dial>`, or a hang-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

# A call's TwiML can send it round in circles; a real call would be ended by Twilio long before.
MAX_DOCUMENTS = 50


def after_connect(twiml: str) -> list[tuple[str, str]]:
    """The verbs after `</Connect>`, as (verb, argument): Redirect (URL), Hangup, Say (text)."""
    tail = twiml.split("</Connect>", 1)[1] if "</Connect>" in twiml else ""
    return verbs(tail)


def verbs(twiml: str) -> list[tuple[str, str]]:
    found = []
    for match in re.finditer(r"<(Redirect|Say|Hangup|Dial)\b[^>]*?(?:/>|>(.*?)</\1>)", twiml, re.S):
        found.append((match.group(1), html.unescape(match.group(2) or "")))
    return found


class TwilioFlow:
    """Mixed into gateway.sandbox.caller.SimulatedCall."""

    if TYPE_CHECKING:
        _ws: ClientConnection | None
        twiml: str
        ended: asyncio.Event
        end_reason: str
        call_sid: str

        def log(self, what: str) -> None: ...
        def follow(self, twiml: str) -> bool: ...
        def webhook_form(self) -> dict[str, str]: ...
        async def open_stream(self, **kwargs: Any) -> None: ...
        async def post_url(self, url: str, form: dict[str, str]) -> tuple[int, str]: ...
        async def _close(self, reason: str) -> None: ...
        async def send_stop(self) -> None: ...

    said: list[str]
    streams_opened: int
    # Whether Twilio still has the call up (the sandbox asks its REST fake); True when unknown.
    carrier_live: Callable[[], bool]
    stream_lost: bool
    _documents: int

    async def after_stream(self, ws: ClientConnection) -> None:
        """The stream `ws` has ended without us ending it: run what follows `</Connect>` if the
        server closed it cleanly; after an abrupt drop, nothing (the call waits, in silence)."""
        if ws.protocol.close_rcvd is None:  # no close frame from the gateway: the connection dropped
            self.stream_lost = True
            self.log("stream dropped")
            return
        self.log("gateway closed the stream")
        if not self.carrier_live():  # the call has ended at Twilio: nothing more runs
            await self._close("gateway closed the stream")
            return
        await self.run_verbs(after_connect(self.twiml), "gateway closed the stream")

    async def run_verbs(self, todo: list[tuple[str, str]], why: str) -> None:
        for verb, argument in todo:
            if verb == "Redirect":
                self._documents += 1
                if self._documents > MAX_DOCUMENTS:
                    await self._close("too many TwiML documents")
                    return
                form = {**self.webhook_form(), "CallStatus": "in-progress"}
                status, answer = await self.post_url(argument, form)
                self.log(f"redirect answered {status}")
                await self.run_document(answer if status == 200 else "<Response><Hangup/></Response>")
                return
            if verb == "Say":
                self.said.append(argument)
                self.log(f"twilio says {argument!r}")
            elif verb in ("Hangup", "Dial"):
                await self._close("hung up by TwiML" if verb == "Hangup" else "dialled by TwiML")
                return
        await self._close(why)  # the document ran out: Twilio hangs up

    async def run_document(self, twiml: str) -> None:
        """Run a whole TwiML document: a stream, or verbs."""
        if "<Stream" in twiml and self.follow(twiml):
            self.stream_lost = False
            self.streams_opened += 1
            await self.open_stream()
            return
        await self.run_verbs(verbs(twiml), "TwiML ran out")

    async def carrier_update(self, form: dict[str, str]) -> None:
        """Twilio's REST API updated the call: the stream gets `stop` and ends; new TwiML runs."""
        if form.get("Status") == "completed":
            self.log("call hung up via REST")
            await self.send_stop()
            await self._close("hung up via REST")
            return
        self.log("call redirected via REST")
        twiml = form.get("Twiml", "")
        if "<Stream" not in twiml and "<Say" not in twiml:
            await self.send_stop()
            await self._close("redirected via REST")  # a transfer: the call leaves the gateway
            return
        if self._ws is not None:
            await self.send_stop()
            with contextlib.suppress(ConnectionClosed):
                await self._ws.close()
        await self.run_document(twiml)
