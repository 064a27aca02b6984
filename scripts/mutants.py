"""Mutation testing of the modules that hold the arithmetic and the data safety (mutmut 3).

Each module is mutated on its own, in a scratch copy of the checkout under
``build/mutants/<module>/``, and each mutant is run against the tests that should kill it
(`MODULES`, below; mutmut then picks, per mutated function, the tests among those that call
it). Not part of the test suite or of ``.ci/run``: a full run takes about 35 minutes on
the 2-core machine. How to run it and how to read it: docs/mutation-testing.md.

    python scripts/mutants.py                       # every module, then the summary
    python scripts/mutants.py --module fileio       # one (or several: --module fileio --module idx)
    python scripts/mutants.py --list                # the modules, their tests and time budgets

The summary counts mutants made, killed, survived, timeout, and how many survivors are listed
as equivalent in docs/mutation-testing.md (a line ``- `<mutant name>`: <reason>``). It exits 1
when a survivor is neither killed nor listed there, or a module ran out of its time budget.
Needs mutmut (``pip install mutmut==3.8.1``); runs with the interpreter that runs this script.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutants"
DOC = ROOT / "docs" / "mutation-testing.md"


@dataclass(frozen=True)
class Module:
    path: str                 # the module mutated, relative to the checkout
    tests: tuple[str, ...]    # the test files (or node ids) that should kill its mutants
    minutes: float            # its time budget on the 2-core machine
    pytest_args: tuple[str, ...] = ()   # e.g. -k to leave out GPU-only cases

    @property
    def name(self) -> str:
        return Path(self.path).stem


#: Smallest and quickest first. Budgets: a little above what a run took on the shared 2-core
#: machine (docs/mutation-testing.md, "Results"); the whole list takes about 35 minutes.
MODULES = (
    Module("xpcnn/fileio.py", ("tests/test_fileio.py",), 2),
    Module("xpcnn/data/idx.py", ("tests/data/test_data.py",), 4),
    Module("xpcnn/nn/params.py", ("tests/nn/test_params.py", "tests/nn/test_optim.py"), 2),
    Module("xpcnn/nn/optim.py", ("tests/nn/test_optim.py",), 3),
    Module("xpcnn/ops/functions.py", ("tests/ops/test_functions_and_geometry.py", "tests/nn/test_layers.py"), 5),
    Module("xpcnn/ops/geometry.py", ("tests/ops/test_functions_and_geometry.py", "tests/ops/test_fastpaths.py"), 4),
    Module("xpcnn/ops/reference.py", ("tests/nn/test_layers.py", "tests/ops/test_fastpaths.py"), 16),
    # The per-operation comparisons (every fast entry, every geometry) and the call counts; the
    # whole-training-step tests of that file take up to a minute each and would triple the run.
    Module("xpcnn/ops/fast_numpy.py", ("tests/ops/test_fast_ops.py", "tests/backend/test_counting.py"), 7,
           ("-k", "numpy and not strict and not whole_training and not two_runs")),
    # Without the SIGKILL tests (the atomic write is fileio's, mutated there; a mutant that
    # slows a killed writer down made them wait out mutmut's timeouts) and the PyTorch
    # variants (the same code path as array_api_strict's: a backend that is not NumPy).
    Module("xpcnn/training/checkpoint.py", ("tests/training/test_checkpoint.py",), 6,
           ("-k", "not sigkill and not torch")),
)

#: What a scratch copy needs: the package, the tests, and the project file (with the
#: module's own `[tool.mutmut]` selection written into it).
COPIED = ("xpcnn", "tests")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def module_pyproject(module: Module) -> str:
    """The checkout's pyproject.toml with `[tool.mutmut]` narrowed to `module` and its tests."""
    text = (ROOT / "pyproject.toml").read_text()
    settings = dict(tomllib.loads(text)["tool"]["mutmut"])
    settings["only_mutate"] = [module.path]
    settings["pytest_add_cli_args_test_selection"] = list(module.tests + module.pytest_args)
    section = "[tool.mutmut]\n" + "".join(f"{key} = {_toml_value(value)}\n" for key, value in settings.items())
    return re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", lambda _: section + "\n", text, count=1)


def prepare(module: Module) -> Path:
    """A fresh scratch copy for `module` (mutmut works in its `mutants/` folder)."""
    work = WORK / module.name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    for name in COPIED:
        shutil.copytree(ROOT / name, work / name, ignore=ignore)
    (work / "pyproject.toml").write_text(module_pyproject(module))
    return work


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)      # mutmut puts its mutated copy first on the path itself
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def run_mutmut(module: Module, work: Path, max_children: int, minutes: float) -> tuple[bool, float]:
    """(finished within the budget, seconds). The run's output goes to `work`/mutmut.log."""
    start = time.monotonic()
    with open(work / "mutmut.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)],
                                   cwd=work, env=_environment(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=minutes * 60)
            finished = process.returncode == 0
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            finished = False
    return finished, time.monotonic() - start


def results(work: Path) -> dict[str, str]:
    """mutant name -> status (killed, survived, timeout, no tests, ...), from `mutmut results`."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work, env=_environment(),
                         capture_output=True, text=True, check=False).stdout
    found = {}
    for line in out.splitlines():
        match = re.match(r"^\s+(\S+): (.+)$", line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def listed_equivalent() -> dict[str, str]:
    """Mutant name -> reason, from the equivalent mutants listed in docs/mutation-testing.md."""
    if not DOC.exists():
        return {}
    return {m.group(1): m.group(2) for m in re.finditer(r"^- `([\w.]+__mutmut_\d+)`: (.+)$", DOC.read_text(), re.M)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", choices=[m.name for m in MODULES],
                        help="run only this module (repeatable); default: all")
    parser.add_argument("--list", action="store_true", help="list the modules, their tests and budgets")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2, help="mutants run in parallel")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every module's time budget (a slower or busier machine)")
    args = parser.parse_args(argv)
    chosen = [m for m in MODULES if not args.module or m.name in args.module]
    if args.list:
        for m in chosen:
            print(f"{m.path:32} {m.minutes:4.0f} min  {' '.join(m.tests + m.pytest_args)}")
        return 0
    try:
        import mutmut  # noqa: F401  (only to fail early with a clear message)
    except ImportError:
        print("mutmut is not installed: pip install mutmut==3.8.1", file=sys.stderr)
        return 2

    equivalent = listed_equivalent()
    rows, unexplained, over_budget = [], [], []
    for module in chosen:
        print(f"== {module.path}: mutants against {' '.join(module.tests)} "
              f"(budget {module.minutes * args.budget_scale:.0f} min)", flush=True)
        work = prepare(module)
        finished, seconds = run_mutmut(module, work, args.max_children, module.minutes * args.budget_scale)
        status = results(work)
        counts: dict[str, int] = {}
        for value in status.values():
            counts[value] = counts.get(value, 0) + 1
        survivors = sorted(k for k, v in status.items() if v == "survived")
        listed = [k for k in survivors if k in equivalent]
        unexplained += [k for k in survivors if k not in equivalent]
        if not finished:
            over_budget.append(module.path)
            print(f"   did not finish (see {work / 'mutmut.log'})")
        for name in survivors:
            print(f"   survived: {name}" + (f"  (equivalent: {equivalent[name]})" if name in equivalent else ""))
        rows.append((module.path, len(status), counts.get("killed", 0), len(survivors), len(listed),
                     counts.get("timeout", 0), sum(v for k, v in counts.items()
                                                  if k not in ("killed", "survived", "timeout")), seconds))

    header = ("made", "killed", "surv.", "equiv.", "timeout", "other", "time")
    print(f"\n{'module':32} " + " ".join(f"{h:>{w}}" for h, w in zip(header, (5, 6, 5, 6, 7, 5, 6))))
    for path, made, killed, survived, equiv, timeout, other, seconds in rows:
        print(f"{path:32} {made:5} {killed:6} {survived:5} {equiv:6} {timeout:7} {other:5} {seconds / 60:5.1f}m")
    if unexplained:
        print(f"\n{len(unexplained)} surviving mutants are neither killed nor listed as equivalent in {DOC.name} "
              f"(show one: cd {WORK}/<module> && {Path(sys.executable).name} -m mutmut show <name>)")
    if over_budget:
        print(f"\nout of time: {', '.join(over_budget)}")
    return 1 if unexplained or over_budget else 0


if __name__ == "__main__":
    sys.exit(main())
