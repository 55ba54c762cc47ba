"""Every platform file parses and agrees with the gateway: settings it names exist, probes and
health checks hit real routes, ports agree, and every stop window outlasts the drain.

The drain on SIGTERM: SHUTDOWN_GRACE_S (15 s) for live calls to finish, then END_CALL_DRAIN_S
(5 s) for the agents' last words and SHUTDOWN_HANGUP_S (5 s) for the hang-ups: 25 s.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.app import create_app
from gateway.carriers.twilio.codec import MEDIA_PATH
from gateway.http.outbound import MAX_BATCH_BODY_BYTES
from gateway.services import SHUTDOWN_HANGUP_S
from gateway.settings import Settings
from tests.dockerfile import DockerIgnore, env_pairs, exec_form, parse

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = Settings()
DRAIN_S = DEFAULTS.shutdown_grace_s + DEFAULTS.end_call_drain_s + SHUTDOWN_HANGUP_S
MARGIN_S = 5  # for the server to close after the drain
REQUIRED = ("PUBLIC_URL", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "CARTESIA_API_KEY", "CARTESIA_AGENT_ID")


def setting_names() -> set[str]:
    """Every environment variable gateway/settings.py reads (`get("NAME"`)."""
    text = (ROOT / "gateway" / "settings.py").read_text()
    return set(re.findall(r"""\bget\(\s*["']([A-Z][A-Z0-9_]+)["']""", text))


def routes() -> set[str]:
    return {route.path for route in create_app(Settings()).routes}  # type: ignore[attr-defined]


def seconds(value: str | int) -> float:
    """`40`, `"40"`, `"40s"`, `"1m30s"` as seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s?)?", value)
    assert parts and value, f"not a duration: {value!r}"
    return int(parts.group(1) or 0) * 60 + int(parts.group(2) or 0)


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_the_drain_is_what_the_files_assume():
    assert DRAIN_S == 25


# deploy/env.example


def env_example() -> dict[str, str]:
    """Name -> value of every `NAME=value` line, commented out or not."""
    text = (ROOT / "deploy" / "env.example").read_text()
    return dict(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=(.*)$", text, flags=re.MULTILINE))


def test_env_example_lists_every_setting_and_nothing_else():
    listed = env_example()
    assert setting_names() - listed.keys() == set(), "settings missing from deploy/env.example"
    assert listed.keys() - setting_names() == set(), "deploy/env.example lists what the gateway never reads"


def test_env_example_sets_the_required_settings_and_every_example_value_is_accepted():
    text = (ROOT / "deploy" / "env.example").read_text()
    for name in REQUIRED:
        assert re.search(rf"^{name}=\S", text, flags=re.MULTILINE), f"{name} must be set, not commented out"
    lines = text.splitlines()
    for i, line in enumerate(lines):  # one comment line above each setting says what it is
        if re.match(r"^#? ?[A-Z][A-Z0-9_]+=", line):
            assert lines[i - 1].startswith("# ") and not re.match(r"^# [A-Z][A-Z0-9_]+=", lines[i - 1]), line
    Settings.from_env(env_example())  # every example value, all at once, is a valid setting


# Heroku


def test_python_version_file_names_a_supported_python():
    version = (ROOT / ".python-version").read_text().strip()
    assert re.fullmatch(r"3\.\d+", version), "major version form, so the platforms apply security patches"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    minimum = re.fullmatch(r">=\s*3\.(\d+)", pyproject["project"]["requires-python"]).group(1)  # type: ignore[union-attr]
    assert int(version.split(".")[1]) >= int(minimum)
    global_args, _ = parse((ROOT / "Dockerfile").read_text())
    assert global_args["PYTHON_VERSION"] == version  # the image runs the same Python


def test_requirements_lock_installs_the_gateway():
    """Heroku's and Render's Python builds need a requirements.txt; the lock ends with `.`."""
    path = ROOT / "requirements.txt"
    assert path.exists(), "requirements.txt is missing (the buildpacks need it)"
    lines = [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert lines[-1] == "."


def test_procfile_runs_the_gateway_on_the_platform_port():
    processes = dict(
        line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip()
    )
    assert list(processes) == ["web"]
    web = processes["web"]
    assert re.search(r"\bexec line-gateway serve --host 0\.0\.0\.0 --port \"?\$PORT\"?$", web), web


def test_app_json_declares_redis_the_required_settings_and_preboot():
    app = json.loads((ROOT / "app.json").read_text())
    assert app["buildpacks"] == [{"url": "heroku/python"}]
    assert [addon["plan"].split(":")[0] for addon in app["addons"]] == ["heroku-redis"]
    assert app["formation"]["web"]["quantity"] >= 2  # with Redis, more than one dyno
    assert "preboot" in app["description"]
    env = app["env"]
    assert env.keys() <= setting_names()
    assert "REDIS_URL" not in env  # the add-on sets it
    for name, spec in env.items():
        assert spec["description"], name
        assert spec["required"] is (name in REQUIRED), name
    assert set(REQUIRED) <= env.keys()
    # Heroku's stop window is 30 s and cannot be changed: the default drain must fit in it.
    assert DRAIN_S < 30


# Docker


def test_dockerfile_runs_as_a_user_with_a_healthcheck_and_a_stop_signal():
    global_args, stages = parse((ROOT / "Dockerfile").read_text())
    assert len(stages) >= 2, "multi-stage: the build tools stay out of the image"
    final = stages[-1]
    assert final.base == f"python:{global_args['PYTHON_VERSION']}-slim-bookworm"
    user = final.last("USER").args  # type: ignore[union-attr]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root UID (Kubernetes' runAsNonRoot checks it)"
    assert re.search(rf"useradd .*--uid {uid}\b", " ".join(i.args for i in final.all("RUN")))
    assert final.last("STOPSIGNAL").args == "SIGTERM"  # type: ignore[union-attr]
    env = {k: v for i in final.all("ENV") for k, v in env_pairs(i.args).items()}
    assert final.last("EXPOSE").args == env["PORT"] == str(DEFAULTS.port)  # type: ignore[union-attr]
    health = final.last("HEALTHCHECK")
    assert health is not None and health.args.startswith("CMD ")
    assert "/healthz" in health.args and "/healthz" in routes()
    assert seconds(health.flags["timeout"]) < seconds(health.flags["interval"])
    command = exec_form(final.last("ENTRYPOINT").args) + exec_form(final.last("CMD").args)  # type: ignore[union-attr]
    assert command == ["line-gateway", "serve", "--host", "0.0.0.0"]


def test_dockerignore_lets_in_what_the_dockerfile_copies_and_keeps_secrets_out():
    ignore = DockerIgnore((ROOT / ".dockerignore").read_text())
    _, stages = parse((ROOT / "Dockerfile").read_text())
    for ins in (i for stage in stages for i in stage.all("COPY") if "from" not in i.flags):
        for source in ins.args.split()[:-1]:
            assert not ignore.excluded(source), f"COPY {source} is left out by .dockerignore"
    kept_out = [
        ".env", "deploy/compose/gateway.env", "deploy/compose/certs/privkey.pem", ".venv/bin/python",
        "tests/test_call.py", ".git/config", "gateway/__pycache__/app.cpython-311.pyc",
    ]  # fmt: skip
    for path in kept_out:
        assert ignore.excluded(path), path
    assert not ignore.excluded("gateway/registry/redis/lua/rate.lua")


def test_docs_give_docker_a_stop_timeout_above_the_drain():
    for path in (ROOT / "Dockerfile", ROOT / "README.md"):
        timeouts = [int(t) for t in re.findall(r"--stop-timeout (\d+)", path.read_text())]
        assert timeouts and min(timeouts) >= DRAIN_S + MARGIN_S, path.name


# Docker Compose and nginx


def nginx_conf() -> str:
    return (ROOT / "deploy" / "nginx" / "line-gateway.conf").read_text()


def test_compose_runs_two_gateways_redis_and_nginx():
    compose_dir = ROOT / "deploy" / "compose"
    services = yaml.safe_load((compose_dir / "compose.yaml").read_text())["services"]
    gateways = {name: s for name, s in services.items() if "build" in s}
    assert len(gateways) >= 2
    redis_host = {"redis"} & services.keys()
    assert redis_host and "noeviction" in services["redis"]["command"]
    upstream = re.findall(r"^\s*server ([\w-]+):(\d+) ", nginx_conf(), flags=re.MULTILINE)
    assert sorted(upstream) == sorted((name, s["environment"]["PORT"]) for name, s in gateways.items())
    for name, service in gateways.items():
        assert (compose_dir / service["build"]["context"] / "Dockerfile").exists(), name
        assert service["env_file"] == "gateway.env"  # documented: a copy of deploy/env.example
        assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert service["stop_signal"] == "SIGTERM"
        assert seconds(service["stop_grace_period"]) >= DRAIN_S + MARGIN_S, name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    nginx = services["nginx"]
    mounts = {container: host for host, container, _ in (v.rsplit(":", 2) for v in nginx["volumes"])}
    conf_path = (compose_dir / mounts["/etc/nginx/conf.d/default.conf"]).resolve()
    assert conf_path == ROOT / "deploy" / "nginx" / "line-gateway.conf"
    certs = re.findall(r"^\s*ssl_certificate(?:_key)?\s+(\S+);", nginx_conf(), flags=re.MULTILINE)
    assert len(certs) == 2 and {str(Path(c).parent) for c in certs} <= mounts.keys()
    assert "443:443" in nginx["ports"]
    assert {n: d["condition"] for n, d in nginx["depends_on"].items()} == dict.fromkeys(
        gateways, "service_healthy"
    )
    major, minor, *_ = (int(x) for x in re.search(r":(\d+)\.(\d+)", nginx["image"]).groups())  # type: ignore[union-attr]
    assert (major, minor) >= (1, 27), "`resolve` in an upstream needs nginx >= 1.27.3 open source"


def test_nginx_conf_serves_the_gateway_routes():
    conf = nginx_conf()
    locations = re.findall(r"^\s*location (=\s*)?(\S+) \{", conf, flags=re.MULTILINE)
    assert ("", MEDIA_PATH) in locations  # a prefix: /twilio/media/<CallSid>
    assert any(path.startswith(MEDIA_PATH + "/") for path in routes())
    media = conf[conf.index(f"location {MEDIA_PATH} {{") :]
    media = media[: media.index("}")]
    assert seconds(re.search(r"proxy_read_timeout (\w+);", media).group(1)) >= 600  # type: ignore[union-attr]
    size = re.search(r"client_max_body_size (\d+)m;", conf).group(1)  # type: ignore[union-attr]
    assert int(size) * 1024 * 1024 >= MAX_BATCH_BODY_BYTES
    # A control POST that reached an instance is never retried on another (carried out twice).
    assert not re.search(r"^\s*proxy_next_upstream [^;]*non_idempotent", conf, flags=re.MULTILINE)


# Fly.io, Render


def test_fly_toml_checks_readiness_and_outlasts_the_drain():
    fly = tomllib.loads((ROOT / "fly.toml").read_text())
    assert fly["kill_signal"] == "SIGTERM"
    assert DRAIN_S + MARGIN_S <= fly["kill_timeout"] <= 300
    assert (ROOT / fly["build"]["dockerfile"]).exists()
    service = fly["http_service"]
    assert service["internal_port"] == int(fly["env"]["PORT"]) == DEFAULTS.port
    assert service["auto_stop_machines"] in ("off", False)  # machines carry live calls
    assert service["min_machines_running"] >= 2
    (check,) = service["checks"]
    assert check["path"] == "/readyz" and check["path"] in routes()
    assert fly["env"].keys() <= setting_names()


def test_render_yaml_wires_redis_and_outlasts_the_drain():
    services = {s["name"]: s for s in yaml.safe_load((ROOT / "render.yaml").read_text())["services"]}
    (web,) = [s for s in services.values() if s["type"] == "web"]
    assert web["buildCommand"] == "pip install -r requirements.txt"
    assert web["startCommand"].startswith("line-gateway serve --host 0.0.0.0")
    assert web["healthCheckPath"] == "/healthz" and web["healthCheckPath"] in routes()
    assert DRAIN_S + MARGIN_S <= web["maxShutdownDelaySeconds"] <= 300
    env = {e["key"]: e for e in web["envVars"]}
    assert env.keys() <= setting_names() and set(REQUIRED) <= env.keys()
    redis = env["REDIS_URL"]["fromService"]
    assert services[redis["name"]]["type"] == redis["type"] == "keyvalue"
    assert redis["property"] == "connectionString"
    assert services[redis["name"]]["maxmemoryPolicy"] == "noeviction"
    assert "ipAllowList" in services[redis["name"]]


# Kubernetes


def k8s() -> dict[str, dict[str, Any]]:
    folder = ROOT / "deploy" / "k8s"
    found = {}
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml_docs(path):
            found[doc["kind"]] = doc
    kustomization = found.pop("Kustomization")
    for resource in kustomization["resources"]:
        assert (folder / resource).exists(), resource
    assert "secret.example.yaml" not in kustomization["resources"]  # an example, never applied
    return found


def test_kubernetes_probes_grace_and_disruption_budget():
    objects = k8s()
    deployment, pod = objects["Deployment"], objects["Deployment"]["spec"]["template"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert ports == {"http": int(env["PORT"])} and int(env["PORT"]) == DEFAULTS.port
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (ready["path"], live["path"]) == ("/readyz", "/healthz")
    assert {ready["path"], live["path"]} <= routes() and ready["port"] == live["port"] == "http"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace >= int(pre_stop[1]) + DRAIN_S + MARGIN_S  # preStop counts against the grace
    _, stages = parse((ROOT / "Dockerfile").read_text())
    uid = stages[-1].last("USER").args.split(":")[0]  # type: ignore[union-attr]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert str(pod["spec"]["securityContext"]["runAsUser"]) == uid
    service = objects["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["ports"]] == ["http"]
    budget = objects["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert (
        budget.get("maxUnavailable") == 1 or budget.get("minAvailable") == deployment["spec"]["replicas"] - 1
    )
    config, secret = objects["ConfigMap"], objects["Secret"]
    refs = {next(iter(s)): next(iter(s.values()))["name"] for s in container["envFrom"]}
    assert refs == {"configMapRef": config["metadata"]["name"], "secretRef": secret["metadata"]["name"]}
    assert (config["data"].keys() | secret["stringData"].keys()) <= setting_names()
    assert set(REQUIRED) <= config["data"].keys() | secret["stringData"].keys()


def test_kubectl_kustomize_renders_the_manifests():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (no Debian package); the manifests' keys are checked above")
    done = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy" / "k8s")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(done.stdout) if doc)
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]  # the Secret is yours


# systemd


UNIT = ROOT / "deploy" / "line-gateway.service"
VENV_BIN = "/opt/line-gateway/.venv/bin/line-gateway"


def unit_settings() -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(.*)$", UNIT.read_text(), flags=re.MULTILINE))


def test_systemd_unit_runs_the_virtualenv_and_outlasts_the_drain():
    unit = unit_settings()
    assert unit["ExecStart"].split()[:2] == [VENV_BIN, "serve"]
    venv = VENV_BIN.removesuffix("/bin/line-gateway")
    assert f"python3 -m venv {venv}" in UNIT.read_text()  # the install steps make it
    assert unit["KillSignal"] == "SIGTERM"
    assert seconds(unit["TimeoutStopSec"]) >= DRAIN_S + MARGIN_S
    state = unit["StateDirectory"]
    recordings = env_example()["RECORDINGS_DIR"]
    assert recordings.startswith(f"/var/lib/{state}/"), "recordings go under the unit's StateDirectory"
    assert f"RECORDINGS_DIR={recordings}" in UNIT.read_text()
    assert unit["EnvironmentFile"] == "/etc/line-gateway.env"


def test_systemd_analyze_verifies_the_unit(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip(
            "systemd-analyze is not installed (Debian's systemd package; scripts/test.sh installs it)"
        )
    # verify checks that ExecStart exists: point it at a stand-in, everything else as shipped.
    stand_in = tmp_path / "line-gateway"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "line-gateway.service"
    unit.write_text(UNIT.read_text().replace(f"ExecStart={VENV_BIN}", f"ExecStart={stand_in}"))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
