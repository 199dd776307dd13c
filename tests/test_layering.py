"""The package's shape: imports run one way (no cycle, function-local imports included), and
files and functions stay small enough to read (the engine files are measured by their own issue)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "secateurs"
ENGINE: set[str] = set()  # every file is held to the same limits
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name of what ``from ... import`` reads from (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}, from every import statement in the file (at any
    depth: inside functions, classes and ``if TYPE_CHECKING`` too). ``from pkg import name`` is an
    edge to ``pkg.name`` when that is a module, else to ``pkg``; parent packages that Python
    initialises implicitly are not edges."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, path, node)
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            graph[module] |= {t for t in targets if t in modules and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_local_and_relative_imports():
    graph = import_graph()
    assert "secateurs.budget" in graph["secateurs.methods.base"]  # from ..budget import ...
    assert "secateurs.methods" in graph["secateurs.pipeline"]  # a package, through its __init__
    assert "secateurs.models" in graph["secateurs.saving"]
    assert "secateurs.models._factory" in graph["secateurs.models.tiny"]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_budgets_sit_below_methods_and_the_driver_on_top():
    graph = import_graph()

    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            n = todo.pop()
            if n == b:
                return True
            if n not in seen:
                seen.add(n)
                todo.extend(graph[n])
        return False

    assert not reaches("secateurs.budget", "secateurs.methods")
    assert not reaches("secateurs.methods", "secateurs.pipeline")
    assert not reaches("secateurs.criteria", "secateurs.budget")
    for engine in ("graph", "surgery", "cost"):
        assert not reaches(f"secateurs.{engine}", "secateurs.criteria")


def _measured() -> list[Path]:
    return [p for p in sorted(ROOT.rglob("*.py")) if not (p.parent == ROOT and p.name in ENGINE)]


def test_files_stay_short():
    long = {str(p.relative_to(ROOT)): n for p in _measured() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_functions_stay_short():
    long = {}
    for p in _measured():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(ROOT)}:{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_private_name_is_imported_across_modules():
    """What another module uses is public. Package-private *modules* (``from . import _ids``, timm's
    ``_builder``) are plumbing the package shares; private *names* inside a module are not."""
    found = []
    for p in _measured():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module is None and node.level:
                continue
            if isinstance(node, ast.ImportFrom) and node.module not in ("__future__",):
                found += [f"{p.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found
