"""Tensor-parallel setup that needs no process group: the settings a TP group is refused for
(before any worker starts), the GPU each worker is given, and sharded loading, where each rank
reads only its slices of the checkpoint's matrices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from llm_worker import weights
from llm_worker.config import LLMWorkerConfig
from llm_worker.executor.mp import _gpus_per_worker
from llm_worker.weights import iter_safetensors, load_model


def test_tp_settings(tiny_llama, tmp_path):
    cfg = LLMWorkerConfig(model=tiny_llama, tensor_parallel_size=2)
    assert cfg.resolved_executor() == "mp"
    assert LLMWorkerConfig(model=tiny_llama).resolved_executor() == "uni"
    with pytest.raises(ValueError, match="executor 'uni'"):
        LLMWorkerConfig(model=tiny_llama, tensor_parallel_size=2, executor="uni")
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible"):
        LLMWorkerConfig(model=tiny_llama, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="num_key_value_heads=3"):  # neither divides the other
        LLMWorkerConfig(model=_with_heads(tiny_llama, 12, 3, tmp_path), tensor_parallel_size=2)
    # Fewer KV heads than ranks is fine: each KV head is replicated.
    LLMWorkerConfig(model=_with_heads(tiny_llama, 4, 1, tmp_path), tensor_parallel_size=2)
    with pytest.raises(ValueError, match="device cuda:1"):
        LLMWorkerConfig(model=tiny_llama, tensor_parallel_size=2, device="cuda:1")
    with pytest.raises(ValueError, match="executor must be one of"):
        LLMWorkerConfig(model=tiny_llama, executor="threads")
    with pytest.raises(ValueError, match="ray_placement must be one of"):
        LLMWorkerConfig(model=tiny_llama, executor="ray", ray_placement="ANYWHERE")


def test_ray_executor_without_ray_is_a_clear_error(tiny_llama, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs Ray: pip install 'mmserve\[ray\]'"):
        LLMWorkerConfig(model=tiny_llama, tensor_parallel_size=2, executor="ray")


def _with_heads(model: str, heads: int, kv: int, tmp: Path) -> str:
    """A config-only copy of ``model`` with other head counts (nothing loads its weights)."""
    out = tmp / f"heads_{heads}_{kv}"
    out.mkdir(exist_ok=True)
    cfg = json.loads((Path(model) / "config.json").read_text())
    cfg.update(num_attention_heads=heads, num_key_value_heads=kv)
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def test_each_worker_sees_its_own_gpu(tiny_llama, monkeypatch):
    cfg = LLMWorkerConfig(model=tiny_llama, tensor_parallel_size=2, device="cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    assert _gpus_per_worker(cfg, 2) == ["3", "5"]  # worker i: the engine's i-th GPU, as cuda:0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ValueError, match="needs 2 GPUs, 1 visible"):
        _gpus_per_worker(cfg, 2)
    cpu = LLMWorkerConfig(model=tiny_llama, tensor_parallel_size=2, device="cpu")
    assert _gpus_per_worker(cpu, 2) == [None, None]


def test_each_rank_reads_only_its_slices(tiny_qwen2, monkeypatch):
    reads: list[int] = []  # elements read through lazy slices, per read
    real = weights.TensorSlice.__getitem__

    def counting(self, index):
        out = real(self, index)
        assert out.numel() < self.shape.numel(), "a rank read a whole matrix"
        reads.append(out.numel())
        return out

    monkeypatch.setattr(weights.TensorSlice, "__getitem__", counting)
    hf_config = transformers.AutoConfig.from_pretrained(tiny_qwen2)
    full = dict(iter_safetensors(tiny_qwen2))
    matrices = sum(t.numel() for t in full.values() if t.dim() >= 2)
    shards = []
    for rank in range(2):
        reads.clear()
        shards.append(load_model(tiny_qwen2, hf_config, torch.float32, "cpu", tp_rank=rank,
                                 tp_size=2))
        # Every matrix of this Qwen2 is split in two (vocab, heads, intermediate all even).
        assert sum(reads) == matrices // 2
    # The halves are the checkpoint's: vocab rows, q/k/v heads, down_proj's input columns.
    emb = torch.cat([m.model.embed_tokens.weight for m in shards])
    assert torch.equal(emb, full["model.embed_tokens.weight"])
    down = torch.cat([m.model.layers[0].mlp.down_proj.weight for m in shards], dim=1)
    assert torch.equal(down, full["model.layers.0.mlp.down_proj.weight"])
    qkv = [m.model.layers[1].self_attn.qkv_proj for m in shards]
    (k_at, k_rows), (_, q_rows) = qkv[0].shards["k"], qkv[0].shards["q"]
    k = torch.cat([layer.weight[k_at : k_at + k_rows] for layer in qkv])
    assert torch.equal(k, full["model.layers.1.self_attn.k_proj.weight"])
    q_bias = torch.cat([layer.bias[:q_rows] for layer in qkv])
    assert torch.equal(q_bias, full["model.layers.1.self_attn.q_proj.bias"])


def test_tp_from_the_command_line(tiny_llama):
    from frontend.cli import build_parser
    from llm_worker.config import LLMWorkerConfig
    from protocol.config_flags import args_from_config, config_from_args

    args = build_parser().parse_args(["llm-worker", "--model", tiny_llama, "--input-addr",
                                      "tcp://127.0.0.1:1", "-tp", "2", "--executor", "mp"])
    cfg = config_from_args(LLMWorkerConfig, args)
    assert (cfg.tensor_parallel_size, cfg.executor) == (2, "mp")
    # `mmserve serve` hands both to the engine process it starts.
    argv = args_from_config(cfg)
    assert argv[argv.index("--executor") + 1] == "mp"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
