"""A Line agent for phone calls that come through line-gateway, written the way an agent for
Voximplant's Cartesia connector is: its tools POST to `metadata.vox_session_control_url`.

Environment:
    LLM_MODEL        a LiteLLM model name (default: anthropic/claude-haiku-4-5-20251001)
    LLM_API_KEY      that provider's API key
    CONTROL_URL_KEY  the metadata key holding the control URL: `vox_session_control_url` (default,
                     what a Voximplant agent reads) or `control_url` (the gateway's own name)
"""

import json
import os

from call_control import VOXIMPLANT_KEY, CallControl
from line.llm_agent import LlmAgent, LlmConfig
from line.voice_agent_app import AgentEnv, CallRequest, VoiceAgentApp

DEFAULT_MODEL = "anthropic/claude-haiku-4-5-20251001"

SYSTEM_PROMPT = """\
You are the phone receptionist of Example Corp, speaking with a caller on a phone line.
Keep every reply to one or two short, spoken sentences; no lists, no markdown.

You have three tools:
- end_call: hangs up. Before you call it, ALWAYS say goodbye in the same reply, e.g.
  "Thanks for calling Example Corp, goodbye!" Your goodbye is played to the caller first.
- transfer_call: puts the caller through to a phone number (+14155551234) or a SIP address
  (sip:desk@pbx.example.com). Say that you are transferring them first, and give a one-sentence
  summary of who is calling and why. Billing is +15551234567; support is sip:support@pbx.example.com.
- send_dtmf: presses keys on the line, for automated phone menus or when asked to enter digits.

If a tool answers that something was refused or failed, tell the caller plainly and offer
another option; do not retry the same thing."""

INTRODUCTION = "Hello, Example Corp, how can I help you?"

# line-gateway opens a new session when the call's agent socket dropped or the call moved to
# another gateway instance, with `resumed: true` and, under `agent_state`, the metadata of the
# last `custom` event this agent sent: the caller is mid-conversation, so no greeting.
RESUMED_NOTE = """

The line dropped for a moment and the call has just resumed: do not greet the caller again and
do not repeat yourself; say briefly that you are back if it fits, and carry on. What you knew
before: {state}"""


def build_agent(metadata: dict | None, *, control_url_key: str = VOXIMPLANT_KEY) -> LlmAgent:
    """The agent for one call, its tools bound to that call's control URL."""
    metadata = metadata or {}
    control = CallControl.from_metadata(metadata, key=control_url_key)
    prompt, introduction = SYSTEM_PROMPT, INTRODUCTION
    if metadata.get("resumed"):
        prompt += RESUMED_NOTE.format(state=json.dumps(metadata.get("agent_state") or {}))
        introduction = None
    return LlmAgent(
        model=os.getenv("LLM_MODEL", DEFAULT_MODEL),
        api_key=os.getenv("LLM_API_KEY"),
        tools=control.tools(),
        config=LlmConfig(system_prompt=prompt, introduction=introduction),
    )


async def get_agent(env: AgentEnv, call_request: CallRequest) -> LlmAgent:
    # The gateway sends its metadata (control URLs, from, to, call_sid, ...) with the Calls API
    # `start`; Line hands it to the agent as the call request's metadata.
    key = os.getenv("CONTROL_URL_KEY", VOXIMPLANT_KEY)
    return build_agent(call_request.metadata, control_url_key=key)


app = VoiceAgentApp(get_agent=get_agent)

if __name__ == "__main__":
    app.run()
