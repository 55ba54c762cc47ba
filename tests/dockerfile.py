"""Read a Dockerfile and .dockerignore as Docker does, and run a build stage without Docker.

No Docker engine runs on the test machine, so `StageRunner` plays a stage's build steps on the
host: ARG and ENV become the environment, COPY copies from the build context (after checking
that .dockerignore lets each source in), WORKDIR and RUN run in a scratch directory, with each
absolute container path the stage writes to (/opt, /src, ...) mapped to a directory under
`root`. The base image's `python` is the interpreter the tests run on, outside any virtualenv;
the machine's own network settings (proxies, CA bundles, pip's config) stay in the environment.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The outer virtualenv and Python's own search paths stay out of the stage's environment.
_NOT_PASSED = frozenset({"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE"})


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # as written, continuation lines joined
    flags: dict[str, str] = field(default_factory=dict)  # --from=build, --interval=10s, ...


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comments (and parser directives) never continue an instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current.strip():
        lines.append(current)
    return [line for line in lines if line.strip()]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        flags: dict[str, str] = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            base = expand(parts[0], global_args)
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(base, name, []))
        elif not stages and keyword == "ARG":
            key, _, default = rest.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, rest, flags))
    return global_args, stages


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), text)


def env_pairs(args: str) -> dict[str, str]:
    """ENV's `KEY=value KEY2="v 2"` form."""
    return dict(item.split("=", 1) for item in shlex.split(args))


def exec_form(args: str) -> list[str]:
    """CMD / ENTRYPOINT in JSON (exec) form."""
    import json

    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


# .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out += "/?"
                i += 1
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


class DockerIgnore:
    """Docker's rules: patterns in order, the last match wins, `!` lets a path back in, and a
    pattern that matches a directory matches everything under it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keep = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((keep, _pattern_regex(pattern)))

    def excluded(self, path: str) -> bool:
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for keep, regex in self.rules:
            if any(regex.fullmatch(p) for p in prefixes):
                excluded = not keep
        return excluded


# Running a stage


class StageRunner:
    """Plays one build stage on the host. `root` holds the mapped container paths."""

    def __init__(self, context: Path, root: Path, ignore: DockerIgnore, global_args: dict[str, str]) -> None:
        self.context = context
        self.root = root
        self.ignore = ignore
        self.bin = root / "base-image-bin"  # the base image's python
        self.bin.mkdir(parents=True)
        base_python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        for name in ("python", "python3"):
            (self.bin / name).write_text(f'#!/bin/sh\nexec {shlex.quote(base_python)} "$@"\n')
            (self.bin / name).chmod(0o755)
        outer_venv = os.environ.get("VIRTUAL_ENV", "")
        path = [d for d in os.environ.get("PATH", "").split(":") if d and not _under(d, outer_venv)]
        self.env = {k: v for k, v in os.environ.items() if k not in _NOT_PASSED}
        self.env["PATH"] = ":".join([str(self.bin), *path])
        self.env.update(global_args)
        self.workdir = "/"
        self.log: list[str] = []

    def host(self, container_path: str) -> Path:
        """Where a container path lives on the host."""
        path = Path(self.workdir, container_path)  # an absolute container_path replaces workdir
        return self.root / "fs" / str(path).lstrip("/")

    def map_paths(self, text: str) -> str:
        """Container paths in a command or value, mapped onto the host (only those the stage
        created: /src, /opt/...; never /usr or /tmp)."""
        fs = self.root / "fs"
        tops = sorted((p.name for p in fs.iterdir()), key=len, reverse=True) if fs.exists() else []
        for top in tops:
            text = re.sub(rf"(?<![\w./]){re.escape('/' + top)}(?=/|\b)", str(fs / top), text)
        return text

    def copy(self, instruction: Instruction) -> None:
        *sources, dest = shlex.split(instruction.args)
        target = self.host(dest)
        for source in sources:
            if self.ignore.excluded(source):
                raise AssertionError(f"COPY {source}: .dockerignore leaves it out of the build context")
            origin = self.context / source
            if not origin.exists():
                raise AssertionError(f"COPY {source}: no such file in the build context")
            if origin.is_dir():  # Docker copies a directory's contents, never the directory
                shutil.copytree(origin, target, ignore=self._ignored, dirs_exist_ok=True)
            elif dest.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)

    def _ignored(self, directory: str, names: list[str]) -> list[str]:
        base = Path(directory).relative_to(self.context)
        return [n for n in names if self.ignore.excluded(str(base / n))]

    def run(self, stage: Stage, *, skip_env: frozenset[str] = frozenset()) -> None:
        for ins in stage.instructions:
            if ins.keyword == "ARG":
                key, _, default = ins.args.partition("=")
                self.env.setdefault(key, default)
            elif ins.keyword == "ENV":
                for key, value in env_pairs(expand(ins.args, self.env)).items():
                    if key not in skip_env:
                        self.env[key] = self.map_paths(value) if key == "PATH" else value
            elif ins.keyword == "WORKDIR":
                self.workdir = ins.args
                self.host(ins.args).mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY":
                assert "from" not in ins.flags, "run_stage plays stages that copy from the context only"
                self.copy(ins)
            elif ins.keyword == "RUN":
                self._run(ins.args)

    def _run(self, command: str) -> None:
        # The paths the command names may not exist yet (`python -m venv /opt/...`): map every
        # absolute path under a top-level directory the Dockerfile owns.
        for top in re.findall(r"(?<![\w./])/(opt|src|app|srv)(?=/|\b)", command):
            (self.root / "fs" / top).mkdir(parents=True, exist_ok=True)
        mapped = self.map_paths(command)
        self.env["PATH"] = self.map_paths(self.env["PATH"])
        self.log.append(mapped)
        done = subprocess.run(
            ["/bin/sh", "-c", mapped],
            cwd=self.host(self.workdir),
            env=self.env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"RUN {command}\n(as {mapped})\nexit {done.returncode}\n{done.stderr[-3000:]}"
            )


def _under(directory: str, prefix: str) -> bool:
    return bool(prefix) and (directory == prefix or directory.startswith(prefix.rstrip("/") + "/"))
