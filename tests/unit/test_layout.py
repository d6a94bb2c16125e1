"""The shape of the package: no import cycle among moeray's modules, dependencies point down
(kernels know no model, the model knows no parallelism and no Ray), and no module past 600 lines.

Reads the source with `ast` (nothing is imported), so it checks every import, including the few
that stay inside functions (Ray, CLI dispatch)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "moeray"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every module named by an import statement anywhere in the file (absolute names)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {
        name: {m for m in _imports(path, name) if m in files and m != name}
        for name, path in files.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("moeray.kernels", ("moeray.platform", "moeray.actors", "ray")),
        (
            "moeray.platform.model",
            (
                "moeray.platform.parallel",
                "moeray.platform.train",
                "moeray.platform.serve",
                "moeray.platform.engine",
                "moeray.actors",
                "ray",
                "torch.distributed",
            ),
        ),
        (
            "moeray.platform.engine",
            ("moeray.platform.serve", "moeray.platform.train", "moeray.actors"),
        ),
        (
            "moeray.platform.parallel",
            ("moeray.platform.train", "moeray.platform.serve", "moeray.actors"),
        ),
    ],
)
def test_dependencies_point_down(package, forbidden):
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    wrong = sorted(
        f"{name} imports {target}"
        for name, path in files.items()
        if name == package or name.startswith(package + ".")
        for target in _imports(path, name)
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    )
    assert wrong == []


def test_modules_stay_small():
    sizes = {_module_name(p): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
