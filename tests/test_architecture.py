"""The shape of the package (docs/ARCHITECTURE.md): no import cycle, nothing imports the CLIs, evaluation imports
nothing of the training loop, the training run lives in okdfast/run/ with thin CLIs on top, no two modules share a
name, and every function in okdfast/ and kernels/ reads in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60  # a function longer than this is split (its signature counted, its docstring not)
CLI_MAX_LINES = 80  # okdfast/train.py and okdfast/evaluate.py only parse, call and print
LOOP = {"okdfast.train", "okdfast.run.engine", "okdfast.run.epoch", "okdfast.run.state", "okdfast.run.step"}


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


def test_nothing_imports_the_clis_and_evaluation_imports_no_training_loop():
    graph = import_graph()
    for cli in ("okdfast.train", "okdfast.evaluate"):
        assert [m for m, deps in graph.items() if cli in deps] == [], cli
    for module in ("okdfast.run.scoring", "okdfast.run.checkpoint_evaluation", "okdfast.evaluate"):
        assert not graph[module] & LOOP, (module, graph[module] & LOOP)


def test_the_training_run_is_one_room_under_thin_clis():
    top = sorted(p.stem for p in (REPO / "okdfast").glob("*.py"))
    assert top == ["__init__", "compat", "errors", "evaluate", "functional", "plot", "train"], top
    run_room = {p.stem for p in (REPO / "okdfast" / "run").glob("*.py")}
    assert {"engine", "epoch", "step", "state", "checkpoint_contents", "resume", "folder", "scoring"} <= run_room
    for cli in ("train", "evaluate"):
        lines = (REPO / "okdfast" / f"{cli}.py").read_text().splitlines()
        assert len(lines) <= CLI_MAX_LINES, f"okdfast/{cli}.py is {len(lines)} lines: the work belongs in okdfast/run/"


def name_root(stem: str) -> str:
    """A module name without its inflection: train / training, evaluate / evaluation, checkpoint / checkpointing."""
    for suffix in ("ing", "ion", "e", "s"):
        if stem.endswith(suffix) and len(stem) - len(suffix) >= 4:
            return name_root(stem[: -len(suffix)])
    return stem


def test_no_near_twin_names_in_one_room():
    """A name says which file it is: within one folder, and between the CLIs on top and the run room below them,
    no two modules are the same word inflected (train / training, evaluate / evaluation). The same role in
    different rooms may share a name (each package's ``registry.py``, ``base.py``)."""
    rooms: dict[Path, list[Path]] = {}
    for path in sorted((REPO / "okdfast").rglob("*.py")) + sorted((REPO / "kernels").glob("*.py")):
        if path.stem not in ("__init__", "__main__"):
            rooms.setdefault(path.parent, []).append(path)
    rooms[REPO / "okdfast" / "run"] = rooms[REPO / "okdfast" / "run"] + rooms[REPO / "okdfast"]
    twins = []
    for paths in rooms.values():
        seen: dict[str, Path] = {}
        for path in paths:
            root = name_root(path.stem)
            if root in seen:
                twins.append(f"{seen[root].relative_to(REPO)} ~ {path.relative_to(REPO)}")
            seen[root] = path
    assert twins == []
    assert name_root("training") == name_root("train") and name_root("evaluation") == name_root("evaluate")
    assert name_root("checkpointing") == name_root("checkpoint") != name_root("checkpoint_file")


def is_triton_kernel(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """``@triton.jit`` (alone or under ``@triton.autotune`` / ``@triton.heuristics``)."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            return True
    return False


def docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """How many lines the function's docstring takes (0 without one): the public loss functions document every
    argument and the formula, as torch.nn.functional does, and that text is not code to split."""
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno - first.lineno + 1
    return 0


def test_every_function_reads_in_one_sitting():
    """No function over MAX_FUNCTION_LINES (docstring not counted) in okdfast/ or kernels/, the host launchers of
    the kernels included.

    Exempt: the ``@triton.jit`` bodies. Each is one program whose tiles live in registers; a helper would be
    inlined into the same program anyway and would take a dozen tiles as arguments and return several, which reads
    worse than one body in commented stages. kernels/online_kd.py keeps each body's stages in the order of the
    reference (okdfast/ops/reference.py) it is tested against."""
    long = []
    for path in sorted(list((REPO / "okdfast").rglob("*.py")) + list((REPO / "kernels").rglob("*.py"))):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not is_triton_kernel(node):
                length = node.end_lineno - node.lineno + 1 - docstring_lines(node)
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert long == [], "split these functions:\n" + "\n".join(long)
