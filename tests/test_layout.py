"""The house rules that keep the code easy to live in: small modules, an app.py that only
wires, and no import cycles between the gateway's modules."""

import ast
from pathlib import Path

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"
MAX_MODULE_LINES = 400
MAX_APP_LINES = 150


def modules() -> dict[str, Path]:
    found = {}
    for path in GATEWAY.rglob("*.py"):
        parts = path.relative_to(GATEWAY.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def runtime_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The gateway modules `name` imports when it runs: imports inside functions count (they
    run when the function is called); those under `if TYPE_CHECKING:` do not."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for stmt in ast.walk(tree)
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)
        for node in ast.walk(stmt)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: the gateway uses absolute imports only"
            base = node.module or ""
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def test_no_module_is_over_400_lines_and_app_only_wires():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_MODULE_LINES} == {}
    assert sizes["gateway.app"] < MAX_APP_LINES


def test_no_import_cycles():
    found = modules()
    known = set(found)
    graph = {name: runtime_imports(name, path, known) for name, path in found.items()}
    # A package imports its submodules' parents implicitly; an edge to one's own package is not
    # a cycle of modules.
    for name, edges in graph.items():
        edges.difference_update({p for p in edges if name.startswith(p + ".")})
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
