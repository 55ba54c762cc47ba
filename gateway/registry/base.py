"""The session registry: which calls are live, which instance holds each, and how to reach it."""

from __future__ import annotations

import abc
import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# A call that rang but whose media never arrived is forgotten after this; a live call's entry
# is refreshed by its owner's heartbeat, so it outlives its TTL only while the owner is alive.
RINGING_TTL_S = 120
LIVE_TTL_S = 6 * 3600
# A transferred call's record outlives its session this long, for the transfer's outcome (a
# transfer nobody takes brings the caller back to an agent with the call's metadata).
TRANSFERRED_TTL_S = 3600
# Liveness: heartbeat at least every 2 s; an instance silent for 6 s is gone.
HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_TTL_S = 6.0
# How long a control request waits for the owning instance's reply.
ROUTE_TIMEOUT_S = 3.0

RouteHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def new_secret() -> str:
    """256 random bits, URL-safe: control tokens and session references."""
    return secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """What the registry stores instead of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def control_token(key: str, call_sid: str, salt: str) -> str:
    """The call's control token, the same on every instance and across every resume or move of
    the call: an HMAC of the call under a key all instances share (so only its hash and a salt
    are ever stored)."""
    mac = hmac.new(hashlib.sha256(b"line-gateway control " + key.encode()).digest(), digestmod="sha256")
    mac.update(f"{call_sid}:{salt}".encode())
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


def new_instance_id() -> str:
    return "gw-" + secrets.token_hex(6)


@dataclass(slots=True)
class CallRecord:
    call_sid: str
    owner: str
    state: str
    from_: str
    to: str
    agent_id: str
    direction: str
    token_hash: str  # SHA-256 of the control token (minted when the media socket lands)
    session_hash: str = ""  # SHA-256 of the stream's `session` parameter
    account_sid: str = ""
    started_at: float = field(default_factory=time.time)
    sip_headers: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    # A warm transfer under way: {"target", "human_call_sid", "joined"}.
    transfer: dict[str, Any] = field(default_factory=dict)
    token_salt: str = ""  # with the shared key, gives the control token (see control_token)
    # The `metadata` of the last `custom` event the agent sent (bounded), handed back to it when
    # its session is resumed: the agent's own state across a reconnect or a move.
    agent_state: dict[str, Any] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)  # [kind, argument]; [] the default
    resumes: int = 0  # new streams this call has had (after a drop, a move, a takeover)
    resume_reason: str = ""  # why the stream now due was started; "" a first stream

    def public(self) -> dict[str, Any]:
        """What `GET /control/{token}` shows: nothing secret."""
        return {
            "call_sid": self.call_sid,
            "state": self.state,
            "from": self.from_,
            "to": self.to,
            "agent_id": self.agent_id,
            "direction": self.direction,
            "started_at": self.started_at,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallRecord:
        return cls(**{k: data[k] for k in cls.__slots__ if k in data})  # type: ignore[attr-defined]


class RegistryUnavailable(RuntimeError):
    """The shared registry cannot be reached right now."""


class OwnerGone(RuntimeError):
    """Nobody listens for the instance a request was routed to: it has died (its heartbeat may
    not have expired yet)."""


class SessionRegistry(abc.ABC):
    """One interface, two implementations: in-process (one instance) and Redis (many)."""

    instance_id: str

    @abc.abstractmethod
    async def start(self, handler: RouteHandler) -> None:
        """Begin heartbeats and take routed control requests with `handler`."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ready(self) -> bool:
        """True when the registry answers."""

    @abc.abstractmethod
    async def put(self, record: CallRecord, ttl_s: float = RINGING_TTL_S) -> None:
        """Create or replace the call's entry and its token mapping."""

    @abc.abstractmethod
    async def get(self, call_sid: str) -> CallRecord | None: ...

    @abc.abstractmethod
    async def by_token(self, token_hash: str) -> CallRecord | None: ...

    @abc.abstractmethod
    async def update(self, call_sid: str, **fields: Any) -> None:
        """Change some of the record's fields, keeping its lifetime. The owner's write only while
        the record still names its session (`session_hash`): a moved call's is the new owner's."""

    async def set_state(self, call_sid: str, state: str) -> None:
        await self.update(call_sid, state=state)

    @abc.abstractmethod
    async def refresh(self, call_sid: str, ttl_s: float) -> None:
        """Extend the entry's lifetime (the owner does this while the call is live)."""

    @abc.abstractmethod
    async def delete(self, call_sid: str, session_hash: str | None = None) -> None:
        """Forget the call; its control token dies with it. With `session_hash`, only while the
        call's record still names that session: a newer session of the call (after a transfer
        nobody took, or on the instance its stream moved to) keeps the record and the token."""

    @abc.abstractmethod
    async def claim_stream(self, session_hash: str) -> bool:
        """Take a stream's `session` reference for the one media socket that may use it: False
        when a socket already has (a replayed upgrade)."""

    @abc.abstractmethod
    async def owner_alive(self, instance_id: str) -> bool: ...

    async def peers_alive(self) -> bool:
        """Another instance is alive to take this one's calls (a deploy moves them there)."""
        return False

    async def orphaned_calls(self) -> list[CallRecord]:
        """Calls whose instance has died, claimed for this instance to take over: each is
        returned to one instance only."""
        return []

    @abc.abstractmethod
    async def route(self, owner: str, request: dict[str, Any]) -> dict[str, Any] | None:
        """Ask the owning instance to act; its reply, or None if it did not answer in time.
        OwnerGone when no instance by that name listens."""

    @abc.abstractmethod
    async def hit(self, key: str, limit: int, window_s: float) -> bool:
        """Count one request under `key`; False when more than `limit` fell in `window_s`."""
