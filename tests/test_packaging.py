"""mmserve ships a top-level `kernels` package; Hugging Face ships one too. transformers probes
that import name (and the owning distribution's version) at import time, so ours must never
look like theirs."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_transformers_hub_kernels_imports_with_mmserve_installed():
    code = (
        "import kernels, transformers.integrations.hub_kernels\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert kernels.__file__.endswith('kernels/__init__.py')\n"
        "assert not is_kernels_available(), 'transformers mistook mmserve kernels for HF kernels'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_outside_the_range_transformers_accepts_as_hf_kernels():
    version = tuple(int(x) for x in importlib.metadata.version("mmserve").split(".")[:3])
    assert not (0, 18, 2) <= version <= (0, 19, 0)


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
