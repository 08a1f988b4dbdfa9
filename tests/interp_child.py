"""Run a test file's interpreter cases in a child pytest: TRITON_INTERPRET is read once per
process, so setting it in a test would change the mode of every later test module."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def run_interpreter_cases(test_file: str, selector: str, kernels: str | None) -> None:
    """Rerun `test_file`'s tests matching `selector` with TRITON_INTERPRET=1 and
    MMSERVE_KERNELS=`kernels` (None: unset); they must all pass, none skipped."""
    # Triton 3.6's interpreter calls int() on 1-element arrays for range() over tensor bounds,
    # which numpy 2 refuses; 3.9 (this project's CPU pin) runs them. Read without importing triton.
    if tuple(int(x) for x in version("triton").split(".")[:2]) < (3, 9):
        pytest.skip(f"triton {version('triton')}'s interpreter fails range() over tensor bounds")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("MMSERVE_KERNELS", None)
    if kernels is not None:
        env["MMSERVE_KERNELS"] = kernels
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", selector,
         str(Path(test_file).resolve().relative_to(REPO))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert child.returncode == 0, child.stdout[-8000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and " skipped" not in child.stdout, child.stdout[-2000:]


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def interp_or_gpu_cases(cpu: list[tuple], gpu: list[tuple]) -> list:
    """A kernel test's parameters: its interpreter cases (device "cpu") in the child process,
    its compiled GPU cases (device "cuda", marked gpu) everywhere else."""
    if INTERPRETED:
        return [("cpu", *c) for c in cpu]
    return [pytest.param("cuda", *c, marks=pytest.mark.gpu) for c in gpu]
