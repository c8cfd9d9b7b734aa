"""The shape of the package (docs/ARCHITECTURE.md): no import cycle, nothing imports the CLI, evaluation imports
nothing of the training loop, and the run's rooms stay readable (short functions, a short train.py)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_ROOMS = ["train", "epoch", "training", "assemble", "run_folder", "resume", "checkpointing", "step"]


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO)
    parts = list(relative.with_suffix("").parts)
    if parts[0] == "kernels":
        parts[0] = "okdfast.kernels"
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the okdfast modules it imports (anywhere in it, also inside functions)."""
    files = list((REPO / "okdfast").rglob("*.py")) + list((REPO / "kernels").rglob("*.py"))
    graph: dict[str, set[str]] = {}
    for path in files:
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("okdfast"):
                deps.add(node.module)
                deps.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names if alias.name.startswith("okdfast"))
        graph[module_name(path)] = deps
    return {name: {d for d in deps if d in graph and d != name} for name, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_anywhere_in_the_package():
    assert cycles(import_graph()) == []


def test_nothing_imports_the_cli_and_evaluation_imports_no_training_loop():
    graph = import_graph()
    assert [m for m, deps in graph.items() if "okdfast.train" in deps] == []
    loop = {"okdfast.train", "okdfast.epoch", "okdfast.training"}
    for module in ("okdfast.evaluation", "okdfast.evaluate"):
        assert not graph[module] & loop, (module, graph[module] & loop)


def test_the_run_reads_in_one_sitting():
    train = (REPO / "okdfast" / "train.py").read_text()
    assert len(train.splitlines()) <= 260
    for room in RUN_ROOMS:
        tree = ast.parse((REPO / "okdfast" / f"{room}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 65, f"okdfast/{room}.py: {node.name} is {length} lines"
