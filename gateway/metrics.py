"""A handful of counters in Prometheus' text format; no client library needed for this few."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Metrics:
    calls_answered: int = 0
    calls_active: int = 0
    control_responses: Counter[int] = field(default_factory=Counter)

    def control(self, status: int) -> None:
        self.control_responses[status] += 1

    def render(self) -> str:
        lines = [
            "# HELP gateway_calls_answered_total Calls answered by the voice webhook.",
            "# TYPE gateway_calls_answered_total counter",
            f"gateway_calls_answered_total {self.calls_answered}",
            "# HELP gateway_calls_active Calls bridged by this instance now.",
            "# TYPE gateway_calls_active gauge",
            f"gateway_calls_active {self.calls_active}",
            "# HELP gateway_control_responses_total Control API responses by HTTP status.",
            "# TYPE gateway_control_responses_total counter",
        ]
        lines += [
            f'gateway_control_responses_total{{status="{status}"}} {count}'
            for status, count in sorted(self.control_responses.items())
        ]
        return "\n".join(lines) + "\n"
