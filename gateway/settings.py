"""Typed settings, read once from the environment (only `app.py` and `cli.py` call this)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.audio import OUTPUT_FORMATS
from gateway.carriers.twilio.regions import RegionError, resolve


class SettingsError(ValueError):
    """A setting has a value the gateway cannot run with."""


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return value


def _json_setting(name: str, raw: str) -> Any:
    """JSON given inline, or the path of a file holding it."""
    text = raw
    if not raw.lstrip().startswith(("{", "[")):
        try:
            text = Path(raw).read_text()
        except OSError as exc:
            raise SettingsError(f"{name} is neither JSON nor a readable file: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{name} is not valid JSON: {exc}") from None


def _agent_routes(raw: str) -> dict[str, dict[str, Any]]:
    """AGENT_ROUTES: called number or SIP URI -> agent id, or {"agent": id, "metadata": {...}}."""
    if not raw:
        return {}
    routes = _json_setting("AGENT_ROUTES", raw)
    if not isinstance(routes, dict):
        raise SettingsError("AGENT_ROUTES must map called numbers or SIP URIs to agents")
    parsed: dict[str, dict[str, Any]] = {}
    for called, route in routes.items():
        if isinstance(route, str):
            route = {"agent": route}
        if not isinstance(route, dict) or not isinstance(route.get("agent"), str) or not route["agent"]:
            raise SettingsError(f"AGENT_ROUTES[{called!r}] needs an agent id")
        metadata = route.get("metadata", {})
        if not isinstance(metadata, dict):
            raise SettingsError(f"AGENT_ROUTES[{called!r}].metadata must be an object")
        parsed[str(called)] = {"agent": route["agent"], "metadata": metadata}
        if route.get("fallback"):
            fallback = route["fallback"]
            if not isinstance(fallback, str):
                raise SettingsError(f"AGENT_ROUTES[{called!r}].fallback must be a string")
            parsed[str(called)]["fallback"] = agent_fallback(f"AGENT_ROUTES[{called!r}].fallback", fallback)
    return parsed


def _sip_credentials(raw: str) -> tuple[tuple[str, str, str], ...]:
    """TRANSFER_SIP_CREDENTIALS: {"pbx.example.com": {"username": .., "password": ..}, ...}."""
    if not raw:
        return ()
    data = _json_setting("TRANSFER_SIP_CREDENTIALS", raw)
    if not isinstance(data, dict):
        raise SettingsError("TRANSFER_SIP_CREDENTIALS must map SIP hosts to credentials")
    out = []
    for host, cred in data.items():
        if not isinstance(cred, dict) or not cred.get("username") or not cred.get("password"):
            raise SettingsError(f"TRANSFER_SIP_CREDENTIALS[{host!r}] needs a username and a password")
        out.append((str(host), str(cred["username"]), str(cred["password"])))
    return tuple(out)


DEFAULT_FALLBACK_TEXT = "Sorry, we can't take your call right now. Please try again later. Goodbye."


def agent_fallback(name: str, raw: str) -> tuple[str, str]:
    """`say:<text>`, `dial:<number or sip: URI>` or `hangup`; empty is the default `say`."""
    if not raw:
        return ("say", DEFAULT_FALLBACK_TEXT)
    kind, _, arg = raw.partition(":")
    kind = kind.strip().lower()
    if kind == "hangup" and not arg.strip():
        return ("hangup", "")
    if kind == "say":
        return ("say", arg.strip() or DEFAULT_FALLBACK_TEXT)
    if kind == "dial" and arg.strip():
        return ("dial", arg.strip())
    raise SettingsError(f"{name} must be say:<text>, dial:<number or sip: URI> or hangup, got {raw!r}")


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
    # On SIGTERM, live calls get this long to finish before they are ended; with the agent's
    # drain and the hang-up it fits a platform's usual 30 s stop window.
    shutdown_grace_s: float = 15.0
    transfer_fallback: str = "agent"
    transfer_fallback_message: str = "Sorry, nobody could take your call right now. Goodbye."
    transfer_timeout_s: int = 30
    transfer_hold_url: str = ""
    # host pattern -> (username, password) for SIP targets that need digest auth
    transfer_sip_credentials: tuple[tuple[str, str, str], ...] = field(default=(), repr=False)
    agent_routes: dict[str, dict[str, Any]] = field(default_factory=dict)
    gateway_api_key: str = field(default="", repr=False)
    outbound_from: str = ""
    calls_per_second: float = 1.0
    max_concurrent_calls: int = 10
    record_calls: bool = False
    recordings_dir: str = ""
    call_events_url: str = field(default="", repr=False)
    call_events_secret: str = field(default="", repr=False)
    # What a caller gets when the agent cannot be had: ("say", text), ("dial", destination)
    # or ("hangup", ""). AGENT_ROUTES may name one per number.
    agent_fallback: tuple[str, str] = ("say", DEFAULT_FALLBACK_TEXT)
    agent_reconnects: int = 3
    stream_resume_grace_s: float = 10.0
    max_calls: int = 300
    log_level: str = "info"
    log_format: str = "json"
    # Twilio's regional REST host (gateway.carriers.twilio.regions), resolved: a region given
    # alone has its default edge here. Both "": api.twilio.com.
    twilio_region: str = ""
    twilio_edge: str = ""

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
        try:
            twilio_region, twilio_edge = resolve(get("TWILIO_REGION"), get("TWILIO_EDGE"))
        except RegionError as exc:
            raise SettingsError(str(exc)) from None
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
            shutdown_grace_s=_float("SHUTDOWN_GRACE_S", get("SHUTDOWN_GRACE_S", "15")),
            transfer_fallback=_choice(
                "TRANSFER_FALLBACK", get("TRANSFER_FALLBACK", "agent"), ("agent", "hangup")
            ),
            transfer_fallback_message=get("TRANSFER_FALLBACK_MESSAGE") or cls.transfer_fallback_message,
            transfer_timeout_s=int(_float("TRANSFER_TIMEOUT_S", get("TRANSFER_TIMEOUT_S", "30"))),
            transfer_hold_url=get("TRANSFER_HOLD_URL"),
            transfer_sip_credentials=_sip_credentials(get("TRANSFER_SIP_CREDENTIALS")),
            agent_routes=_agent_routes(get("AGENT_ROUTES")),
            gateway_api_key=get("GATEWAY_API_KEY"),
            outbound_from=get("OUTBOUND_FROM"),
            calls_per_second=_float("CALLS_PER_SECOND", get("CALLS_PER_SECOND", "1")) or 1.0,
            max_concurrent_calls=int(_float("MAX_CONCURRENT_CALLS", get("MAX_CONCURRENT_CALLS", "10"))),
            record_calls=_bool("RECORD_CALLS", get("RECORD_CALLS", "false")),
            recordings_dir=get("RECORDINGS_DIR"),
            call_events_url=get("CALL_EVENTS_URL"),
            call_events_secret=get("CALL_EVENTS_SECRET"),
            agent_fallback=agent_fallback("AGENT_FALLBACK", get("AGENT_FALLBACK")),
            agent_reconnects=int(_float("AGENT_RECONNECTS", get("AGENT_RECONNECTS", "3"))),
            stream_resume_grace_s=_float("STREAM_RESUME_GRACE_S", get("STREAM_RESUME_GRACE_S", "10")),
            max_calls=int(_float("MAX_CALLS", get("MAX_CALLS", "300"))),
            log_level=get("LOG_LEVEL", "info").lower(),
            log_format=log_format,
            twilio_region=twilio_region,
            twilio_edge=twilio_edge,
        )

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in a log line."""
        values = [
            self.twilio_auth_token,
            self.cartesia_api_key,
            self.gateway_api_key,
            self.call_events_secret,
            *(password for _, _, password in self.transfer_sip_credentials),
            urlsplit(self.redis_url).password or "",
        ]
        return tuple(s for s in values if s)
