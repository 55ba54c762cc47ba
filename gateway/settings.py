"""Typed settings, read once from the environment (only `app.py` and `cli.py` call this)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.audio import OUTPUT_FORMATS


class SettingsError(ValueError):
    """A setting has a value the gateway cannot run with."""


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise SettingsError(f"{name} must not be negative, got {raw!r}")
    return value


@dataclass(frozen=True)
class Settings:
    port: int = 8080
    public_url: str = "http://127.0.0.1:8080"
    twilio_account_sid: str = ""
    twilio_auth_token: str = field(default="", repr=False)
    twilio_api_base: str = "https://api.twilio.com"
    twilio_validate_signatures: bool = True
    cartesia_api_key: str = field(default="", repr=False)
    cartesia_agent_id: str = ""
    cartesia_url: str = "wss://api.cartesia.ai"
    cartesia_version: str = "2025-04-16"
    cartesia_output_format: str = "mulaw_8000"
    redis_url: str = field(default="", repr=False)
    transfer_to: str = ""
    transfer_caller_id: str = ""
    transfer_allow: tuple[str, ...] = ()
    end_call_drain_s: float = 5.0
    log_level: str = "info"
    log_format: str = "json"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def get(name: str, default: str = "") -> str:
            return env.get(name, default).strip()

        port_raw = get("PORT", "8080")
        if not port_raw.isdigit() or not 0 < int(port_raw) < 65536:
            raise SettingsError(f"PORT must be a TCP port number, got {port_raw!r}")
        public_url = get("PUBLIC_URL").rstrip("/") or f"http://127.0.0.1:{port_raw}"
        if not public_url.startswith(("http://", "https://")):
            raise SettingsError(f"PUBLIC_URL must start with http:// or https://, got {public_url!r}")
        output_format = get("CARTESIA_OUTPUT_FORMAT", "mulaw_8000")
        if output_format not in OUTPUT_FORMATS:
            known = ", ".join(OUTPUT_FORMATS)
            raise SettingsError(f"CARTESIA_OUTPUT_FORMAT must be one of {known}, got {output_format!r}")
        log_format = get("LOG_FORMAT", "json").lower()
        if log_format not in {"json", "console"}:
            raise SettingsError(f"LOG_FORMAT must be json or console, got {log_format!r}")
        return cls(
            port=int(port_raw),
            public_url=public_url,
            twilio_account_sid=get("TWILIO_ACCOUNT_SID"),
            twilio_auth_token=get("TWILIO_AUTH_TOKEN"),
            twilio_api_base=get("TWILIO_API_BASE", "https://api.twilio.com").rstrip("/"),
            twilio_validate_signatures=_bool(
                "TWILIO_VALIDATE_SIGNATURES", get("TWILIO_VALIDATE_SIGNATURES", "true")
            ),
            cartesia_api_key=get("CARTESIA_API_KEY"),
            cartesia_agent_id=get("CARTESIA_AGENT_ID"),
            cartesia_url=get("CARTESIA_URL", "wss://api.cartesia.ai").rstrip("/"),
            cartesia_version=get("CARTESIA_VERSION", "2025-04-16"),
            cartesia_output_format=output_format,
            redis_url=get("REDIS_URL"),
            transfer_to=get("TRANSFER_TO"),
            transfer_caller_id=get("TRANSFER_CALLER_ID"),
            transfer_allow=tuple(p.strip() for p in get("TRANSFER_ALLOW").split(",") if p.strip()),
            end_call_drain_s=_float("END_CALL_DRAIN_S", get("END_CALL_DRAIN_S", "5")),
            log_level=get("LOG_LEVEL", "info").lower(),
            log_format=log_format,
        )

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in a log line."""
        return tuple(s for s in (self.twilio_auth_token, self.cartesia_api_key) if s)
