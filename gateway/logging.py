"""structlog configuration: JSON for machines, console for humans, secrets never logged."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog

REDACTED = "[redacted]"

# Keys whose values are secret whatever they hold.
_SECRET_KEYS = re.compile(r"(token|secret|password|api_key|authorization|control_url|signature)", re.I)
# Control URLs and bearer values can hide inside any string (an exception text, a URL).
_CONTROL_PATH = re.compile(r"/control/[A-Za-z0-9_\-]{16,}")


class Redactor:
    """A structlog processor that scrubs secrets from every event before it is rendered."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = tuple(s for s in secrets if len(s) >= 4)

    def add(self, secret: str) -> None:
        if len(secret) >= 4 and secret not in self._secrets:
            self._secrets = (*self._secrets, secret)

    def scrub(self, text: str) -> str:
        text = _CONTROL_PATH.sub("/control/" + REDACTED, text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: REDACTED if _SECRET_KEYS.search(str(k)) else self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        return value

    def __call__(self, _logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        return self._clean(event)


redactor = Redactor()


def configure(
    level: str = "info", fmt: str = "json", secrets: Iterable[str] = (), stream: TextIO | None = None
) -> None:
    """Configure structlog and route stdlib logging (uvicorn, websockets) through it."""
    stream = stream or sys.stderr
    for secret in secrets:
        redactor.add(secret)
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,  # the traceback as text, then scrubbed
                redactor,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Twilio's client logs request bodies and headers at INFO; uvicorn's access log shows paths
    # (control URLs). Keep both quiet; the gateway logs what matters itself.
    logging.getLogger("twilio").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    # uvicorn's WebSocket protocol logs frames at DEBUG, and `start` carries the session token.
    logging.getLogger("uvicorn.error").setLevel(max(numeric, logging.INFO))


class LogThrottle:
    """The first few of a kind in full, then every hundredth: a broken peer must not make
    logging the bottleneck."""

    def __init__(self, first: int = 5, every: int = 100) -> None:
        self.count = 0
        self._first, self._every = first, every

    def allow(self) -> bool:
        self.count += 1
        return self.count <= self._first or self.count % self._every == 0
