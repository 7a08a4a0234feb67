"""The package's walls, read from the source: kernels import no format, and no module imports
(directly or through others, at top level or inside a function) a module that imports it back."""

import ast
from pathlib import Path

import memfit

ROOT = Path(memfit.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """memfit modules a file imports (any depth in the file), resolved to existing modules."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("memfit")}


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        # an import of a package's member counts as the member's module when it is one
        graph[mod] = {m for m in _imports(path) if m in files and m != mod}
    return graph


def test_kernels_import_no_format():
    graph = _graph()
    for path in (ROOT / "kernels").rglob("*.py"):
        bad = {m for m in graph[_module(path)]
               if not (m.startswith("memfit.kernels") or m == "memfit.errors")}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def _cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = _graph()
    # a package's __init__ re-exporting its members is not a cycle with them
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
