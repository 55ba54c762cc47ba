"""Everything a simulated call needs on one machine: the gateway, the agent, Twilio's REST API."""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator
from typing import Any

from gateway.app import create_app
from gateway.registry.base import SessionRegistry
from gateway.sandbox.agent import AgentBehaviour, AgentEmulator
from gateway.sandbox.caller import SimulatedCall
from gateway.sandbox.servers import free_port, serve
from gateway.sandbox.twilio_rest_fake import TwilioRestFake
from gateway.settings import Settings

ACCOUNT_SID = "AC" + "5a" * 16
AGENT_ID = "agent_sandbox"


class Sandbox:
    """A gateway on a free port, wired to a local agent emulator and a Twilio REST fake."""

    def __init__(self, settings: Settings, agent: AgentEmulator, rest: TwilioRestFake) -> None:
        self.settings = settings
        self.agent = agent
        self.rest = rest
        self.url = settings.public_url
        self.calls: dict[str, SimulatedCall] = {}
        rest.on_update = self._carrier_update

    async def _carrier_update(self, call_sid: str, form: dict[str, str]) -> None:
        call = self.calls.get(call_sid)
        if call is not None:
            await call.carrier_update(form)

    def new_call(self, **kwargs: Any) -> SimulatedCall:
        call = SimulatedCall(self.url, self.settings.twilio_auth_token, account_sid=ACCOUNT_SID, **kwargs)
        self.calls[call.call_sid] = call
        self.rest.add_call(call.call_sid)
        call.carrier_live = lambda: self.rest.calls.get(call.call_sid) == "in-progress"
        return call

    async def connect_call(self, **kwargs: Any) -> SimulatedCall:
        """Ring the gateway and open the media stream, as Twilio would."""
        call = self.new_call(**kwargs)
        status = await call.dial()
        if status != 200 or not call.stream_url:
            raise RuntimeError(f"the gateway did not answer the call: {status} {call.twiml}")
        await call.open_stream()
        return call


@contextlib.asynccontextmanager
async def sandbox(
    behaviour: AgentBehaviour | None = None,
    registry: SessionRegistry | None = None,
    **settings_overrides: Any,
) -> AsyncIterator[Sandbox]:
    auth_token = secrets.token_hex(16)
    rest = TwilioRestFake(ACCOUNT_SID, auth_token)
    api_key = "sk_sandbox_" + secrets.token_hex(8)
    agent = AgentEmulator(behaviour, api_key=api_key)
    port = free_port()
    async with serve(rest.app) as rest_url, agent.running():
        settings = Settings(
            port=port,
            public_url=f"http://127.0.0.1:{port}",
            twilio_account_sid=ACCOUNT_SID,
            twilio_auth_token=auth_token,
            twilio_api_base=rest_url,
            cartesia_api_key=api_key,
            cartesia_agent_id=AGENT_ID,
            cartesia_url=agent.url,
            cartesia_output_format=agent.behaviour.output_format,
        )
        settings = dataclasses.replace(settings, **settings_overrides)
        app = create_app(settings, registry)
        async with serve(app, port):
            box = Sandbox(settings, agent, rest)
            box.app = app  # type: ignore[attr-defined]
            yield box
