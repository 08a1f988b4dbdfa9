"""Llama-family decoders: Llama, Mistral and Qwen2 (= Llama + qkv bias).

One forward runs a whole varlen step (chunked prefills and decodes packed as [num_tokens]) over
the paged KV cache; parameter names follow HF so checkpoints load with only q/k/v and gate/up
stacked.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from llm_worker.attention import AttentionBackend, AttentionMetadata, TorchAttentionBackend
from llm_worker.layers.activation import get_act_and_mul
from llm_worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llm_worker.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)
from llm_worker.layers.norm import RMSNorm
from llm_worker.layers.rope import RotaryEmbedding
from llm_worker.weights import TensorSlice, materialize

# HF projection -> (our stacked parameter, shard id): one matmul instead of three (or two).
_STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_SHARDS = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": (0, 1)}
# Multimodal checkpoints wrap the LM; these map its weights back to the plain-LM names.
_LM_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
# Weights of other roles (towers, projectors) that live in the same checkpoint.
_FOREIGN = ("vision_tower.", "multi_modal_projector.", "visual.", "audio_tower.", "image_newline")


class LlamaAttention(nn.Module):
    def __init__(self, cfg, head_dim: int, attn_backend, tp, bias):
        super().__init__()
        tp_rank, tp_size = tp
        qkv_bias, o_bias = bias
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
            bias=qkv_bias, tp_rank=tp_rank, tp_size=tp_size,
        )  # fmt: skip
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * head_dim, cfg.hidden_size,
            bias=o_bias, tp_rank=tp_rank, tp_size=tp_size,
        )  # fmt: skip
        self.attn_backend = attn_backend
        self.scale = head_dim**-0.5

    def forward(self, rope, norm, hidden, kv_cache, meta) -> torch.Tensor:
        """hidden + attention(norm(hidden)), [T, hidden]. ``rope``: this step's
        `RotaryEmbedding.step`, built once for all layers and applied by the attention backend;
        ``norm`` runs inside the qkv projection, the residual add inside o_proj."""
        q, k, v = self.qkv_proj.split(self.qkv_proj.forward_normed(norm, hidden))
        # The backend rotates q and k as it writes K/V: one kernel for RoPE and the write.
        out = self.attn_backend.forward(q, k, v, kv_cache, meta, self.scale, rope)  # [T, Hq, D]
        return self.o_proj(out.flatten(1), residual=hidden)


class LlamaMLP(nn.Module):
    def __init__(self, cfg, tp, bias: bool):
        super().__init__()
        tp_rank, tp_size = tp
        i = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [i, i], bias=bias, tp_rank=tp_rank, tp_size=tp_size
        )
        self.down_proj = RowParallelLinear(
            i, cfg.hidden_size, bias=bias, tp_rank=tp_rank, tp_size=tp_size
        )
        get_act_and_mul(cfg.hidden_act)  # refuses what is not SiLU, the one the down proj fuses

    def forward(self, norm, hidden) -> torch.Tensor:
        """hidden + mlp(norm(hidden)), [T, hidden]: the norm runs inside gate_up, SiLU-and-mul
        and the residual add inside down."""
        gate_up = self.gate_up_proj.forward_normed(norm, hidden)
        return self.down_proj.forward_gated(gate_up, residual=hidden)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, head_dim, attn_backend, tp, attn_bias, mlp_bias):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, head_dim, attn_backend, tp, attn_bias)
        self.mlp = LlamaMLP(cfg, tp, mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope, hidden, kv_cache, meta) -> torch.Tensor:
        # `hidden` is the residual stream itself. Each norm runs inside the projection after
        # it and each residual add inside the one before it: for decode, per layer, four GEMVs,
        # the RoPE + KV write and the attention, and nothing else.
        hidden = self.self_attn(rope, self.input_layernorm, hidden, kv_cache, meta)
        return self.mlp(self.post_attention_layernorm, hidden)


class LlamaModel(nn.Module):
    def __init__(self, cfg, head_dim, max_position, attn_backend, tp, attn_bias, mlp_bias):
        super().__init__()
        tp_rank, tp_size = tp
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, tp_rank=tp_rank, tp_size=tp_size
        )
        # One cos/sin cache for all layers; each step's table is built once (`step`).
        self.rotary_emb = RotaryEmbedding(cfg, head_dim, max_position)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, head_dim, attn_backend, tp, attn_bias, mlp_bias)
            for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, hidden, kv_caches, meta) -> torch.Tensor:
        rope = self.rotary_emb.step(positions)  # once per step (M-RoPE gathers its table here)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(rope, hidden, kv_cache, meta)
        return self.norm(hidden)


class LlamaForCausalLM(nn.Module):
    """Llama decoder over the paged KV cache, TP-sharded; also the base of Mistral and Qwen2."""

    def __init__(
        self,
        hf_config,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        attn_backend: AttentionBackend | None = None,
        max_model_len: int | None = None,
    ):
        super().__init__()
        cfg = hf_config
        max_model_len = max_model_len or cfg.max_position_embeddings
        _check_sliding_window(cfg, max_model_len)
        self.hidden_size, self.vocab_size = cfg.hidden_size, cfg.vocab_size
        self.num_layers = cfg.num_hidden_layers
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        attn_backend = attn_backend or TorchAttentionBackend()
        max_position = max(max_model_len, cfg.max_position_embeddings)
        self.model = LlamaModel(
            cfg, self.head_dim, max_position, attn_backend, (tp_rank, tp_size),
            self._attention_bias(cfg), bool(getattr(cfg, "mlp_bias", False)),
        )  # fmt: skip
        self.num_kv_heads = self.model.layers[0].self_attn.qkv_proj.num_kv_heads  # per rank
        self.lm_head = ParallelLMHead(
            cfg.vocab_size, cfg.hidden_size, tp_rank=tp_rank, tp_size=tp_size
        )
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _attention_bias(cfg) -> tuple[bool, bool]:
        """(qkv bias, o_proj bias): Llama's `attention_bias` covers all four projections."""
        bias = bool(getattr(cfg, "attention_bias", False))
        return bias, bias

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[torch.Tensor],  # per layer [2, num_blocks, block_size, Hkv, D]
        meta: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,  # [T, hidden], e.g. with image embeds spliced
    ) -> torch.Tensor:  # [T, hidden], after the final norm
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        return self.model(positions, hidden, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        return self.lm_head.compute_logits(hidden)

    @classmethod
    def hf_to_mmserve_name(cls, name: str) -> str | None:
        """Map a checkpoint name to this model's parameter name; None = not the decoder's."""
        if name.endswith("rotary_emb.inv_freq"):
            return None  # older checkpoints saved the RoPE buffer; we rebuild it from config
        for old, new in _LM_PREFIXES:
            if name.startswith(old):
                return new + name[len(old) :]
        if name.removeprefix("model.").startswith(_FOREIGN):
            return None
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | TensorSlice]]) -> None:
        """Load HF-named tensors; raises on unknown names and on parameters left unloaded.
        A `TensorSlice` is read only where this rank's weight loader indexes it."""
        params = dict(self.named_parameters())  # tied lm_head is deduplicated away
        loaded: set[tuple[str, int | str | None]] = set()
        for hf_name, tensor in weights:
            name = self.hf_to_mmserve_name(hf_name)
            if name is None or (self.tie_word_embeddings and name == "lm_head.weight"):
                continue
            shard_id = None
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in _STACKED:
                parts[-2], shard_id = _STACKED[parts[-2]]
                name = ".".join(parts)
            param = params.get(name)
            if param is None:
                raise ValueError(f"unknown weight {hf_name!r} for {type(self).__name__}")
            loader = getattr(param, "weight_loader", None)
            with torch.no_grad():
                if loader is None:  # replicated: the whole tensor (it may come lazily, TP)
                    default_weight_loader(param, materialize(tensor))
                elif shard_id is None:
                    loader(param, tensor)
                else:
                    loader(param, tensor, shard_id)
            loaded.add((name, shard_id))
        expected = {
            (name, sid) for name in params for sid in _SHARDS.get(name.split(".")[-2], (None,))
        }
        missing = sorted(f"{n}" + ("" if s is None else f"[{s}]") for n, s in expected - loaded)
        if missing:
            raise ValueError(
                f"checkpoint is missing weights: {missing[:10]} ({len(missing)} total)"
            )


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral = Llama (its sliding window is refused when it would matter, see below)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 = Llama with a bias on q/k/v (not on o_proj)."""

    @staticmethod
    def _attention_bias(cfg) -> tuple[bool, bool]:
        return True, False


def _check_sliding_window(cfg, max_model_len: int) -> None:
    """Refuse a sliding window that would cut into the context; a wider one is plain causal."""
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None  # Qwen2 keeps the value but switches it off
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        window = None
    if window is not None and window < max_model_len:
        raise NotImplementedError(
            f"sliding_window={window} < max_model_len={max_model_len}: sliding-window attention "
            f"is not implemented; serve with max_model_len <= {window}"
        )
