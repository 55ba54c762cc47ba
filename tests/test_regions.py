"""TWILIO_REGION / TWILIO_EDGE reach Twilio's regional REST hosts: every request the gateway,
`doctor` and `setup-number` make goes to the REST fake (TWILIO_API_BASE) with the Host header
of the host it was meant for, and the fake records it."""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import sys
from pathlib import Path

import pytest

from gateway import doctor
from gateway.carriers.twilio.numbers import TwilioAccount
from gateway.carriers.twilio.rest import TwilioCalls
from gateway.sandbox.harness import sandbox
from gateway.sandbox.script import CallScript
from gateway.sandbox.servers import serve
from gateway.sandbox.twilio_rest_fake import TwilioRestFake
from gateway.settings import Settings, SettingsError

ACCOUNT_SID = "AC" + "e1" * 16
REPO = Path(__file__).resolve().parent.parent

# (TWILIO_REGION, TWILIO_EDGE) -> the host Twilio's regional REST API answers on
HOSTS = [
    ("ie1", "dublin", "api.dublin.ie1.twilio.com"),
    ("au1", "sydney", "api.sydney.au1.twilio.com"),
    ("jp1", "tokyo", "api.tokyo.jp1.twilio.com"),
    ("ie1", "", "api.dublin.ie1.twilio.com"),  # a region alone takes its default edge
    ("au1", "", "api.sydney.au1.twilio.com"),
    ("jp1", "", "api.tokyo.jp1.twilio.com"),
    ("de1", "", "api.frankfurt.de1.twilio.com"),
    ("", "sydney", "api.sydney.us1.twilio.com"),  # an edge alone: twilio-python's region us1
    ("", "", "api.twilio.com"),
]


@pytest.mark.parametrize(("region", "edge", "host"), HOSTS)
async def test_call_control_and_account_requests_go_to_the_regional_host(region, edge, host):
    token = secrets.token_hex(16)
    rest = TwilioRestFake(ACCOUNT_SID, token)
    async with serve(rest.app) as rest_url:
        calls = TwilioCalls(ACCOUNT_SID, token, rest_url, region=region, edge=edge)
        account = TwilioAccount(ACCOUNT_SID, token, rest_url, region=region, edge=edge)
        try:
            rest.add_call("CA" + "1" * 32)
            assert await calls.hangup("CA" + "1" * 32) is True
            await calls.create_call(to="+15550000001", from_="+15550000002", twiml="<Response/>")
            assert (await account.fetch()).status == "active"
            rest.account.add_number("+15550000003")
            number = await account.find("+15550000003")
            assert number is not None
            await account.point_here(number, "https://gw.example.com")
        finally:
            await calls.close()
            await account.close()
    assert account.host == host
    seen = [(r.method, r.path.rsplit("/", 1)[-1], r.host) for r in rest.seen]
    assert len(seen) == 5
    assert {h for *_, h in seen} == {host}, seen


def test_settings_resolve_the_region_and_refuse_what_names_no_host():
    s = Settings.from_env({"TWILIO_REGION": "AU1"})
    assert (s.twilio_region, s.twilio_edge) == ("au1", "sydney")
    s = Settings.from_env({"TWILIO_REGION": "ie1", "TWILIO_EDGE": "frankfurt"})
    assert (s.twilio_region, s.twilio_edge) == ("ie1", "frankfurt")
    assert (Settings.from_env({}).twilio_region, Settings.from_env({}).twilio_edge) == ("", "")
    for bad, words in (
        ({"TWILIO_REGION": "xx9"}, "has no default edge"),
        ({"TWILIO_REGION": "ireland"}, "must look like ie1"),
        ({"TWILIO_EDGE": "Dublin!"}, "must be an edge location"),
    ):
        with pytest.raises(SettingsError, match=words):
            Settings.from_env(bad)


async def test_a_running_gateway_hangs_up_through_the_region_in_its_environment(monkeypatch):
    """services.py builds its REST client without naming a region: it comes from TWILIO_REGION,
    as the twilio package reads it, with the default edge filled in."""
    monkeypatch.setenv("TWILIO_REGION", "jp1")
    monkeypatch.delenv("TWILIO_EDGE", raising=False)
    async with sandbox() as box:
        call = await box.connect_call()
        await call.run(CallScript(dtmf=[(0.5, "#")], max_s=10))  # the agent ends the call
        assert len(box.rest.hangups(call.call_sid)) == 1
    hosts = {r.host for r in box.rest.seen if r.path.endswith(f"/Calls/{call.call_sid}.json")}
    assert hosts == {"api.tokyo.jp1.twilio.com"}


async def test_doctor_and_setup_number_use_the_region(monkeypatch):
    token = secrets.token_hex(16)
    rest = TwilioRestFake(ACCOUNT_SID, token)
    rest.account.add_number("+15550000004")
    async with serve(rest.app) as rest_url:
        env = {
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": token,
            "TWILIO_API_BASE": rest_url,
            "TWILIO_REGION": "ie1",
            "PUBLIC_URL": "https://gw.example.com",
        }
        out = io.StringIO()
        await doctor.check_twilio(Settings.from_env(env), doctor.Report(out), ["+15550000004"])
        assert "via api.dublin.ie1.twilio.com" in out.getvalue()
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "CARTESIA_", "REDIS_"))}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "setup-number", "+15550000004",
            env={**keep, **env, "TWILIO_REGION": "au1"}, cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, stdout.decode() + stderr.decode()
    hosts = [r.host for r in rest.seen]
    assert hosts[:2] == ["api.dublin.ie1.twilio.com"] * 2  # the doctor: account, then the number
    assert set(hosts[2:]) == {"api.sydney.au1.twilio.com"} and len(hosts) == 4  # find, update
