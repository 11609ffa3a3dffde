"""The repository's import graph stays layered: no module imports another module's private (``_``-prefixed)
names, and the modules under ``common/`` import each other without cycles.

Static (ast), so it sees every import: module-level and inside functions (a lazy import that closes a cycle
is still a cycle), ``from x import _y`` and ``x._y`` on a name bound to a repository module.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from common.paths import REPO_ROOT

SCANNED = ("common", "exp_*", "scripts", "results")  # the folders whose modules are checked
SKIP_DIRS = {".venv", ".git", ".cache", "__pycache__", "outputs", "node_modules"}


@dataclass(frozen=True)
class Import:
    target: str        # the imported repository module
    names: tuple[str, ...]  # names taken from it (``from target import names``); () for ``import target``
    file: str
    line: int


def _python_files(root: Path, patterns: tuple[str, ...]) -> list[Path]:
    files = []
    for pattern in patterns:
        for top in sorted(root.glob(pattern)):
            if top.is_dir() and top.name not in SKIP_DIRS:
                files += [p for p in sorted(top.rglob("*.py")) if not SKIP_DIRS & set(p.relative_to(root).parts)]
    return files


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_repo_module(name: str, root: Path = REPO_ROOT) -> bool:
    """``name`` is a module or package of this repository (a file, a package or a namespace folder)."""
    if not name or name.split(".")[0] in SKIP_DIRS:
        return False
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base.is_dir() and any(base.glob("*.py")))


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([target] if target else []))


def repo_imports(path: Path, root: Path = REPO_ROOT) -> tuple[list[Import], dict[str, str]]:
    """Every import of a repository module in ``path`` and the local names bound to repository modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    me = module_name(path, root)
    rel = str(path.relative_to(root))
    imports: list[Import] = []
    bound: dict[str, str] = {}  # local name -> repository module it refers to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not is_repo_module(alias.name, root):
                    continue
                imports.append(Import(alias.name, (), rel, node.lineno))
                # ``import a.b.c`` binds ``a``; ``import a.b.c as m`` binds ``m`` to a.b.c
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(me, path.name == "__init__.py", node.level, node.module)
            if not is_repo_module(base, root):
                continue
            # ``from a.b import c`` runs a.b (an edge to it) and, when c is a submodule, a.b.c as well
            imports.append(Import(base, tuple(alias.name for alias in node.names), rel, node.lineno))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if alias.name != "*" and is_repo_module(sub, root):
                    imports.append(Import(sub, (), rel, node.lineno))
                    bound[alias.asname or alias.name] = sub
    return imports, bound


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _private(name: str) -> bool:
    return name.startswith("_") and not _is_dunder(name)


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for an attribute chain on a plain name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def private_uses(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """``file:line: ...`` for each private name this file takes from another repository module."""
    me = module_name(path, root)
    imports, bound = repo_imports(path, root)
    found = []
    for imp in imports:
        for name in imp.names:
            if _private(name) and imp.target != me:
                found.append(f"{imp.file}:{imp.line}: from {imp.target} import {name}")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        chain = _dotted(node.value)
        if chain is None or chain.split(".")[0] not in bound:
            continue
        head, *rest = chain.split(".")
        target = ".".join([bound[head], *rest])  # the object the private attribute is read from
        if is_repo_module(target, root) and target != me:
            found.append(f"{path.relative_to(root)}:{node.lineno}: {chain}.{node.attr} (private name of {target})")
    return found


def import_graph(root: Path = REPO_ROOT, package: str = "common") -> dict[str, dict[str, Import]]:
    """module -> {imported module of the same package -> the first import statement}, all imports counted."""
    graph: dict[str, dict[str, Import]] = {}
    for path in _python_files(root, (package,)):
        me = module_name(path, root)
        edges = graph.setdefault(me, {})
        for imp in repo_imports(path, root)[0]:
            if imp.target != me and (imp.target == package or imp.target.startswith(package + ".")):
                edges.setdefault(imp.target, imp)
    return graph


def cyclic_components(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """The strongly connected components with more than one module (each holds a cycle; Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sccs


def find_cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One cycle (a module list, first == last) per cyclic component."""
    return [_cycle_in(graph, set(comp)) for comp in cyclic_components(graph)]


def _cycle_in(graph: dict[str, dict[str, Import]], comp: set[str]) -> list[str]:
    """A simple cycle through the component's smallest module (breadth-first: the shortest one)."""
    start = min(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, {})):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w in comp and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle found in component {sorted(comp)}")


def describe_cycle(graph: dict[str, dict[str, Import]], cycle: list[str]) -> str:
    steps = [f"{a} -> {b} ({graph[a][b].file}:{graph[a][b].line})" for a, b in zip(cycle, cycle[1:])]
    return "; ".join(steps)


# ------------------------------------------------------------------------------------------------- tests
def test_no_private_names_from_other_modules():
    found = [use for path in _python_files(REPO_ROOT, SCANNED) for use in private_uses(path)]
    assert not found, "private names imported from another repository module:\n  " + "\n  ".join(found)


def test_no_import_cycles_in_common():
    graph = import_graph()
    assert "common.lowp.quantize" in graph  # the scan sees the package
    report = [f"{', '.join(comp)}: e.g. {describe_cycle(graph, _cycle_in(graph, set(comp)))}"
              for comp in cyclic_components(graph)]
    assert not report, "import cycles inside common/ (modules of each cycle, then one cycle):\n  " + "\n  ".join(report)


def test_the_checks_catch_what_they_should(tmp_path):
    """The detectors on a synthetic repository: a private import, a private attribute of an imported module,
    a lazy import closing a cycle; dunders, private names of other packages and acyclic lazy imports pass."""
    pkg = tmp_path / "common"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import torch\nfrom common.b import _hidden, __version__\n"
                              "x = torch._C\n")
    (pkg / "b.py").write_text("__version__ = '1'\n_hidden = 1\n\ndef f():\n    from common import c\n"
                              "    return c._secret\n")
    (pkg / "c.py").write_text("_secret = 2\n\ndef g():\n    import common.a as mod\n    return mod\n")
    (pkg / "d.py").write_text("from . import c\nfrom .b import __version__\n\ndef h():\n    from common import a\n")
    uses = [u for p in sorted(pkg.glob("*.py")) for u in private_uses(p, tmp_path)]
    assert uses == ["common/a.py:2: from common.b import _hidden",
                    "common/b.py:6: c._secret (private name of common.c)"], uses
    graph = import_graph(tmp_path)
    cycles = find_cycles(graph)
    assert cycles == [["common.a", "common.b", "common.c", "common.a"]], cycles
    assert describe_cycle(graph, cycles[0]) == ("common.a -> common.b (common/a.py:2); "
                                                "common.b -> common.c (common/b.py:5); "
                                                "common.c -> common.a (common/c.py:4)")
