"""The drivers' import rule, read from the source with ast (every import, also those inside
functions): the drivers (pipelines.lens, steer, tune, demo, serve, trace, patch and distlens.api) import none
of each other, each runs through pipelines.session, and the modules under pipelines/ (outside
pipelines/bench) import each other without a cycle; and the size rules (classes, functions)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DRIVERS = (
    "pipelines.lens", "pipelines.steer", "pipelines.tune", "pipelines.demo", "pipelines.serve", "pipelines.trace",
    "pipelines.patch", "distlens.api",
)  # fmt: skip


def _modules() -> dict[str, Path]:
    """pipelines/*.py and distlens/*.py by module name (a package's own name for __init__.py)."""
    found = {}
    for package in ("pipelines", "distlens"):
        for path in sorted((REPO / package).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in it: `import a.b`, `from a import b` (b a
    module or a name in a) and relative imports, resolved to the names in `modules`."""
    package = path.parent.name
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                base = ".".join([package, *([base] if base else [])])
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            while name and name not in modules:  # a name in a module: the module itself
                name = name.rpartition(".")[0]
            if name and name not in ("pipelines", "distlens"):  # the packages' __init__ only re-export
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_no_driver_imports_another_and_each_runs_through_the_session():
    graph = _graph()
    crossing = {driver: sorted(graph[driver] & set(DRIVERS)) for driver in DRIVERS if graph[driver] & set(DRIVERS)}
    assert not crossing, f"drivers import drivers (move what they share out of them): {crossing}"
    without = [driver for driver in DRIVERS if "pipelines.session" not in graph[driver]]
    assert not without, f"{without} do not run through pipelines.session"


def test_the_modules_under_pipelines_import_each_other_without_a_cycle():
    graph = {name: {m for m in deps if m.startswith("pipelines.")} for name, deps in _graph().items()}
    graph = {name: deps for name, deps in graph.items() if name.startswith("pipelines.")}
    assert "pipelines.config" in graph["pipelines.lens"]  # the reader finds imports at all
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == "open":
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_rooms_stay_small_enough_to_read():
    """The house's size rules, read with ast: StageWorker and Coordinator under 300 lines each,
    and no function in actors/, pipelines/ (outside pipelines/bench/) or distlens/ over 80."""
    long, classes = [], {}
    for path in sorted([*REPO.glob("actors/*.py"), *REPO.glob("pipelines/*.py"), *REPO.glob("distlens/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and lines > 80:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
            if isinstance(node, ast.ClassDef) and node.name in ("StageWorker", "Coordinator"):
                classes[node.name] = lines
    assert not long, long
    assert set(classes) == {"StageWorker", "Coordinator"} and max(classes.values()) < 300, classes
