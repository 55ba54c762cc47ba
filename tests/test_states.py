"""A call's states: one table of legal moves, and an illegal move logged with the call SID."""

import itertools

import orjson

from gateway.call.actions import ActionRefused, EndCall, SendDtmf, TransferPlan, admit
from gateway.call.states import FINAL, TRANSITIONS, State, check_transition, is_legal


def test_every_state_has_a_row_and_nothing_leaves_ended():
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.ENDED] == frozenset()
    # A transferred call comes back only as a new agent session, when nobody took it.
    assert TRANSITIONS[State.TRANSFERRED] == {State.RINGING}
    assert {State.ENDED, State.TRANSFERRED} == FINAL


def test_the_moves_a_call_makes():
    path = ["ringing", "connecting", "live", "transferring", "live", "ending", "ended"]
    assert all(is_legal(a, b) for a, b in itertools.pairwise(path))
    assert not is_legal("ended", "live")
    assert not is_legal("ending", "transferring")
    assert State("live") == "live" and f"{State.LIVE}" == "live"  # stored and logged as the string


def test_an_illegal_move_is_logged_with_the_call_sid(captured_logs):
    mark = captured_logs.tell()
    assert check_transition("CA_illegal_1", "ended", "live") is False
    assert check_transition("CA_legal_1", "live", "ending") is True
    lines = [orjson.loads(line) for line in captured_logs.getvalue()[mark:].splitlines()]
    errors = [line for line in lines if line.get("event") == "illegal_call_transition"]
    assert [(e["call_sid"], e["level"], e["previous"], e["state"]) for e in errors] == [
        ("CA_illegal_1", "error", "ended", "live")
    ]


def test_admit_is_the_one_rule_for_what_a_call_takes():
    plan = TransferPlan("+15551234567")
    assert admit("live", EndCall()) and admit("live", plan) and admit("connecting", SendDtmf("1"))
    assert admit("ending", EndCall()) is False  # a repeat: answered 200, nothing more done
    for state, action, status, code in [
        ("ended", EndCall(), 404, "not_found"),
        ("transferred", plan, 404, "not_found"),
        ("ending", plan, 409, "call_ending"),
        ("ending", SendDtmf("1"), 409, "call_ending"),
        ("transferring", EndCall(), 409, "call_transferring"),
        ("transferring", plan, 409, "call_transferring"),
    ]:
        try:
            admit(state, action)
        except ActionRefused as exc:
            assert (exc.status, exc.code) == (status, code)
        else:
            raise AssertionError(f"{action} admitted in {state}")
