"""Parity of the mmserve decoders with transformers on tiny random checkpoints (fp32, CPU).

Each checkpoint is saved with `save_pretrained` and loaded through `llm_worker.weights`, then
run varlen over the paged cache: one-step prefill, chunked prefill + greedy decode with shuffled
block ids, and (in subprocesses) tensor parallelism over gloo.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llm_worker.attention import AttentionMetadata
from llm_worker.layers.rope import build_cos_sin_cache
from llm_worker.models import get_model_class
from llm_worker.weights import iter_safetensors, load_model

REPO = Path(__file__).resolve().parents[2]
HF = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=128,
)
PROMPTS = [[3, 17, 250, 9, 44, 101, 7, 77, 12, 5, 300, 2], [8, 1, 64, 128, 99, 31, 4, 200, 11], [6]]


# -- helpers ---------------------------------------------------------------------------------


def build_checkpoint(path: Path, arch: str, max_shard_size: str = "50GB", **overrides):
    """Save a tiny random HF model under `path`; returns (hf_model, hf_config as reloaded)."""
    config_cls, model_cls = HF[arch]
    cfg = config_cls(**{**TINY, **overrides})
    torch.manual_seed(0)
    hf = model_cls(cfg)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.15)
    hf.save_pretrained(path, max_shard_size=max_shard_size)
    return hf.eval(), AutoConfig.from_pretrained(path)


def make_meta(seq_lens, q_lens, block_tables, block_size) -> AttentionMetadata:
    """Metadata of one step: seq i's q_len new tokens are the last of its seq_len tokens."""
    slots = []
    for seq_len, q_len, table in zip(seq_lens, q_lens, block_tables, strict=True):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    qsl = [0]
    for q_len in q_lens:
        qsl.append(qsl[-1] + q_len)
    width = max(len(t) for t in block_tables)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(
            [t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32
        ),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=list(seq_lens),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
    )


class PagedSession:
    """Drives a model step by step over a paged cache whose block ids are handed out shuffled."""

    def __init__(self, model, prompts, block_size=4, num_blocks=64, seed=0):
        self.model, self.block_size = model, block_size
        self.kv_caches = [
            torch.zeros(2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
            for _ in range(model.num_layers)
        ]
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tokens = [list(p) for p in prompts]
        self.computed = [0] * len(prompts)
        self.tables: list[list[int]] = [[] for _ in prompts]

    @torch.no_grad()
    def step(self, q_lens: list[int]) -> list[torch.Tensor]:
        """Run q_lens[i] new tokens of every sequence; returns each one's logits [q_len, vocab].

        A sequence whose known tokens are all computed gets its greedy next token appended.
        """
        ids, pos, seq_lens = [], [], []
        for i, q_len in enumerate(q_lens):
            start, seq_len = self.computed[i], self.computed[i] + q_len
            while len(self.tables[i]) * self.block_size < seq_len:
                self.tables[i].append(self.free.pop())
            ids += self.tokens[i][start:seq_len]
            pos += range(start, seq_len)
            seq_lens.append(seq_len)
        meta = make_meta(seq_lens, q_lens, self.tables, self.block_size)
        hidden = self.model(torch.tensor(ids), torch.tensor(pos), self.kv_caches, meta)
        logits = self.model.compute_logits(hidden).split(q_lens)
        for i, seq_len in enumerate(seq_lens):
            self.computed[i] = seq_len
            if seq_len == len(self.tokens[i]):
                self.tokens[i].append(int(logits[i][-1].argmax()))
        return list(logits)


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:  # [len(tokens), vocab]
    with torch.no_grad():
        return hf(input_ids=torch.tensor([tokens])).logits[0].float()


def check_chunked_and_decode(hf, model, block_size=4):
    """Two-chunk prefill (one prompt already decoding in step 2), then 5 greedy decode steps."""
    sess = PagedSession(model, PROMPTS, block_size=block_size)
    schedule = [[5, 4, 1], [7, 5, 1]] + [[1, 1, 1]] * 5
    steps = [sess.step(q_lens) for q_lens in schedule]
    for i, tokens in enumerate(sess.tokens):
        assert len(tokens) == len(PROMPTS[i]) + (6 if i < 2 else 7)
        expected = hf_logits(hf, tokens)
        got = torch.cat([logits[i] for logits in steps])  # every computed position, in order
        torch.testing.assert_close(got, expected[: len(got)], atol=1e-4, rtol=1e-4)
    # Not degenerate: the sequences' last logits differ.
    assert not torch.allclose(steps[-1][0][-1], steps[-1][1][-1], atol=1e-2)


def check_one_step_prefill(hf, model):
    sess = PagedSession(model, PROMPTS, block_size=16)
    logits = sess.step([len(p) for p in PROMPTS])
    for prompt, got in zip(PROMPTS, logits, strict=True):
        torch.testing.assert_close(got, hf_logits(hf, prompt), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits[0][-1], logits[1][-1], atol=1e-2)


def load(path, cfg, **kw):
    return load_model(path, cfg, torch.float32, "cpu", **kw)


# -- parity ----------------------------------------------------------------------------------

VARIANTS = {
    "llama": ("llama", {}),
    "llama-bias-headdim": ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=32)),
    "mistral": ("mistral", dict(sliding_window=None, head_dim=8)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "llama-linear": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "llama-llama3": (
        "llama",
        dict(
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            )
        ),
    ),
    "qwen2-yarn": (
        "qwen2",
        dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)),
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_prefill_chunked_decode(tmp_path, variant):
    arch, overrides = VARIANTS[variant]
    hf, cfg = build_checkpoint(tmp_path, arch, **overrides)
    model = load(tmp_path, cfg)
    assert type(model).__name__ == type(hf).__name__
    check_one_step_prefill(hf, model)
    check_chunked_and_decode(hf, model, block_size=4)


def test_qwen2_has_qkv_bias_and_tied_head(tmp_path):
    hf, cfg = build_checkpoint(tmp_path, "qwen2", tie_word_embeddings=True)
    model = load(tmp_path, cfg)
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sharded_checkpoint_loads(tmp_path):
    hf, cfg = build_checkpoint(tmp_path, "llama", max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    check_one_step_prefill(hf, load(tmp_path, cfg))


def test_multimodal_prefixes_and_foreign_weights(tmp_path):
    """A LLaVA-style checkpoint: LM under model.language_model., plus tower weights to skip."""
    hf, cfg = build_checkpoint(tmp_path / "plain", "llama")
    weights = {}
    for name, t in iter_safetensors(tmp_path / "plain"):
        new = (
            name.replace("model.", "model.language_model.", 1)
            if name.startswith("model.")
            else name
        )
        weights[new] = t.contiguous()
    weights["model.vision_tower.encoder.layers.0.fc1.weight"] = torch.zeros(2, 2)
    weights["multi_modal_projector.linear_1.weight"] = torch.zeros(2, 2)
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    mm = tmp_path / "mm"
    mm.mkdir()
    save_file(weights, mm / "model.safetensors")
    check_one_step_prefill(hf, load(mm, cfg))


def test_unknown_and_missing_weights_raise(tmp_path):
    hf, cfg = build_checkpoint(tmp_path, "llama")
    model = load(tmp_path, cfg)
    with pytest.raises(ValueError, match="unknown weight"):
        model.load_weights([("model.layers.0.self_attn.qkv_magic.weight", torch.zeros(1))])
    partial = [(n, t) for n, t in iter_safetensors(tmp_path) if "k_proj" not in n]
    with pytest.raises(ValueError, match="missing weights"):
        model.load_weights(partial)


# -- construction errors and RoPE ------------------------------------------------------------


def test_unsupported_configs_raise():
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        get_model_class(SimpleNamespace(architectures=["GPT2LMHeadModel"]))
    cls = get_model_class(
        MistralConfig(**TINY, sliding_window=16, architectures=["MistralForCausalLM"])
    )
    with pytest.raises(NotImplementedError, match="sliding_window"):
        cls(MistralConfig(**TINY, sliding_window=16))
    cls(MistralConfig(**TINY, sliding_window=16), max_model_len=16)  # window covers the context
    dynamic = LlamaConfig(**TINY, rope_scaling=dict(rope_type="dynamic", factor=2.0))
    with pytest.raises(NotImplementedError, match="dynamic"):
        get_model_class(SimpleNamespace(architectures=["LlamaForCausalLM"]))(dynamic)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        dict(rope_type="linear", factor=3.0),
        dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=2.0,
             mscale_all_dim=1.0, beta_fast=16),
    ],
)  # fmt: skip
def test_rope_cache_matches_hf(scaling):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(**{**TINY, "max_position_embeddings": 256}, rope_scaling=scaling)
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1), torch.arange(256)[None])  # [1, 256, D]
    cache = build_cos_sin_cache(cfg, head_dim=16, max_position=256)  # [256, D]
    torch.testing.assert_close(cache[:, :8], cos[0, :, :8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[:, 8:], sin[0, :, :8], atol=1e-5, rtol=1e-5)
    # transformers 4 layout: rope_scaling dict plus a top-level rope_theta.
    legacy = SimpleNamespace(
        rope_scaling=None if scaling is None else {"type": scaling["rope_type"], **scaling},
        rope_theta=cfg.rope_parameters["rope_theta"],
        max_position_embeddings=256,
    )
    torch.testing.assert_close(build_cos_sin_cache(legacy, 16, 256), cache)


# -- tensor parallelism ----------------------------------------------------------------------

# Runs in 2 gloo processes. It imports neither transformers nor this module (imports dominate
# the run time); the helpers above are pasted in by source and the config is read as plain JSON.
_TP_WORKER = """
import json, sys, random
from types import SimpleNamespace
import torch, torch.distributed as dist
from safetensors.torch import load_file, save_file
from llm_worker.attention import AttentionMetadata
from llm_worker.weights import load_model
{helpers}
rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{{out}}/store", rank=rank, world_size=world)
for ckpt in sys.argv[4:]:
    cfg = SimpleNamespace(**json.load(open(f"{{ckpt}}/config.json")))
    model = load_model(ckpt, cfg, torch.float32, "cpu", tp_rank=rank, tp_size=world)
    sess = PagedSession(model, {prompts!r}, block_size=4)
    steps = [sess.step(q) for q in ([7, 9, 1], [5, 1, 1], [1, 1, 1])]
    flat = {{f"logits.{{i}}": torch.cat([st[i] for st in steps]) for i in range(len(steps[0]))}}
    flat.update({{f"tokens.{{i}}": torch.tensor(t) for i, t in enumerate(sess.tokens)}})
    if rank == 0:
        save_file(flat, f"{{ckpt}}/mmserve_logits.safetensors")
dist.destroy_process_group()
"""


def test_tensor_parallel_matches_hf(tmp_path):
    # Odd vocab so the vocab shards need padding; with 1 KV head it is replicated on both ranks.
    ckpts = {kv: tmp_path / f"kv{kv}" for kv in (2, 1)}
    hfs = {
        # kv=1 also carries biases: the row-parallel bias must be added once, after the reduce.
        kv: build_checkpoint(
            path,
            "llama",
            vocab_size=317,
            num_key_value_heads=kv,
            attention_bias=kv == 1,
            mlp_bias=kv == 1,
        )[0]  # fmt: skip
        for kv, path in ckpts.items()
    }
    helpers = inspect.getsource(make_meta) + inspect.getsource(PagedSession)
    script = _TP_WORKER.format(helpers=helpers, prompts=PROMPTS)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["OMP_NUM_THREADS"] = "1"
    args = [str(tmp_path), *map(str, ckpts.values())]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(rank), "2", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
    for kv, path in ckpts.items():
        got = load_file(path / "mmserve_logits.safetensors")
        for i in range(len(PROMPTS)):
            logits = got[f"logits.{i}"]  # every computed position, in order
            expected = hf_logits(hfs[kv], got[f"tokens.{i}"].tolist())
            torch.testing.assert_close(logits, expected[: len(logits)], atol=1e-4, rtol=1e-4)
