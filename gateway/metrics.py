"""The gateway's Prometheus metrics (prometheus_client), served at /metrics.

One `Metrics` per Gateway, each with a CollectorRegistry of its own (never the library's
global one): tests run several gateways in one process. Everything is counted per call or per
event, never per audio frame. Label values that come from outside (outcomes, reasons, actions,
paths) are bounded: past MAX_LABEL_VALUES distinct values a label reads "other".

The call path calls the named methods (`call_ended`, `agent_connected`, `first_audio`,
`agent_reconnect`, `fallback`, `frames_dropped`); `calls_active` and `calls_answered` also
work as attributes (`metrics.calls_active += 1`).
"""

from __future__ import annotations

import re

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Agent connect time and time to first audio: 50 ms to 10 s (the agent's ack times out at 10 s).
AGENT_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0)
# A control request: a few ms here, up to the 3 s of a routed request (registry/base.ROUTE_TIMEOUT_S).
CONTROL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MAX_LABEL_VALUES = 64  # distinct values per label of one family; past that, "other"
MAX_LABEL_CHARS = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/+\-]")


class _Bounded:
    """The values one label has taken; a new one past the limit reads "other"."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: object) -> str:
        text = _UNSAFE.sub("_", str(value))[:MAX_LABEL_CHARS] or "none"
        if text in self._seen:
            return text
        if len(self._seen) >= self._limit:
            return "other"
        self._seen.add(text)
        return text


def direction_of(direction: str) -> str:
    """Twilio's Direction (`inbound`, `outbound-api`, `outbound-dial`) as inbound or outbound."""
    return "outbound" if direction.startswith("outbound") else "inbound"


class Metrics:
    """This gateway's metrics and the registry that renders them."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._answered = Counter("gateway_calls_answered", "Calls answered by the voice webhook.", registry=r)
        self._active = Gauge("gateway_calls_active", "Calls bridged by this instance now.", registry=r)
        self._ended = Counter(
            "gateway_calls_ended",
            "Calls whose bridge on this instance ended, by direction and outcome.",
            ["direction", "outcome"],
            registry=r,
        )
        self._connect = Histogram(
            "gateway_agent_connect_seconds",
            "From opening the agent's socket to its ack.",
            buckets=AGENT_BUCKETS,
            registry=r,
        )
        self._first_audio = Histogram(
            "gateway_agent_first_audio_seconds",
            "From the media stream's start to the agent's first audio sent to the caller.",
            buckets=AGENT_BUCKETS,
            registry=r,
        )
        self._reconnects = Counter(
            "gateway_agent_reconnects",
            "New agent sessions for a call that had one, by reason.",
            ["reason"],
            registry=r,
        )
        self._fallbacks = Counter("gateway_fallbacks", "Fallbacks taken, by kind.", ["kind"], registry=r)
        self._control = Counter(
            "gateway_control_requests",
            "Control API requests, by action and HTTP status.",
            ["action", "status"],
            registry=r,
        )
        self._control_s = Histogram(
            "gateway_control_request_seconds",
            "Control API request time, by action.",
            ["action"],
            buckets=CONTROL_BUCKETS,
            registry=r,
        )
        self._rest_errors = Counter(
            "gateway_twilio_rest_errors",
            "Twilio REST requests that failed, by HTTP status (0: no answer) and Twilio error code.",
            ["status", "code"],
            registry=r,
        )
        self._signatures = Counter(
            "gateway_signature_rejections",
            "Requests refused for a missing or invalid X-Twilio-Signature, by path.",
            ["path"],
            registry=r,
        )
        self._dropped = Counter(
            "gateway_frames_dropped",
            "Frames dropped, by direction (uplink: caller to agent; downlink: agent to caller) and reason.",
            ["direction", "reason"],
            registry=r,
        )
        self._active_n = 0
        self._answered_n = 0
        self._label = {
            name: _Bounded()
            for name in ("outcome", "reason", "kind", "action", "code", "path", "drop_reason")
        }

    # Compatible with the attribute API: `metrics.calls_active += 1`, `metrics.calls_answered += 1`.

    @property
    def calls_active(self) -> int:
        return self._active_n

    @calls_active.setter
    def calls_active(self, value: int) -> None:
        self._active_n = value
        self._active.set(value)

    @property
    def calls_answered(self) -> int:
        return self._answered_n

    @calls_answered.setter
    def calls_answered(self, value: int) -> None:
        if value < self._answered_n:
            raise ValueError("calls_answered is a counter: it only goes up")
        self._answered.inc(value - self._answered_n)
        self._answered_n = value

    # The call path (once per call or per event)

    def call_ended(self, direction: str, outcome: str) -> None:
        """A call's bridge here ended: `direction` as Twilio names it, `outcome` the session's
        (`caller_hung_up`, `agent_ended_call`, `end_call`, `transferred`, `agent_unavailable`, ...)."""
        self._ended.labels(direction_of(direction), self._label["outcome"](outcome or "ended")).inc()

    def agent_connected(self, seconds: float) -> None:
        """The agent's socket opened and acked, `seconds` after we started opening it."""
        if seconds >= 0:
            self._connect.observe(seconds)

    def first_audio(self, seconds: float) -> None:
        """The agent's first audio went to the caller, `seconds` after the stream started."""
        if seconds >= 0:
            self._first_audio.observe(seconds)

    def agent_reconnect(self, reason: str) -> None:
        """A call that had an agent session got a new one (`transfer_not_taken`, `handover`, ...)."""
        self._reconnects.labels(self._label["reason"](reason)).inc()

    def fallback(self, kind: str) -> None:
        """A fallback was taken (`transfer_to_agent`, `transfer_hangup`, `agent_unavailable`, ...)."""
        self._fallbacks.labels(self._label["kind"](kind)).inc()

    def frames_dropped(self, direction: str, reason: str, n: int = 1) -> None:
        """`n` frames dropped (count them per event, not per frame): `direction` uplink or
        downlink, `reason` such as `malformed` or `before_ack_overflow`."""
        if n > 0:
            side = direction if direction in ("uplink", "downlink") else "other"
            self._dropped.labels(side, self._label["drop_reason"](reason)).inc(n)

    # What the gateway's own edges count

    def control_request(self, action: str, status: int, seconds: float) -> None:
        """A control API request answered: its canonical action (`state` for a GET,
        `unknown` when it never named a valid one), HTTP status and time."""
        label = self._label["action"](action)
        self._control.labels(label, str(status)).inc()
        self._control_s.labels(label).observe(max(seconds, 0.0))

    def rest_error(self, status: int, code: int | None) -> None:
        """A Twilio REST request failed: its HTTP status (0: no answer) and Twilio error code."""
        self._rest_errors.labels(str(status), self._label["code"](code if code else "none")).inc()

    def signature_rejected(self, path: str) -> None:
        """A request without a valid X-Twilio-Signature was refused."""
        self._signatures.labels(self._label["path"](path or "/")).inc()

    def render(self) -> bytes:
        """Everything in Prometheus' text format (CONTENT_TYPE)."""
        return generate_latest(self.registry)
