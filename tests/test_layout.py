"""The house rules of the layout, checked on the source tree.

No module over the size limit, no function of 100 lines or more, no ``_private`` name imported across
modules, no import cycle (imports inside functions count), and every import points down the floors of
``docs/layout.md``: foundation → runtime → compress → export → the chain.
"""

from __future__ import annotations

import ast
import itertools
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lowrank_core", "lowrank_deploy", "compress", "export", "runtime")
MAX_LINES = 620  # "no module grows past ~600 lines"
MAX_FUNCTION_LINES = 99  # a function a reader can hold in their head; split a longer one along its steps
FUNCTION_PACKAGES = (*PACKAGES, "benchmarks")

# The floors, lowest first (docs/layout.md). A module's floor is the one of its longest matching prefix.
# An import may point to its own floor or a lower one, never up.
FLOORS: dict[str, int] = {
    "lowrank_core": 0,  # the foundation: errors, atomic I/O, run-directory records, integrity; no torch
    "runtime": 1,  # runners, harness, reports: numpy + onnxruntime; measures any ONNX file or engine
    "compress": 2,  # plan → apply; a run directory of PyTorch weights
    "export": 3,  # reads compress's run, writes ONNX/engines, checks parity through runtime's runners
    "lowrank_deploy": 4,  # the chain and CLI (pipeline, compare, __main__): imports every stage
}
FLOOR_NAMES = {0: "foundation", 1: "runtime", 2: "compress", 3: "export", 4: "chain"}

# Upward arrows not yet turned around, each with why it is still there (none left; an entry needs a reason).
KNOWN_UPWARD: dict[tuple[str, str], str] = {}

# Imports inside functions of packages outside the project: only optional or heavy dependencies, each kept
# out of import time for the reason given (standard-library modules are not listed).
LAZY_IMPORTS: dict[str, str] = {
    "torch": "heavy; `import runtime` and the foundation never load it",
    "torchvision": "heavy; only the model zoo and data loaders need it",
    "onnx": "the runtime and the CLI parse arguments without it",
    "onnxruntime": "optional extra ([cpu] or [gpu]); the `ort` backend says which to install",
    "google": "protobuf's DecodeError, only where an ONNX file is parsed",
    "safetensors": "weights files, only when a run is written or read",
    "tensorly": "CP decomposition only",
    "torch_pruning": "the cc method's dependency graph only",
    "tensorrt": "TensorRT container or JetPack only",
    "pycuda": "TensorRT container only",
    "pynvml": "optional [gpu] extra (NVML)",
    "jtop": "Jetson only",
    "timm": "optional [timm] extra",
    "onnx2torch": "optional, ONNX → torch only",
    "modelopt": "optional TensorRT Model Optimizer",
    "matplotlib": "plots only",
    "psutil": "memory checks only; slow to import",
    "tqdm": "progress bars on a terminal only",
    "numpy": "keeps `compress.decompose`'s CP path self-contained",
}


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


def _imports(path: Path, *, in_functions: bool) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` imported by ``path``, outside ``if TYPE_CHECKING``.

    Module level only, or also inside functions (``in_functions``).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, list[str], int]] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.extend((alias.name, [], node.lineno) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((node.module, [alias.name for alias in node.names], node.lineno))
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.With, ast.For, ast.While)) or (
                in_functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            ):
                visit(node.body)

    visit(tree.body)
    return found


def _top_level_imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` imported at module level (not inside functions or ``if TYPE_CHECKING``)."""
    return [(module, names) for module, names, _ in _imports(path, in_functions=False)]


def _targets(module: str, names: list[str]) -> set[str]:
    """The project modules an import statement loads (``from pkg import submodule`` included)."""
    out = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
    if names and len(out) == len(names):  # `from package import submodule, ...`: the submodules only
        return out
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return out | ({module} if module else set())


def _graph(*, in_functions: bool) -> dict[str, dict[str, int]]:
    """Module → {imported project module: line}."""
    graph: dict[str, dict[str, int]] = {name: {} for name in MODULES}
    for name, path in MODULES.items():
        for module, names, line in _imports(path, in_functions=in_functions):
            for target in _targets(module, names):
                if target != name:
                    graph[name].setdefault(target, line)
    return graph


def _floor(module: str) -> int:
    prefix = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[prefix]


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
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
    return cycles


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
    assert _cycles(_graph(in_functions=False)) == []


def test_no_import_cycle_even_through_imports_inside_functions() -> None:
    cycles = _cycles(_graph(in_functions=True))
    assert cycles == [], "\n".join(" → ".join(cycle) for cycle in cycles)


def test_every_import_points_down_the_floors() -> None:
    upward = []
    for name, targets in _graph(in_functions=True).items():
        for target, line in targets.items():
            if _floor(target) > _floor(name) and (name, target) not in KNOWN_UPWARD:
                below, above = FLOOR_NAMES[_floor(name)], FLOOR_NAMES[_floor(target)]
                upward.append(f"{name}:{line} ({below}) imports {target} ({above})")
    assert upward == [], "\n".join(upward)


def test_known_upward_arrows_still_exist() -> None:
    graph = _graph(in_functions=True)
    gone = [pair for pair in KNOWN_UPWARD if pair[1] not in graph.get(pair[0], {})]
    assert gone == [], f"remove these from KNOWN_UPWARD: {gone}"


def test_imports_inside_functions_are_only_optional_heavy_dependencies() -> None:
    project = set(PACKAGES)
    hits = []
    for name, path in MODULES.items():
        at_import = {line for _, _, line in _imports(path, in_functions=False)}
        hits += [
            f"{name}:{line} imports {module} inside a function"
            for module, _, line in _imports(path, in_functions=True)
            if line not in at_import
            and (top := module.split(".")[0]) not in project
            and top not in sys.stdlib_module_names
            and top not in LAZY_IMPORTS
        ]
    assert hits == [], "add a reason to LAZY_IMPORTS or import it at module level:\n" + "\n".join(hits)


def test_stages_import_each_other_at_module_level_only_downward_and_only_torch_free() -> None:
    """Export may import runtime's torch-free modules at import time; runtime never imports export or compress."""
    hits = [
        f"{name} imports {module}"
        for name, path in MODULES.items()
        if name.split(".")[0] in ("export", "runtime")
        for module, _ in _top_level_imports(path)
        if module.split(".")[0] in ("export", "runtime")
        and module.split(".")[0] != name.split(".")[0]
        and (name.startswith("runtime") or module not in ("runtime.trt_engine", "runtime.base"))
    ]
    assert hits == []


def test_runtime_needs_neither_torch_nor_compress_at_import() -> None:
    hits = [
        f"{name} imports {module}"
        for name, path in MODULES.items()
        if name.split(".")[0] in ("runtime", "lowrank_core", "lowrank_deploy")
        for module, _ in _top_level_imports(path)
        if module.split(".")[0] in ("torch", "torchvision", "compress", "export")
    ]
    assert hits == []


def _long_functions() -> dict[str, int]:
    found = {}
    for package in FUNCTION_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        found[f"{path.relative_to(ROOT).as_posix()}:{node.name}"] = lines
    return found


def test_no_function_reaches_100_lines() -> None:
    offenders = [f"{name} ({n} lines)" for name, n in sorted(_long_functions().items())]
    assert offenders == [], "split along its steps: " + ", ".join(offenders)
