"""Choosing the server's WebSocket protocol (gateway.ws_select): the fast path only on the uvicorn
internals it was written for, else uvicorn's own protocol with one warning, and calls still work.

uvicorn 0.35 to 0.52.0 had no `disconnected` on their protocol, and the fast path, run on them,
killed every call at its first audio frame. Here such a uvicorn is simulated by monkeypatching.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs
from test_call import FRAME, dominant_hz, frames, loud

from gateway import ws_select
from gateway.sandbox.agent import GREETING_HZ, AgentBehaviour
from gateway.sandbox.harness import sandbox
from gateway.sandbox.script import CallScript
from gateway.sandbox.servers import uvicorn_config
from gateway.ws_select import fast_path_mismatches, server_ws_protocol, stock_ws_protocol


@pytest.fixture
def decide_again() -> Iterator[None]:
    """The choice is made once per process: forget it before and after the test."""
    server_ws_protocol.cache_clear()
    yield
    server_ws_protocol.cache_clear()


@pytest.fixture
def uvicorn_without_disconnected(monkeypatch: pytest.MonkeyPatch, decide_again: None) -> None:
    """uvicorn's protocol as before 0.52.1, to the check: `connection_lost` sets no `disconnected`.
    (It still runs uvicorn's real one, so the stock protocol works; and the fast path, should it
    be chosen anyway, fails the call at once.)"""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    from gateway.ws_protocol import FastPathWebSocketProtocol

    real_connection_lost = WebSocketsSansIOProtocol.connection_lost

    def connection_lost(self: Any, exc: Exception | None) -> None:
        real_connection_lost(self, exc)

    def fast_path_ran(self: Any, data: bytes) -> None:
        raise AssertionError("the fast path ran on internals it does not fit")

    monkeypatch.setattr(WebSocketsSansIOProtocol, "connection_lost", connection_lost)
    monkeypatch.setattr(FastPathWebSocketProtocol, "data_received", fast_path_ran)


def test_the_fast_path_fits_the_uvicorn_it_was_written_for() -> None:
    """On uvicorn 0.52.1 or newer the check must find nothing amiss (a newer uvicorn that fails
    here changed what the fast path relies on: adapt gateway/ws_protocol.py, or let it fall back)."""
    release = ws_select._release(ws_select._version("uvicorn"))
    if release < ws_select.FAST_PATH_SINCE:
        pytest.skip(f"uvicorn {release} predates the fast path; the server falls back")
    assert fast_path_mismatches() == []


def test_an_older_uvicorn_is_refused_by_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ws_select, "_version", lambda dist: "0.52.0" if dist == "uvicorn" else "15.0.1")
    assert fast_path_mismatches() == ["uvicorn 0.52.0 is older than 0.52.1"]


async def test_missing_internals_fall_back_to_uvicorns_protocol_and_a_call_still_works(
    uvicorn_without_disconnected: None,
) -> None:
    expected = "; ".join(fast_path_mismatches())
    assert expected  # the simulated internals (or an old uvicorn) keep the fast path off
    with capture_logs() as logs:
        assert uvicorn_config(None, "127.0.0.1", 1).ws == stock_ws_protocol()
        async with sandbox(AgentBehaviour(greeting_s=0.6)) as box:  # two more servers, no more warnings
            call = await box.connect_call()
            await call.run(CallScript(hangup_at=1.2))
            agent_call = await box.agent.wait_for_call()
            await asyncio.wait_for(agent_call.closed.wait(), 5)
    warnings = [e for e in logs if e["event"] == "websocket_fast_path_off"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["reason"] == expected
    heard = [f for f in frames(bytes(call.heard)) if loud(f)]
    assert len(heard) >= 25
    assert abs(dominant_hz(b"".join(heard)) - GREETING_HZ) < 15
    assert bytes(agent_call.audio_in) == bytes(call.sent_audio)
    assert len(agent_call.audio_in) >= FRAME * 40
    assert call.protocol_errors == []


def test_the_fallback_names_what_is_missing(uvicorn_without_disconnected: None) -> None:
    if ws_select._release(ws_select._version("uvicorn")) < ws_select.FAST_PATH_SINCE:
        pytest.skip("an old uvicorn is refused by its version first")
    assert fast_path_mismatches() == ["connection_lost() does not use disconnected"]
