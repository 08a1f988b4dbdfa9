"""Packaging: the console script, flag checks before anything starts, and our import names staying
clear of Hugging Face's. transformers (>= 5.25 requires it) imports HF's `kernels` package by that
name, which is why ours is `mmkernels`; `python bench/kernels.py` must not shadow it either."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_transformers_hub_kernels_imports_beside_mmkernels():
    code = (
        "import mmkernels, transformers.integrations.hub_kernels, importlib.util\n"
        "assert mmkernels.__file__.endswith('mmkernels/__init__.py')\n"
        "spec = importlib.util.find_spec('kernels')\n"  # HF's if installed, never a file of ours
        "assert spec is None or '/site-packages/kernels/' in spec.origin, spec\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_bench_scripts_do_not_shadow_hf_kernels():
    """A bench script's own folder holds kernels.py; bench/common.py moves it behind site-packages."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (transformers < 5.25)")
    code = ("import sys; sys.argv = ['x']; import common, importlib.util\n"
            "origin = importlib.util.find_spec('kernels').origin\n"
            "assert '/site-packages/kernels/' in origin, origin\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO / "bench")


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "frontend.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("serve", "frontend", "llm-worker"):
        assert cmd in out


def test_serve_rejects_bad_flags_before_starting_anything(tiny_llama):
    out = subprocess.run([sys.executable, "-m", "frontend.cli", "serve", tiny_llama,
                          "--max-model-len", "999999"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "max_position_embeddings" in out.stderr
    out = subprocess.run([sys.executable, "-m", "frontend.cli", "serve", "/no/such/model"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "config.json" in out.stderr
