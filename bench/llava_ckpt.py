"""The random bf16 LLaVA-1.5 checkpoints of bench/ttft.py (7B, tiny, the 7B's interfaces), built
once and reused by their marker file."""

from __future__ import annotations

import gc
import json
import tempfile
from pathlib import Path

import torch
from common import reuse_or_clear, save_random_llava, scratch_dir

SHAPES: dict[str, dict[str, int]] = {
    # llava-hf/llava-1.5-7b-hf without its vocabulary: CLIP ViT-L/14-336 + Llama-2-7B
    "llava7b": dict(vision_hidden=1024, vision_layers=24, vision_heads=16,
                    vision_intermediate=4096, image=336, patch=14, projection_dim=768,
                    hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008),
    "tiny": dict(vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64,
                 image=56, patch=14, projection_dim=32, hidden=64, layers=2, heads=4, kv_heads=2,
                 intermediate=128),
    # The 7B's interfaces (336x336 image, 576 rows of 4096: a 4.7 MB bf16 embedding, 632-token
    # prompt) on one thin layer per tower: CPU time for what a GPU run's timeline calls media,
    # decode, hop, prepare and output, without 7B compute.
    "interfaces": dict(vision_hidden=64, vision_layers=1, vision_heads=2, vision_intermediate=128,
                       image=336, patch=14, projection_dim=64, hidden=4096, layers=1, heads=32,
                       kv_heads=32, intermediate=256),
}
MARKER = "MMSERVE_BENCH_LLAVA.json"


def build_checkpoint(out_dir: str | Path, shape: str, device: torch.device, std: float = 0.02,
                     seed: int = 0) -> Path:
    """A random bf16 LlavaForConditionalGeneration of `shape` with tokenizer, ChatML template and
    CLIP processor, loadable by every role; reused when `out_dir` holds one of the same spec."""
    import transformers

    from frontend.random_model import CHATML_MM_TEMPLATE, IMAGE_TOKEN, build_tokenizer

    out, s = Path(out_dir), SHAPES[shape]
    spec = dict(s, std=std, seed=seed)
    if reuse_or_clear(out, MARKER, spec):
        return out
    build_tokenizer(out, chat_template=CHATML_MM_TEMPLATE)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    vision = transformers.CLIPVisionConfig(
        hidden_size=s["vision_hidden"], intermediate_size=s["vision_intermediate"],
        num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
        image_size=s["image"], patch_size=s["patch"], projection_dim=s["projection_dim"],
        hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        projector_hidden_act="gelu", tie_word_embeddings=False)
    save_random_llava(config, out, device, std, seed, eos_token_id=tok.eos_token_id)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()  # the server's engine sizes its KV cache from free memory
    mean, std_ = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    side = s["image"]
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, resample=3,
        image_mean=mean, image_std=std_, do_convert_rgb=True)
    transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=s["patch"],
        vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
        chat_template=CHATML_MM_TEMPLATE, num_additional_image_tokens=1).save_pretrained(out)
    (out / "MMSERVE_RANDOM_WEIGHTS").write_text("Random weights: for speed runs only.\n")
    (out / MARKER).write_text(json.dumps(spec))
    return out


def default_ckpt_dir(shape: str) -> Path:
    if shape != "llava7b":
        return Path(tempfile.gettempdir()) / f"mmserve_llava_{shape}"
    return scratch_dir("mmserve_llava7b", 20 << 30)  # 14 GB
