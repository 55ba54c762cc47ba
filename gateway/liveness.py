"""How a call's legs show they are alive, without a timeout around every frame.

A call moves about 200 frames a second, and one `asyncio.timeout()` costs ~6 µs on uvloop: a
timeout per receive and per send was a third of what the gateway spent per frame above the bare
relay (bench/README.md). Instead each leg stamps its `Liveness` per frame (a clock read and an
attribute write), and the session's watchdog reads it once a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# How often the session's watchdog looks; a dead leg is noticed within this of its bound.
WATCH_EVERY_S = 1.0


@dataclass(slots=True)
class Liveness:
    received_at: float = field(default_factory=time.monotonic)
    send_waiting_since: float = 0.0  # 0.0: no send is waiting

    def received(self) -> None:
        self.received_at = time.monotonic()

    def silent_s(self, now: float) -> float:
        return now - self.received_at

    def send_stalled_s(self, now: float) -> float:
        return now - self.send_waiting_since if self.send_waiting_since else 0.0
