"""The package's import graph has no cycle, counting every import a module can execute.

Why: a cycle hidden inside a function or under ``if TYPE_CHECKING:`` still ties two layers together (the
lower one cannot be read, tested or moved without the upper one), and lazy imports only postpone the
``ImportError`` to the first call. So this scan counts module-level imports, imports inside functions and
methods, and ``TYPE_CHECKING`` imports alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import launcher

PACKAGE = "launcher"
ROOT = Path(launcher.__file__).resolve().parent


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its ``__init__.py``)."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([package, *parts])] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _owning_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies inside (``launcher.a.b.func`` -> ``launcher.a.b``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``module`` imports anywhere in its file.

    ``import launcher.a.b`` executes ``launcher.a`` and ``launcher.a.b``; only the deepest one is an edge here,
    because a package's ``__init__`` is charged with what it itself imports. ``from launcher.a import b`` is an
    edge to ``launcher.a.b`` when ``b`` is a submodule, otherwise to ``launcher.a``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                owner = _owning_module(alias.name, modules)
                if owner is not None:
                    found.add(owner)
        elif isinstance(node, ast.ImportFrom):
            relative = node.level > 0
            source = _resolve_relative(module, is_package, node.level, node.module) if relative else node.module or ""
            owner = _owning_module(source, modules)
            if owner is None:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else owner)
    found.discard(module)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(root, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def with_package_inits(graph: dict[str, set[str]], package: str = PACKAGE) -> dict[str, set[str]]:
    """The graph plus what Python runs before each import: importing `launcher.a.b` runs `launcher/a/__init__.py`
    first. The root package and the importer's own packages are left out (they are running already)."""
    out = {name: set(targets) for name, targets in graph.items()}
    for name, targets in graph.items():
        for target in targets:
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent != package and parent in graph and not (name == parent or name.startswith(parent + ".")):
                    out[name].add(parent)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None. Iterative DFS, deterministic order."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    for start in sorted(graph):
        if colour[start] != white:
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path = [start]
        colour[start] = grey
        while stack:
            node, pending = stack[-1]
            if not pending:
                colour[node] = black
                stack.pop()
                path.pop()
                continue
            nxt = pending.pop(0)
            if colour.get(nxt, black) == grey:
                return [*path[path.index(nxt) :], nxt]
            if colour.get(nxt) == white:
                colour[nxt] = grey
                path.append(nxt)
                stack.append((nxt, sorted(graph[nxt])))
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one, so a failure lists every knot at once."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0

    def connect(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:
        sub = {name: graph[name] & component for name in component}
        cycle = find_cycle(sub)
        assert cycle is not None
        cycles.append(cycle)
    return sorted(cycles)


# --- the scanner itself, on a throwaway package, so a green run means something ---


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_scanner_counts_function_level_type_checking_and_relative_imports(tmp_path: Path) -> None:
    root = _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "a.py": "def f():\n    from pkg import b\n",
            "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub.c import X\n",
            "sub/__init__.py": "",
            "sub/c.py": "from ..a import f\nimport os\n",
            "d.py": "import pkg.sub.c\nfrom pkg.sub import c\nfrom pkg import a as alias\n",
        },
    )
    graph = import_graph(root, "pkg")
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.sub.c", "pkg.a"}
    assert all_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]


def test_scanner_maps_from_package_import_name_to_the_package_when_name_is_not_a_module(tmp_path: Path) -> None:
    root = _write(
        tmp_path / "pkg",
        {
            "__init__.py": "from pkg.x import thing\n",
            "x.py": "thing = 1\n",
            "y.py": "from pkg import thing\n",
            "z.py": "from . import x\nfrom .x import thing\n",
        },
    )
    graph = import_graph(root, "pkg")
    assert graph["pkg"] == {"pkg.x"}
    assert graph["pkg.y"] == {"pkg"}
    assert graph["pkg.z"] == {"pkg.x"}
    assert all_cycles(graph) == []


def test_scanner_adds_the_package_inits_an_import_runs(tmp_path: Path) -> None:
    root = _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "low.py": "from pkg.sub.leaf import x\n",
            "sub/__init__.py": "from pkg.sub.mid import y\n",
            "sub/mid.py": "from pkg import low\ny = 1\n",
            "sub/leaf.py": "x = 1\n",
            "sub/other.py": "from pkg.sub.leaf import x\n",
        },
    )
    graph = import_graph(root, "pkg")
    assert all_cycles(graph) == []  # no import statement closes a loop...
    full = with_package_inits(graph, "pkg")
    assert full["pkg.low"] == {"pkg.sub.leaf", "pkg.sub"}
    assert full["pkg.sub.other"] == {"pkg.sub.leaf"}  # its own package is running already
    # ...but `import pkg.low` runs pkg/sub/__init__.py, which imports pkg.sub.mid, which imports pkg.low
    assert all_cycles(full) == [["pkg.low", "pkg.sub", "pkg.sub.mid", "pkg.low"]]


def _report(cycles: list[list[str]]) -> str:
    return f"{len(cycles)} import cycle(s) in launcher (one per knot):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_launcher_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "launcher.plan" in graph and "launcher.backends.ollama" in graph
    cycles = all_cycles(graph)
    assert not cycles, _report(cycles)


def test_launcher_has_no_import_cycle_through_a_package_init() -> None:
    cycles = all_cycles(with_package_inits(import_graph()))
    assert not cycles, _report(cycles)
