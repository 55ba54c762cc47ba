"""The platform files run, as far as this machine allows (no Docker engine here).

- The Dockerfile's build stage, played step by step on the host (tests/dockerfile.py) into a
  clean virtualenv, from the pinned lock (PyPI); then the final image's ENTRYPOINT and CMD run
  from that virtualenv with the image's environment, its HEALTHCHECK command passes against
  it (and fails once it is gone), and its STOPSIGNAL stops it well within the stop timeout.
- Heroku's Procfile command, run by a shell as Heroku runs it, against a Redis that speaks
  TLS with a self-signed certificate, as Heroku Redis does.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gateway.services import SHUTDOWN_HANGUP_S
from gateway.settings import Settings
from tests.dockerfile import DockerIgnore, StageRunner, env_pairs, exec_form, expand, parse
from tests.nginx_server import self_signed_certificate
from tests.redis_server import free_port, redis_binary

ROOT = Path(__file__).resolve().parent.parent
DRAIN_S = Settings().shutdown_grace_s + Settings().end_call_drain_s + SHUTDOWN_HANGUP_S
# Settings the gateway starts with, none of them real.
FAKE_SETTINGS = {
    "PUBLIC_URL": "https://gw.example.com",
    "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
    "TWILIO_AUTH_TOKEN": secrets.token_hex(16),
    "CARTESIA_API_KEY": "sk_car_test",
    "CARTESIA_AGENT_ID": "agent_test",
    "LOG_LEVEL": "warning",
}


def http_status(url: str, proc: subprocess.Popen[str], want: int = 200, timeout: float = 30.0) -> int | None:
    """What `url` answers: `want` as soon as it does, else the last status within `timeout`."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline and status != want:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode}:\n{proc.communicate()[1][-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError:
            pass
        if status != want:
            time.sleep(0.1)
    return status


def listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.05)


def popen(command: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command,
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, all of it killed after the test
    )


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 10.0) -> float:
    """Seconds `proc` took to exit on `sig` (killed, and the test failed, past `timeout`)."""
    started = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"no exit within {timeout} s of signal {sig}")
    return time.monotonic() - started


def test_the_dockerfile_builds_and_runs_in_a_clean_virtualenv(tmp_path):
    if not (ROOT / "requirements.txt").exists():
        pytest.fail("requirements.txt (the pinned lock the Dockerfile installs) is missing")
    global_args, stages = parse((ROOT / "Dockerfile").read_text())
    build, final = stages[0], stages[-1]
    (copied_venv,) = [i for i in final.all("COPY") if i.flags.get("from") == build.name]
    venv = copied_venv.args.split()[-1]
    runner = StageRunner(ROOT, tmp_path, DockerIgnore((ROOT / ".dockerignore").read_text()), global_args)
    # pip's cache is the one change: the image is built without it, the test reuses downloads.
    runner.run(build, skip_env=frozenset({"PIP_NO_CACHE_DIR"}))
    assert any("pip install" in command for command in runner.log)
    host_venv = runner.host(venv)
    assert (host_venv / "bin" / "python").exists(), (
        "the build stage made no virtualenv where the image copies it"
    )
    # The virtualenv holds the gateway itself, not a link to the sources (no editable install).
    listed = subprocess.run(
        [host_venv / "bin" / "python", "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(r"^line-gateway==", listed, re.MULTILINE), listed

    # The final image's environment, with its virtualenv where the build stage put it.
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    for ins in final.all("ENV"):
        for key, value in env_pairs(expand(ins.args, {**global_args, **env})).items():
            env[key] = value.replace(venv, str(host_venv))
    assert env["PATH"].startswith(f"{host_venv}/bin:")
    port = free_port()
    env.update(FAKE_SETTINGS, PORT=str(port))
    command = exec_form(final.last("ENTRYPOINT").args) + exec_form(final.last("CMD").args)
    assert command[:2] == ["line-gateway", "serve"]
    healthcheck = final.last("HEALTHCHECK")
    probe = healthcheck.args.removeprefix("CMD").strip()
    server = popen(command, env, tmp_path)
    try:
        assert http_status(f"http://127.0.0.1:{port}/healthz", server) == 200
        done = subprocess.run(["/bin/sh", "-c", probe], env=env, capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stderr
        stop_signal = getattr(signal, final.last("STOPSIGNAL").args)
        assert stop(server, stop_signal, timeout=DRAIN_S + 5) < 10  # no calls: it stops at once
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    done = subprocess.run(["/bin/sh", "-c", probe], env=env, capture_output=True, text=True, timeout=10)
    assert done.returncode != 0  # nothing listens: unhealthy


def test_the_procfile_serves_with_heroku_redis_tls(tmp_path):
    """Heroku Redis hands out `rediss://` URLs whose self-signed certificate no client trusts:
    `line-gateway serve` alone starts unready there, and the Procfile's command (which turns
    verification off for such a URL) is ready."""
    binary = redis_binary()
    if binary is None:
        pytest.fail("redis-server is not installed: run scripts/test.sh")
    (web,) = [line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:")]
    command = web.removeprefix("web:").strip()
    cert, key = self_signed_certificate(tmp_path)
    tls_port = free_port()
    redis = subprocess.Popen(
        [
            binary, "--port", "0", "--tls-port", str(tls_port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    env = {
        **os.environ,
        **FAKE_SETTINGS,
        "REDIS_URL": f"rediss://127.0.0.1:{tls_port}",
        # The buildpack's virtualenv is on Heroku's PATH; here, this interpreter's.
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    try:
        listening(tls_port)
        for shell_command, ready in ((command, 200), ("exec line-gateway serve --port $PORT", 503)):
            env["PORT"] = str(port := free_port())
            web = popen(["/bin/sh", "-c", shell_command], env)
            try:
                assert http_status(f"http://127.0.0.1:{port}/readyz", web, want=ready) == ready, shell_command
                # `exec`: the shell became the gateway, so the platform's SIGTERM reaches it
                # (uvicorn re-raises it once drained) and no server outlives the shell.
                stop(web, timeout=DRAIN_S + 5)
                assert web.returncode in (0, -signal.SIGTERM)
                with pytest.raises(OSError):
                    socket.create_connection(("127.0.0.1", port), 0.5).close()
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(web.pid, signal.SIGKILL)
    finally:
        redis.terminate()
        redis.wait(5)
