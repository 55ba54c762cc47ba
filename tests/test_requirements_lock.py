"""The dependency files agree: requirements.txt (the lock) pins every runtime dependency of
pyproject.toml within its range, and the minimum-versions check (scripts/min_versions.py) tests
exactly pyproject's minimums."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
TEST_TOOLS = {"pytest", "pytest-asyncio", "hypothesis", "httpx", "ruff"}


def runtime_dependencies(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    return [Requirement(d) for d in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]


def lock_lines(path: Path = ROOT / "requirements.txt") -> list[str]:
    return [s for line in path.read_text().splitlines() if (s := line.split("#")[0].strip())]


def pins(path: Path = ROOT / "requirements.txt") -> dict[str, Requirement]:
    out: dict[str, Requirement] = {}
    lines = lock_lines(path)
    for line in lines[:-1] if lines[-1:] == ["."] else lines:
        req = Requirement(line)
        assert canonicalize_name(req.name) not in out, f"pinned twice: {req.name}"
        out[canonicalize_name(req.name)] = req
    return out


def pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"not an exact pin: {req}"
    return spec.version


def lock_problems(pyproject: Path, lock: Path) -> list[str]:
    """What is wrong with `lock` as the lock of `pyproject`'s runtime dependencies."""
    lines = lock_lines(lock)
    problems = [] if lines and lines[-1] == "." else ["the last line is not `.` (the gateway itself)"]
    locked = pins(lock)
    for dep in runtime_dependencies(pyproject):
        pin = locked.get(canonicalize_name(dep.name))
        if pin is None:
            problems.append(f"{dep.name} is not pinned")
            continue
        version = pinned_version(pin)
        if not dep.specifier.contains(version, prereleases=True):
            problems.append(f"{dep.name}=={version} is outside pyproject's {dep.specifier}")
        if dep.marker and str(pin.marker) != str(dep.marker):
            problems.append(f"{dep.name} is pinned without pyproject's marker ({dep.marker})")
    for name in sorted(TEST_TOOLS & set(locked)):
        problems.append(f"{name} is a test tool, not a runtime dependency")
    return problems


def test_the_lock_pins_every_runtime_dependency_within_its_range() -> None:
    assert lock_problems(ROOT / "pyproject.toml", ROOT / "requirements.txt") == []


def test_the_lock_pins_what_the_extras_pull_in() -> None:
    """uvicorn[standard] brings uvloop, httptools, websockets...: pinned too, so the lock is whole."""
    locked = pins()
    for dep in runtime_dependencies():
        for extra in dep.extras:
            for entry in importlib.metadata.requires(dep.name) or []:
                req = Requirement(entry)
                if req.marker and not req.marker.evaluate({**default_environment(), "extra": extra}):
                    continue
                assert canonicalize_name(req.name) in locked, f"{dep.name}[{extra}] needs {req.name}"


def test_lock_problems_are_found(tmp_path: Path) -> None:
    """The check itself, on a lock that is wrong in every way it looks for."""
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["numpy>=1.26", "orjson>=3.10", "soxr>=0.5", '
        "\"audioop-lts>=0.2; python_version>='3.13'\"]\n"
    )
    lock = tmp_path / "requirements.txt"
    lock.write_text("numpy==1.25.2\norjson==3.10.1\naudioop-lts==0.2.2\npytest==8.3.0\n")
    assert lock_problems(pyproject, lock) == [
        "the last line is not `.` (the gateway itself)",
        "numpy==1.25.2 is outside pyproject's >=1.26",
        "soxr is not pinned",
        'audioop-lts is pinned without pyproject\'s marker (python_version >= "3.13")',
        "pytest is a test tool, not a runtime dependency",
    ]


def _min_versions() -> ModuleType:
    spec = importlib.util.spec_from_file_location("min_versions", ROOT / "scripts" / "min_versions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_minimum_versions_check_installs_exactly_pyprojects_minimums() -> None:
    min_versions = _min_versions()
    constraints = {Requirement(line).name: Requirement(line) for line in min_versions.minimum_constraints()}
    tables = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(d) for d in [*tables["dependencies"], *tables["optional-dependencies"]["test"]]]
    for dep in declared:
        if dep.name == "ruff":
            assert dep.name not in constraints  # the linter is not installed there
            continue
        (spec,) = [s for s in dep.specifier if s.operator == ">="]
        assert str(constraints[dep.name].specifier) == f"=={spec.version}"
        assert constraints[dep.name].marker == dep.marker


def test_a_dependency_without_a_minimum_is_refused() -> None:
    min_versions = _min_versions()
    with pytest.raises(min_versions.MinimumError, match="give it a minimum"):
        min_versions.lowest(Requirement("numpy<3"))
