"""The command line and LLM() take vLLM's flags and keywords; what mmserve can't honour, and an
architecture it doesn't serve, stop with one line and exit code 2 before any child starts (and
nothing ever waits on stdin)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from frontend import LLM
from frontend.cli import build_parser
from frontend.launcher import prepare


def _mmserve(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    # stdin is an open pipe nobody writes: a y/N prompt would hang until the timeout.
    return subprocess.run([sys.executable, "-m", "frontend.cli", *argv], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.PIPE)


@pytest.fixture(scope="module")
def remote_code_checkpoint(tmp_path_factory):
    """An architecture we don't serve whose config asks for its own code (auto_map)."""
    d = tmp_path_factory.mktemp("remote_code")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["FancyForCausalLM"], "model_type": "fancy",
        "auto_map": {"AutoConfig": "configuration_fancy.FancyConfig",
                     "AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"}}))
    (d / "modeling_fancy.py").write_text("raise SystemExit('remote code ran')\n")
    return str(d)


@pytest.mark.parametrize("role", ["serve", "llm-worker", "frontend", "encoder"])
def test_unsupported_architecture_is_one_line_and_exit_2(remote_code_checkpoint, role):
    model = remote_code_checkpoint
    argv = {"serve": ["serve", model],
            "llm-worker": ["llm-worker", "--model", model, "--input-addr", "tcp://127.0.0.1:1"],
            "frontend": ["frontend", "--model", model, "--engine-addr", "tcp://127.0.0.1:1"],
            "encoder": ["encoder", "--model", model, "--input-addr", "tcp://127.0.0.1:1"]}[role]
    start = time.monotonic()
    out = _mmserve(*argv)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "FancyForCausalLM" in errors[0], out.stderr
    assert "Traceback" not in out.stderr and "remote code ran" not in out.stderr
    assert time.monotonic() - start < 30


def test_serve_checks_the_architecture_before_starting_children(remote_code_checkpoint):
    args = build_parser().parse_args(["serve", remote_code_checkpoint])
    with pytest.raises(ValueError, match="unsupported architecture"):
        prepare(args)  # raises before serve() could start a process


def test_vllm_flags_are_accepted(tiny_llava):
    args = build_parser().parse_args([
        "serve", tiny_llava, "--trust-remote-code", "--runner", "generate", "--enforce-eager",
        "-tp", "1", "--gpu-memory-utilization", "0.5", "--enable-prefix-caching",
        "--chat-template-content-format", "openai", "--trust-request-chat-template",
        "--disable-log-requests", "--disable-log-stats", "--swap-space", "0"])
    assert callable(prepare(args))
    assert args.enforce_eager and args.trust_request_chat_template and args.enable_prefix_caching
    for off in ("--no-enable-prefix-caching", "--no-prefix-caching"):
        args = build_parser().parse_args(["serve", tiny_llava, off])
        assert not args.enable_prefix_caching


@pytest.mark.parametrize("flags, words", [
    (["--runner", "pooling"], "runner"),
    (["-tp", "3"], "tensor_parallel_size"),  # 4 heads do not split in 3
    (["--quantization", "awq"], "quantization"),
    (["--revision", "main"], "revision"),
    (["--kv-cache-dtype", "fp8"], "kv_cache_dtype"),
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization"),
    (["--chat-template-content-format", "xml"], "invalid choice"),
])
def test_unsupported_vllm_values_are_clear_errors(tiny_llama, flags, words):
    out = _mmserve("serve", tiny_llama, *flags)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr


def test_llm_takes_vllm_keywords(tiny_llama):
    llm = LLM(tiny_llama, trust_remote_code=True, gpu_memory_utilization=0.5,
              enforce_eager=True, tensor_parallel_size=1, runner="generate", swap_space=0,
              disable_log_stats=True, max_model_len=64, num_kv_blocks=16,
              chat_template_content_format="string")
    assert llm.generate("Hello", use_tqdm=False)[0].outputs[0].token_ids
    for kwargs, words in [({"tensor_parallel_size": 3}, "tensor_parallel_size"),
                          ({"quantization": "awq"}, "quantization"),
                          ({"runner": "pooling"}, "runner"),
                          ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
                          ({"chat_template_content_format": "xml"}, "content_format")]:
        with pytest.raises(ValueError, match=words):
            LLM(tiny_llama, max_model_len=64, num_kv_blocks=16, **kwargs)


def test_llm_refuses_an_unsupported_architecture(remote_code_checkpoint):
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLM(remote_code_checkpoint)
