"""The house rules of the layout, checked on the source tree (issue 14).

No module over the size limit, no ``_private`` name imported across modules, no import cycle between
modules at import time, and the stage packages import each other only lazily (inside functions).
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lowrank_deploy", "compress", "export", "runtime")
MAX_LINES = 620  # "no module grows past ~600 lines"


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _top_level_imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` imported at module level (not inside functions or ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, list[str]]] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.extend((alias.name, []) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((node.module, [alias.name for alias in node.names]))
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(tree.body)
    return found


def test_tree_is_not_empty() -> None:
    assert len(MODULES) > 40


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_the_size_limit(name: str) -> None:
    lines = MODULES[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it along its seams"


def test_no_private_name_is_imported_across_modules() -> None:
    offenders = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                offenders += [
                    f"{name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")
                ]
    assert offenders == []


def test_no_import_cycle_at_module_level() -> None:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, names in _top_level_imports(path):
            targets = [module] + [f"{module}.{n}" for n in names]
            graph[name] |= {t for t in targets if t in MODULES and t != name}
    # A package's __init__ importing its own submodules is how packages re-export: not a cycle by itself.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in itertools.pairwise(cycle)):
                    cycles.append(cycle)
            elif nxt not in state:
                dfs(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [])
    assert cycles == []


@pytest.mark.parametrize(("package", "forbidden"), [("runtime", "export"), ("export", "runtime")])
def test_export_and_runtime_do_not_import_each_other_at_module_level(package: str, forbidden: str) -> None:
    hits = [
        f"{name} imports {module}"
        for name, path in MODULES.items()
        if name.split(".")[0] == package
        for module, _ in _top_level_imports(path)
        if module.split(".")[0] == forbidden
    ]
    assert hits == []


def test_runtime_needs_neither_torch_nor_compress_at_import() -> None:
    hits = [
        f"{name} imports {module}"
        for name, path in MODULES.items()
        if name.split(".")[0] in ("runtime", "lowrank_deploy")
        for module, _ in _top_level_imports(path)
        if module.split(".")[0] in ("torch", "torchvision", "compress", "export")
    ]
    assert hits == []
