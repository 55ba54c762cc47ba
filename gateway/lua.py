"""Reading the Redis Lua scripts a package ships in the lua/ folder beside its modules."""

from __future__ import annotations

from pathlib import Path


def lua_script(module_file: str, name: str) -> str:
    """The text of `lua/<name>` beside `module_file` (read once, at import, by the caller)."""
    return (Path(module_file).parent / "lua" / name).read_text(encoding="utf-8")
