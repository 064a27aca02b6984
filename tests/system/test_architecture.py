"""The layout's rules, read from the source (docs/architecture.md): each package imports only
from the packages below it, modules import one another without a circle, and imports sit at
the top of each file except those of the optional heavy libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "xpcnn"

#: What each part of the package may import from xpcnn (besides itself).
BASE = {"errors", "fileio", "_version", "checks"}
ALLOWED = {
    "errors": set(), "fileio": set(), "_version": set(), "checks": {"errors"},
    "backend": BASE,
    "ops": BASE | {"backend"},
    "nn": BASE | {"backend", "ops"},
    "models": BASE | {"backend", "ops", "nn"},
    "data": BASE,
    "training": BASE | {"backend", "ops", "nn", "models", "data"},
    "app": BASE | {"backend", "ops", "nn", "models", "data", "training"},
}
#: The entry points above every package.
TOP = {"__init__", "cli", "__main__"}

#: Libraries a function may import where it needs them: optional, heavy, or only present with
#: a GPU (and xpcnn's CuPy fast path, which imports CuPy, and its compiled CPU kernels and the
#: pool's polling waits, which import Numba and may fail to on an unsupported platform); the web
#: server of ``xpcnn serve`` (FastAPI, Starlette, uvicorn and its HTTP/1.1 parser h11,
#: python-multipart) is the optional extra ``serve``; ONNX, ONNX Runtime and ndonnx the optional extra ``export``.
LATE_IMPORTS_ALLOWED = {"cupy", "torch", "PIL", "matplotlib", "tqdm", "array_api_strict", "array_api_compat",
                        "xpcnn.ops.fast_cupy", "xpcnn.ops.fast_numba", "xpcnn.ops.polling", "fastapi", "starlette",
                        "uvicorn", "h11", "multipart", "optuna", "onnx", "onnxruntime", "ndonnx"}


def _modules() -> dict[str, Path]:
    return {".".join(("xpcnn", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): path
            for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported xpcnn module or library, line, inside a function) for every import of `name`."""
    is_package = path.name == "__init__.py"
    parts = name.split(".")
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    anchor = parts if is_package else parts[:-1]
                    base = anchor[:len(anchor) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                    if child.module is None:      # from . import x: the submodules x
                        found.extend((f"{target}.{alias.name}", child.lineno, in_function) for alias in child.names)
                        continue
                else:
                    target = child.module or ""
                found.append((target, child.lineno, in_function))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def _part(module: str) -> str:
    """``"nn"`` for ``xpcnn.nn.layers``, ``"errors"`` for ``xpcnn.errors``."""
    return module.split(".")[1] if module.count(".") else "__init__"


def test_the_rules_see_every_module() -> None:
    modules = _modules()
    assert len(modules) >= 40, sorted(modules)
    assert {_part(m) for m in modules} - TOP == set(ALLOWED), sorted({_part(m) for m in modules})


def test_each_package_imports_only_from_the_floors_below_it() -> None:
    offenders, checked = [], 0
    for name, path in _modules().items():
        part = _part(name)
        if part in TOP:
            continue
        for target, line, _ in _imports(name, path):
            if not target.startswith("xpcnn"):
                continue
            checked += 1
            other = _part(target)
            if other != part and other not in ALLOWED[part]:
                offenders.append(f"{path.relative_to(REPO)}:{line} ({part}) imports {target} ({other})")
    assert checked > 100, f"only {checked} xpcnn imports were read"
    assert not offenders, "\n".join(offenders)


def test_no_import_circle() -> None:
    modules = _modules()
    graph = {name: {t for t, _, late in _imports(name, path) if not late and t in modules and t != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            if nxt not in state:
                walk(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [])
    assert sum(len(edges) for edges in graph.values()) > 100


def test_imports_sit_at_the_top_except_optional_heavy_libraries() -> None:
    offenders = []
    for name, path in _modules().items():
        for target, line, late in _imports(name, path):
            if late and target.split(".")[0] not in LATE_IMPORTS_ALLOWED and target not in LATE_IMPORTS_ALLOWED:
                offenders.append(f"{path.relative_to(REPO)}:{line} imports {target} inside a function")
    assert not offenders, "\n".join(offenders)


def _run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_package_root_loads_no_app_module() -> None:
    """``import xpcnn.ops`` (which runs ``xpcnn/__init__.py`` first) loads nothing of the app
    floor: no command line, report, plots, tune or serve. Checked in a fresh interpreter."""
    loaded = _run_python("import sys, xpcnn.ops; print(sorted(m for m in sys.modules if m.startswith('xpcnn.app')))")
    assert loaded == "[]", f"import xpcnn.ops loaded {loaded}"


def test_the_flat_layout_names_are_the_modules_themselves() -> None:
    """``xpcnn.checkpoint`` and ``xpcnn.report`` (xpcnn 0.1's names, shown in the docs) are the
    modules of training/ and app/ themselves, imported on first use."""
    code = ("import sys, xpcnn; before = 'xpcnn.app.report' in sys.modules\n"
            "import xpcnn.checkpoint, xpcnn.training.checkpoint\n"
            "from xpcnn.report import write_report\n"
            "import xpcnn.app.report\n"
            "print(before, xpcnn.checkpoint is xpcnn.training.checkpoint, xpcnn.report is xpcnn.app.report,\n"
            "      write_report is xpcnn.app.report.write_report, xpcnn.app.report.__spec__.name)")
    assert _run_python(code) == "False True True True xpcnn.app.report"
