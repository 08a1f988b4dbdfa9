"""Images/s of the Qwen2.5-VL-7B (or Qwen2-VL-7B) vision tower at mixed image sizes: mmserve's
`Qwen2VLEncoder.encode_packed` (every size in one packed forward) beside transformers' own tower
(`get_image_features` over the same concatenated patches and grids), same random weights, dtype
and pixels, in one process.

The checkpoint is built here: the model's real vision config (Qwen2.5-VL-7B: 32 blocks of width
1280, 16 heads, windows of 112 px with full attention in blocks 7/15/23/31, merger to 3584) over
a stub 1-layer LM, random bf16 weights (std 0.02), and the default image processor bounds. Each
timed batch is one image of every `--sizes` entry (e.g. 448x448 -> 1024 patches, 1280x720 ->
4600); preprocessing is outside the timing (it runs on the encoder's decode pool). CUDA events,
median of `--iters` after `--warmup`; max |mmserve - transformers| over the batch is printed.

    python bench/qwen_tower.py --device cuda --out bench/results/qwen_tower.json
    python bench/qwen_tower.py --tiny --device cpu --iters 1 --warmup 0     # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import env_record, measure_device, resolve_device, time_ms, write_json
from PIL import Image

SIZES = ["448x448", "640x480", "1280x720", "336x1008", "224x224"]
VISION_7B = {
    "qwen2_5_vl": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                       out_hidden_size=3584, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
    "qwen2_vl": dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16),
}
VISION_TINY = {
    "qwen2_5_vl": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                       out_hidden_size=64, window_size=56, fullatt_block_indexes=[1]),
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2),
}


def build(out: Path, arch: str, tiny: bool, device: torch.device) -> None:
    """A random checkpoint: the tower of the 7B (or tiny) shape over a stub LM."""
    import transformers

    if (out / "config.json").is_file():
        return
    vision = (VISION_TINY if tiny else VISION_7B)[arch]
    lm_hidden = vision.get("out_hidden_size", vision["hidden_size"])
    cls, cfg_cls = ((transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig)
                    if arch == "qwen2_5_vl" else
                    (transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig))
    config = cfg_cls(
        vision_config=vision,
        text_config=dict(hidden_size=lm_hidden, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=256, vocab_size=512,
                         bos_token_id=0, eos_token_id=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [lm_hidden // 32] * 2 +
                                          [lm_hidden // 8 - 2 * (lm_hidden // 32)]}),
        image_token_id=500, video_token_id=501, vision_start_token_id=502,
        vision_end_token_id=503)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(out)
    proc = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14,
            "merge_size": 2, "temporal_patch_size": 2}
    (out / "preprocessor_config.json").write_text(json.dumps(proc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", default="qwen2_5_vl", choices=sorted(VISION_7B))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--sizes", nargs="+", default=SIZES, help="WxH of each image in the batch")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--out", default="bench/results/qwen_tower.json")
    args = ap.parse_args()
    import transformers

    from encoder_worker.models.qwen2_vl import Qwen2VLEncoder

    t_start = time.perf_counter()
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ckpt = Path(args.ckpt_dir or f"/tmp/mmserve_{args.arch}{'_tiny' if args.tiny else ''}_tower")
    build(ckpt, args.arch, args.tiny, device)
    ours = Qwen2VLEncoder(str(ckpt), device, dtype)
    hf_cls = (transformers.Qwen2_5_VLForConditionalGeneration if args.arch == "qwen2_5_vl"
              else transformers.Qwen2VLForConditionalGeneration)
    hf = hf_cls.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(device).eval()

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (int(h), int(w), 3), np.uint8))
              for w, h in (s.split("x") for s in args.sizes)]
    items = [ours.preprocess(im) for im in images]
    pixels = ours.processor.pixel_values(torch.cat([it.values for it in items]).to(device))
    pixels = pixels.to(dtype)  # transformers' input: normalized pixel values
    grid = torch.tensor([it.grid_thw for it in items], device=device)

    def run_ours():
        return ours.encode_packed(items)

    def run_hf():
        feats = hf.get_image_features(pixel_values=pixels, image_grid_thw=grid)
        feats = getattr(feats, "pooler_output", feats)
        return torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats

    with torch.inference_mode():
        diff = (torch.cat(run_ours()).float() - run_hf().float()).abs().max().item()
        res = {"env": env_record(device), "args": vars(args),
               "ceilings": measure_device(device) if device.type == "cuda" else None,
               "images": [{"size": s, "grid_thw": list(it.grid_thw),
                           "patches": int(it.values.shape[0])} for s, it in zip(args.sizes, items)],
               "max_abs_diff": diff, "rows": []}
        for name, fn in (("mmserve", run_ours), ("hf-sdpa", run_hf)):
            ms = statistics.median(time_ms(fn, device, warmup=args.warmup, reps=args.iters))
            res["rows"].append({"system": name, "ms_per_batch": ms,
                                "images_per_s": len(images) / ms * 1e3})
    res["wall_s"] = time.perf_counter() - t_start
    write_json(args.out, res)
    patches = sum(r["patches"] for r in res["images"])
    print(f"{args.arch} tower, {len(images)} images ({', '.join(args.sizes)}; {patches} patches), "
          f"{dtype}, {res['env'].get('gpu') or 'cpu'}")
    base = res["rows"][1]["ms_per_batch"]
    for r in res["rows"]:
        print(f"  {r['system']:8s} {r['ms_per_batch']:9.2f} ms/batch {r['images_per_s']:8.1f} "
              f"images/s  {base / r['ms_per_batch']:.2f}x transformers")
    print(f"  max |mmserve - transformers| {diff:.3g}; wrote {args.out}")


if __name__ == "__main__":
    main()
