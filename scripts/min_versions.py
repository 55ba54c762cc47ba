#!/usr/bin/env python3
"""The minimum-versions check: pyproject.toml's declared minimums must be versions that work.

Builds a throwaway virtualenv, installs the gateway with every dependency (the runtime ones and
the test extra's, less the linter) at exactly the lowest version pyproject.toml allows, and runs
the tests that cover the media path and `line-gateway simulate`. The `==minimum` constraints are
generated from pyproject.toml each run, so they cannot drift from it; a transitive pin the
resolver may need to go back that far goes in scripts/min_versions_pins.txt (none is needed now).
The virtualenv gets the Python that runs this script: CI's is 3.11, the one the minimums are for
(the oldest wheels, orjson 3.9's say, exist for no newer Python).

    python3 scripts/min_versions.py                     # the check (scripts/test.sh runs it)
    python3 scripts/min_versions.py --print-constraints # just the generated constraints

Needs PyPI (or a pip cache) and `packaging` (pytest's dependency). Exit status: 0 if all passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PINS = Path(__file__).resolve().parent / "min_versions_pins.txt"
# The tests that carry calls over real sockets: the WebSocket protocol (fast path or uvicorn's),
# whole calls, transfers and recordings (pydub), the Redis registry, and the protocol's fallback.
# Two groups of about equal length run side by side: they mostly wait on sockets and timers, so
# two fit on CI's 2 cores, in about 1.5 minutes rather than 2.5.
MEDIA_TESTS = (
    ("tests/test_telephony.py", "tests/test_ws_select.py"),
    ("tests/test_call.py", "tests/test_ws_protocol.py", "tests/test_registry_redis.py"),
)
NOT_INSTALLED = frozenset({"ruff"})  # the linter: not run here, and its version changes no test
PROJECT_FILES = ("pyproject.toml", "README.md", "gateway")


class MinimumError(ValueError):
    """A dependency without a usable lower bound."""


def lowest(requirement: Requirement) -> str:
    """The lowest version a requirement allows: its `>=` (or `==`) bound, which it must have."""
    for spec in requirement.specifier:
        if spec.operator in (">=", "=="):
            return spec.version
    raise MinimumError(f"{requirement}: give it a minimum (>=) that the minimum-versions check can test")


def declared(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """The runtime dependencies and the test extra, as pyproject.toml declares them."""
    project = tomllib.loads(pyproject.read_text())["project"]
    entries = [*project["dependencies"], *project.get("optional-dependencies", {}).get("test", [])]
    return [Requirement(entry) for entry in entries]


def minimum_constraints(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """pip constraint lines, `name==minimum` (with the requirement's marker), one per dependency."""
    lines = []
    for req in declared(pyproject):
        if canonicalize_name(req.name) in NOT_INSTALLED:
            continue
        marker = f"; {req.marker}" if req.marker else ""
        lines.append(f"{req.name}=={lowest(req)}{marker}")
    return lines


def _run(
    cmd: list[str], timeout_s: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> None:
    print("+", " ".join(_VERIFY_LABEL if part == _VERIFY else part for part in cmd), flush=True)
    subprocess.run(cmd, check=True, timeout=timeout_s, cwd=cwd, env=env)


def check(workdir: Path) -> None:
    constraints = workdir / "constraints.txt"
    lines = minimum_constraints()
    constraints.write_text("\n".join([*lines, PINS.read_text()]) + "\n")
    print("minimums:", ", ".join(line.split(";")[0] for line in lines), flush=True)
    src = workdir / "src"
    for name in PROJECT_FILES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    venv = workdir / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], 120)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "install", "-q", "-c", str(constraints), f"{src}[test]"], 900)
    # What pip installed must be the minimums exactly (a constraint pip ignored would hide here).
    _run([python, "-c", _VERIFY, str(constraints)], 60)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    _side_by_side(
        [[python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *g] for g in MEDIA_TESTS], workdir, env
    )
    # TMPDIR: the WAV it writes goes with the throwaway directory
    _run(
        [str(venv / "bin" / "line-gateway"), "simulate"],
        300,
        cwd=workdir,
        env={**env, "TMPDIR": str(workdir)},
    )


def _side_by_side(cmds: list[list[str]], workdir: Path, env: dict[str, str], timeout_s: float = 900) -> None:
    """Run the commands at once (in ROOT), then print their outputs one after the other."""
    runs = []
    for i, cmd in enumerate(cmds):
        print("+", " ".join(cmd), "&", flush=True)
        log = (workdir / f"pytest-{i}.log").open("w+b")
        runs.append(
            (cmd, log, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        )
    deadline = time.monotonic() + timeout_s
    failed: list[subprocess.CalledProcessError] = []
    for cmd, log, proc in runs:
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        sys.stdout.buffer.write(log.read())
        sys.stdout.flush()
        log.close()
        if proc.returncode != 0:
            failed.append(subprocess.CalledProcessError(proc.returncode, cmd))
    if failed:
        raise failed[0]


# Run inside the new virtualenv: every `name==version` constraint that applies is what is installed.
_VERIFY_LABEL = "<check the installed versions against the constraints>"
_VERIFY = """
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
wrong = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    req = Requirement(line)
    if req.marker and not req.marker.evaluate():
        continue
    if not req.specifier.contains(version(req.name), prereleases=True):
        wrong.append(f"{req.name} {version(req.name)} (constraint {req.specifier})")
print("installed the minimums exactly" if not wrong else "NOT the minimums: " + ", ".join(wrong))
sys.exit(1 if wrong else 0)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print-constraints", action="store_true", help="print them and exit")
    parser.add_argument("--keep", metavar="DIR", help="build in DIR and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.print_constraints:
        print("\n".join(minimum_constraints()))
        return 0
    started = time.monotonic()
    try:
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=False)
            check(Path(args.keep))
        else:
            with tempfile.TemporaryDirectory(prefix="line-gateway-min-versions-") as tmp:
                check(Path(tmp))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"minimum-versions check FAILED after {time.monotonic() - started:.0f} s: {exc}", flush=True)
        return 1
    print(f"minimum-versions check passed in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
