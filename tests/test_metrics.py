"""/metrics (prometheus_client): every family with its type, and the series that a control
request, a forged signature and a Twilio REST error move; two gateways in one process apart."""

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.carriers.twilio.rest import TwilioCalls, TwilioRestError
from gateway.metrics import Metrics
from gateway.sandbox.agent import AgentBehaviour
from gateway.sandbox.caller import NO_PROXY
from gateway.sandbox.harness import sandbox
from gateway.sandbox.script import CallScript
from gateway.sandbox.servers import free_port

FAMILIES = {
    "gateway_calls_answered": "counter",
    "gateway_calls_active": "gauge",
    "gateway_calls_ended": "counter",
    "gateway_agent_connect_seconds": "histogram",
    "gateway_agent_first_audio_seconds": "histogram",
    "gateway_agent_reconnects": "counter",
    "gateway_fallbacks": "counter",
    "gateway_control_requests": "counter",
    "gateway_control_request_seconds": "histogram",
    "gateway_twilio_rest_errors": "counter",
    "gateway_signature_rejections": "counter",
    "gateway_frames_dropped": "counter",
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "python_info": "gauge",
}


async def scrape(url: str) -> tuple[str, dict[str, str], dict[tuple[str, frozenset], float]]:
    """(content type, family -> type, (sample name, labels) -> value) of a gateway's /metrics."""
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        assert resp.status == 200
        content_type, text = resp.headers["content-type"], await resp.text()
    families = list(text_string_to_metric_families(text))
    types = {f.name: f.type for f in families}
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return content_type, types, samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def post(url: str, body: dict) -> int:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
        return resp.status


async def test_metrics_exposes_every_family_with_its_type_and_the_old_names():
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        call = await box.connect_call()
        runner = asyncio.create_task(call.run(CallScript(max_s=10)))
        async with asyncio.timeout(10):
            while not box.agent.calls:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        content_type, types, samples = await scrape(box.url)
        await call.hang_up()
        await runner
    assert content_type.startswith("text/plain")
    assert {name: types.get(name) for name in FAMILIES} == FAMILIES
    # The names dashboards already use, with this call in them.
    assert value(samples, "gateway_calls_answered_total") == 1
    assert value(samples, "gateway_calls_active") == 1
    assert value(samples, "process_resident_memory_bytes") > 0


def test_call_path_methods_move_their_series_and_the_attribute_api_still_works():
    m = Metrics()

    def v(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, labels)

    m.calls_active += 1
    m.calls_active += 1
    m.calls_active -= 1
    m.calls_answered += 1
    m.calls_answered += 1
    assert (m.calls_active, v("gateway_calls_active")) == (1, 1)
    assert (m.calls_answered, v("gateway_calls_answered_total")) == (2, 2)
    with pytest.raises(ValueError):
        m.calls_answered -= 1
    m.call_ended("outbound-api", "agent_ended_call")
    m.call_ended("inbound", "caller_hung_up")
    m.agent_connected(0.12)
    m.first_audio(0.8)
    m.agent_reconnect("transfer_not_taken")
    m.fallback("transfer_to_agent")
    m.frames_dropped("uplink", "before_ack_overflow", n=3)
    m.frames_dropped("downlink", "malformed", n=0)  # nothing dropped: no series
    assert v("gateway_calls_ended_total", direction="outbound", outcome="agent_ended_call") == 1
    assert v("gateway_calls_ended_total", direction="inbound", outcome="caller_hung_up") == 1
    assert v("gateway_agent_connect_seconds_bucket", le="0.15") == 1
    assert v("gateway_agent_connect_seconds_bucket", le="0.1") == 0
    assert v("gateway_agent_first_audio_seconds_bucket", le="1.0") == 1
    assert v("gateway_agent_first_audio_seconds_bucket", le="0.75") == 0
    assert v("gateway_agent_reconnects_total", reason="transfer_not_taken") == 1
    assert v("gateway_fallbacks_total", kind="transfer_to_agent") == 1
    assert v("gateway_frames_dropped_total", direction="uplink", reason="before_ack_overflow") == 3
    assert v("gateway_frames_dropped_total", direction="downlink", reason="malformed") is None


def test_label_values_from_outside_are_bounded():
    m = Metrics()
    for i in range(200):
        m.fallback(f"kind {i}")
    kinds = {
        s.labels["kind"] for f in m.registry.collect() if f.name == "gateway_fallbacks" for s in f.samples
    }
    assert len(kinds) == 65 and "other" in kinds and "kind_0" in kinds
    assert m.registry.get_sample_value("gateway_fallbacks_total", {"kind": "other"}) == 200 - 64


async def test_control_requests_are_counted_by_action_and_status_with_their_latency():
    async with sandbox(AgentBehaviour(greeting_s=0.2)) as box:
        call = await box.connect_call()
        runner = asyncio.create_task(call.run(CallScript(max_s=10)))
        async with asyncio.timeout(10):
            while not box.agent.calls:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        url = box.agent.calls[0].metadata["control_url"]
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200
        assert await post(url, {"action": "dance"}) == 400
        assert await post(url, {"action": "hangup"}) == 200  # an alias: counted as end_call
        assert await post(box.url + "/control/not-a-token", {"action": "end_call"}) == 404
        await runner
        _, _, samples = await scrape(box.url)
    counted = {
        (dict(labels)["action"], dict(labels)["status"]): n
        for (name, labels), n in samples.items()
        if name == "gateway_control_requests_total"
    }
    expected = {("state", "200"): 1, ("unknown", "400"): 1, ("end_call", "200"): 1, ("unknown", "404"): 1}
    assert counted == expected
    assert value(samples, "gateway_control_request_seconds_count", action="end_call") == 1
    assert value(samples, "gateway_control_request_seconds_count", action="unknown") == 2
    assert 0 < value(samples, "gateway_control_request_seconds_sum", action="end_call") < 3


async def test_forged_signatures_are_counted_by_path():
    async with sandbox() as box:
        call = box.new_call()
        assert await call.dial(signature="Zm9yZ2Vk") == 403
        assert await call.dial(signature="") == 403
        assert await call.dial() == 200
        with pytest.raises(InvalidStatus):
            await connect(call.stream_url, additional_headers={"X-Twilio-Signature": "x"}, **NO_PROXY)
        _, _, samples = await scrape(box.url)
    assert value(samples, "gateway_signature_rejections_total", path="/twilio/voice") == 2
    assert value(samples, "gateway_signature_rejections_total", path="/twilio/media") == 1
    assert value(samples, "gateway_calls_answered_total") == 1


async def test_twilio_rest_errors_are_counted_by_status_and_code():
    async with sandbox() as box:
        gw = box.app.state.gateway
        # A hang-up of a call Twilio does not know: HTTP 404, Twilio's 20404 (taken as done).
        assert await gw.calls.hangup("CA" + "0" * 32) is False
        _, _, samples = await scrape(box.url)
    assert value(samples, "gateway_twilio_rest_errors_total", status="404", code="20404") == 1
    # No answer at all (nothing listens): status 0. A redirect is not retried after that.
    m = Metrics()
    calls = TwilioCalls("AC" + "1" * 32, "token", f"http://127.0.0.1:{free_port()}")
    calls.on_error = m.rest_error
    try:
        with pytest.raises(TwilioRestError):
            await calls.redirect("CA" + "1" * 32, "<Response/>")
    finally:
        await calls.close()
    unanswered = {"status": "0", "code": "none"}
    assert m.registry.get_sample_value("gateway_twilio_rest_errors_total", unanswered) == 1


async def test_two_gateways_in_one_process_keep_their_own_series():
    async with sandbox() as a, sandbox() as b:
        assert await a.new_call().dial(signature="Zm9yZ2Vk") == 403
        _, types_a, samples_a = await scrape(a.url)
        _, types_b, samples_b = await scrape(b.url)
    assert value(samples_a, "gateway_signature_rejections_total", path="/twilio/voice") == 1
    assert value(samples_b, "gateway_signature_rejections_total", path="/twilio/voice") is None
    for types in (types_a, types_b):  # each has every family, process metrics included
        assert {name: types.get(name) for name in FAMILIES} == FAMILIES
