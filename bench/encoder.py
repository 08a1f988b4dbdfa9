"""Vision tower throughput at the LLaVA-1.5-7B shape: mmserve's encoder slice beside
transformers' own tower, same random weights, same dtype, same pixels.

The checkpoint is a LlavaForConditionalGeneration with the CLIP ViT-L/14-336 tower (hidden 1024,
24 layers, 16 heads, MLP 4096, 577 tokens) and the MLP projector to the 4096-wide LM, plus a
1-layer, 16-wide language model so it stays ~0.6 GB. Rows, per batch size (images/s = batch /
median ms per batch, pixels preprocessed, CUDA events after warm-up):

  mmserve-tower   LlavaEncoder.encode on pixels already on the device: the tower up to the
                  feature layer (-2: 23 layers) + projector, SDPA, inference_mode
  mmserve-graphs  the same through the server's CUDA graphs (batches 1, 2, 4, 8 replay one;
                  larger ones run eagerly; CUDA only)
  mmserve-step    what the encoder server runs per batch: PixelUploader (stack into pinned
                  memory, async upload) -> encode (graphs where the server uses them) ->
                  HostCopier (owned CPU tensors)
  hf-sdpa         LlavaForConditionalGeneration.get_image_features, pixels on the device,
  hf-eager        attn_implementation "sdpa" / "eager" (all 24 layers + every hidden state)

TFLOP/s counts the matmul FLOPs LLaVA needs per image (patch embedding, the layers up to the
feature layer, attention QK^T and PV, projector) for every row, so the TFLOP/s ratio of two rows
is their images/s ratio; transformers' extra layer is work it does, not work credited to it.
On CUDA the upload and download paths are also timed alone (pageable vs pinned), and JPEG
decode + preprocess once on one CPU thread (the server runs that on its decode pool, beside the
tower).

    python bench/encoder.py --device cuda --out bench/results/encoder.json
    python bench/encoder.py --tiny --device cpu --batch 1 2 --iters 2   # smoke
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import (
    env_record,
    measure_device,
    resolve_device,
    reuse_or_clear,
    save_random_llava,
    time_ms,
    write_json,
)

from encoder_worker.graphs import TowerGraphs
from encoder_worker.models.llava import LlavaEncoder
from encoder_worker.transfer import HostCopier, PixelUploader

SHAPES: dict[str, dict[str, int]] = {  # CLIP ViT-L/14-336 as in llava-hf/llava-1.5-7b-hf
    "llava15": dict(hidden=1024, layers=24, heads=16, intermediate=4096, image=336, patch=14,
                    text_hidden=4096),
    "tiny": dict(hidden=64, layers=3, heads=4, intermediate=128, image=56, patch=14,
                 text_hidden=128),
}
MARKER = "MMSERVE_BENCH_ENCODER.json"
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SYSTEMS = ("mmserve-tower", "mmserve-graphs", "mmserve-step", "hf-sdpa", "hf-eager")


def build_checkpoint(out_dir: str | Path, shape: str, device: torch.device, std: float = 0.02,
                     seed: int = 0) -> Path:
    """A random bf16 LLaVA-1.5 checkpoint whose LM is a stub; reused if `out_dir` has one."""
    import transformers

    out, s = Path(out_dir), SHAPES[shape]
    spec = dict(s, std=std, seed=seed)
    if reuse_or_clear(out, MARKER, spec):
        return out
    vision = transformers.CLIPVisionConfig(
        hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], image_size=s["image"],
        patch_size=s["patch"], projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    # Only its width matters (the projector's output); the decoder never runs here.
    text = transformers.LlamaConfig(vocab_size=32, hidden_size=s["text_hidden"],
                                    intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=1, num_key_value_heads=1, head_dim=16)
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=31,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        projector_hidden_act="gelu", tie_word_embeddings=False)
    save_random_llava(config, out, device, std, seed)
    side = {"height": s["image"], "width": s["image"]}
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True,
        "size": {"shortest_edge": s["image"]}, "resample": 3, "do_center_crop": True,
        "crop_size": side, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True}, indent=2))
    (out / MARKER).write_text(json.dumps(spec))
    (out / "MMSERVE_RANDOM_WEIGHTS").write_text("Random weights: for speed runs only.\n")
    return out


def flops_per_image(cfg: dict, num_layers: int, num_tokens: int) -> float:
    """Matmul FLOPs of one image: patch embedding, `num_layers` encoder layers over all
    1 + patches tokens (linears + QK^T + PV), projector over the `num_tokens` kept rows."""
    v, h_text = cfg["vision_config"], cfg["text_config"]["hidden_size"]
    h, i, patch = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    patches = (v["image_size"] // patch) ** 2
    t = patches + 1
    layer = 2 * t * (4 * h * h + 2 * h * i) + 4 * t * t * h
    return (2 * patches * 3 * patch * patch * h + num_layers * layer
            + 2 * num_tokens * (h * h_text + h_text * h_text))


def load_hf(model_dir: str, attn: str, device: torch.device, dtype: torch.dtype):
    import transformers

    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attn)
    got = model.config.vision_config._attn_implementation
    if got != attn:
        raise RuntimeError(f"asked transformers for {attn} attention, its tower runs {got}")
    return model.to(device).eval()


def jpegs(n: int, side: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
            buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def preprocess_rate(enc: LlavaEncoder, side: int, n: int = 32) -> dict:
    """decode_image + preprocess of `n` random side x side JPEGs, one thread."""
    from encoder_worker.decode import decode_image

    data = jpegs(n, side)
    for d in data[:4]:
        enc.preprocess(decode_image(d))
    t0 = time.perf_counter()
    for d in data:
        enc.preprocess(decode_image(d))
    dt = time.perf_counter() - t0
    return {"image": f"{side}x{side} JPEG q90", "images": n, "ms_per_image": dt / n * 1e3,
            "images_per_s_per_thread": n / dt}


def batch_runs(enc: LlavaEncoder, graphs: TowerGraphs | None, hf: dict,
               images: list[torch.Tensor], systems: list[str]) -> dict[str, Callable[[], object]]:
    """One batch of each system in `systems`, on the same pixels."""
    pixels = torch.stack(images).to(enc.device)  # [B, 3, H, W] float32, as the uploader makes
    up, down = PixelUploader(enc.device), HostCopier()
    served = graphs or enc  # what the server's loop calls
    runs: dict[str, Callable[[], object]] = {
        "mmserve-tower": lambda: enc.encode(pixels),
        "mmserve-step": lambda: down(served.encode(up(images))),
    }
    if graphs is not None:
        runs["mmserve-graphs"] = lambda: graphs.encode(pixels)
    for attn, model in hf.items():
        runs[f"hf-{attn}"] = lambda m=model: m.get_image_features(pixel_values=pixels)
    return {s: runs[s] for s in SYSTEMS if s in systems and s in runs}


def time_point(system: str, fn: Callable[[], object], batch: int, flops: float, peak: float,
               device: torch.device, warmup: int, iters: int) -> dict:
    row: dict = {"system": system, "batch": batch, "ms": None}
    try:
        with torch.inference_mode():
            ms = time_ms(fn, device, warmup, iters)
    except Exception as e:  # one failed point (e.g. out of memory) keeps the rest
        row["error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"batch {batch} {system}: {row['error']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row
    med = statistics.median(ms)
    tflops = flops * batch / med / 1e9  # ms -> TFLOP/s
    row.update(ms=med, p10_ms=_pct(ms, 10), p90_ms=_pct(ms, 90), images_per_s=batch / med * 1e3,
               TFLOPs=tflops, pct_peak=100 * tflops / peak)
    print(f"batch {batch:>4} {system:>14}: {med:8.2f} ms {row['images_per_s']:9.1f} images/s "
          f"{tflops:7.1f} TFLOP/s", flush=True)
    return row


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q / 100))]


def transfer_row(enc: LlavaEncoder, images: list[torch.Tensor], warmup: int,
                 iters: int) -> dict:
    """ms per batch of each way up and down (CUDA only): what the pinned paths save. Half the
    timed reps of a tower point: pageable downloads are slow (HostCopier's note: 130 ms for 32
    images on an H100)."""
    dev, dtype = enc.device, enc.dtype
    up, down = PixelUploader(dev), HostCopier()
    outs = enc.encode(up(images))
    reps = max(2, iters // 2)
    med = lambda fn: statistics.median(time_ms(fn, dev, warmup, reps))  # noqa: E731
    return {
        "batch": len(images),
        "upload_pageable_ms": med(lambda: torch.stack(images).to(dev, dtype)),
        "upload_pinned_ms": med(lambda: up(images).to(dtype)),
        "download_pageable_ms": med(lambda: [t.to("cpu") for t in outs]),
        "download_pinned_ms": med(lambda: down(outs)),
    }


def _features(out) -> torch.Tensor:
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.stack(list(feats)) if isinstance(feats, list | tuple) else feats


def parity(enc: LlavaEncoder, hf, pixels: torch.Tensor) -> dict:
    """Max abs difference of mmserve's embeddings from transformers' (same weights)."""
    with torch.inference_mode():
        ref = _features(hf.get_image_features(pixel_values=pixels)).float()
    ours = torch.stack(enc.encode(pixels)).float()
    return {"max_abs_diff": (ours - ref).abs().max().item(), "max_abs_ref": ref.abs().max().item(),
            "shape": list(ours.shape)}


def print_table(res: dict) -> None:
    env, peak = res["env"], res["peak_tflops"]
    print(f"\n{env.get('gpu')} | torch {env['torch']} | transformers {env['transformers']} | "
          f"{res['dtype']} | {res['flops_per_image'] / 1e9:.3g} GFLOP/image | peak "
          f"{peak:.0f} TFLOP/s ({res['peak_source']})")
    print(f"{'batch':>5} {'system':>14} {'ms/batch':>10} {'images/s':>10} {'TFLOP/s':>8} "
          f"{'%peak':>6} {'vs hf-sdpa':>10}")
    for r in res["rows"]:
        if r.get("ms") is None:
            print(f"{r['batch']:>5} {r['system']:>14}  {r.get('skipped') or r.get('error')}")
            continue
        hf = next((x for x in res["rows"] if x["batch"] == r["batch"]
                   and x["system"] == "hf-sdpa" and x.get("ms")), None)
        vs = f"{hf['ms'] / r['ms']:.2f}x" if hf else "-"
        print(f"{r['batch']:>5} {r['system']:>14} {r['ms']:>10.2f} {r['images_per_s']:>10.1f} "
              f"{r['TFLOPs']:>8.1f} {r['pct_peak']:>5.1f}% {vs:>10}")
    for t in res["transfers"]:
        print(f"batch {t['batch']:>4}: upload {t['upload_pageable_ms']:.2f} ms pageable, "
              f"{t['upload_pinned_ms']:.2f} pinned; download {t['download_pageable_ms']:.2f} ms "
              f"pageable, {t['download_pinned_ms']:.2f} pinned")
    if res.get("preprocess"):
        p = res["preprocess"]
        print(f"decode + preprocess ({p['image']}): {p['ms_per_image']:.2f} ms/image, "
              f"{p['images_per_s_per_thread']:.0f} images/s per CPU thread")
    if res.get("parity"):
        print(f"parity vs hf-sdpa: max |diff| {res['parity']['max_abs_diff']:.3g} "
              f"(max |ref| {res['parity']['max_abs_ref']:.3g})")


def plot(res: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for system in SYSTEMS:
        pts = [r for r in res["rows"] if r["system"] == system and r.get("ms")]
        if pts:
            a1.plot([r["batch"] for r in pts], [r["images_per_s"] for r in pts], marker="o",
                    label=system)
            a2.plot([r["batch"] for r in pts], [r["TFLOPs"] for r in pts], marker="o",
                    label=system)
    a2.axhline(res["peak_tflops"], color="black", linestyle="--", label=res["peak_source"])
    batches = sorted({r["batch"] for r in res["rows"]})
    for ax, y in ((a1, "images/s"), (a2, "TFLOP/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("images per batch")
        ax.set_ylabel(y)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"vision tower, {res['shape_name']}, {res['dtype']} — {res['env'].get('gpu')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="LLaVA checkpoint folder (default: build the random one)")
    ap.add_argument("--ckpt-dir", help="where to build (and reuse) it; default a temp folder")
    ap.add_argument("--tiny", action="store_true", help="tiny tower, small defaults (CPU smoke)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--batch", type=int, nargs="+", help="images per batch (default 1 8 32)")
    ap.add_argument("--iters", type=int, help="timed batches per point (default 20; tiny 3)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--peak-tflops", type=float,
                    help="peak for %%peak (default: the bf16 matmul rate measured here)")
    ap.add_argument("--threads", type=int,
                    help="torch CPU threads (default: as the encoder server sets them)")
    ap.add_argument("--no-preprocess", action="store_true", help="skip the JPEG preprocess rate")
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="stop starting new points after this many seconds (JSON stays valid)")
    ap.add_argument("--out", default="bench/results/encoder.json")
    ap.add_argument("--png", help="default: --out with .png")
    args = ap.parse_args()
    t_start = time.perf_counter()
    args.batch = args.batch or ([1, 2] if args.tiny else [1, 8, 32])
    args.iters = args.iters or (3 if args.tiny else 20)
    device = resolve_device(args.device)
    # As run_encoder: on CUDA the host only stacks and copies; on CPU the tower gets half the
    # cores (the decode pool has the rest).
    torch.set_num_threads(args.threads or (2 if device.type == "cuda"
                                           else max(1, (os.cpu_count() or 2) // 2)))
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, args.dtype)
    shape = "tiny" if args.tiny else "llava15"
    tmp = None
    if args.model is None:
        if args.ckpt_dir is None:
            tmp = tempfile.TemporaryDirectory()
            args.ckpt_dir = tmp.name
        t0 = time.perf_counter()
        args.model = str(build_checkpoint(args.ckpt_dir, shape, device))
        print(f"checkpoint {args.model} ({time.perf_counter() - t0:.1f} s)", flush=True)
    cfg = json.loads((Path(args.model) / "config.json").read_text())

    t0 = time.perf_counter()
    enc = LlavaEncoder(args.model, device, dtype)
    graphs = None
    if device.type == "cuda" and "mmserve-graphs" in args.systems + ["mmserve-step"]:
        graphs = TowerGraphs(enc, enc.graph_input_shape())
        graphs.capture()
    hf = {a: load_hf(args.model, a, device, dtype) for a in ("sdpa", "eager")
          if f"hf-{a}" in args.systems}
    load_s = time.perf_counter() - t0
    side = cfg["vision_config"]["image_size"]
    flops = flops_per_image(cfg, enc.num_tower_layers, enc.num_tokens(side, side))
    ceilings = measure_device(device)
    peak = args.peak_tflops or ceilings["matmul_TFLOPs"]
    res: dict = {
        "env": env_record(device), "dtype": args.dtype, "shape_name": shape,
        "shape": cfg["vision_config"] | {"text_hidden_size": cfg["text_config"]["hidden_size"]},
        "tower_layers_run": {"mmserve": enc.num_tower_layers,
                             "hf": cfg["vision_config"]["num_hidden_layers"]},
        "tokens_per_image": enc.num_tokens(side, side), "flops_per_image": flops,
        "ceilings": ceilings, "peak_tflops": peak,
        "peak_source": "--peak-tflops" if args.peak_tflops else "measured bf16 matmul",
        "load_s": load_s, "torch_threads": torch.get_num_threads(), "args": vars(args),
        "rows": [], "transfers": [], "preprocess": None, "parity": None,
    }
    out = Path(args.out)
    write_json(out, res)

    g = torch.Generator().manual_seed(0)
    for b in sorted(args.batch):  # cheapest first: a budget cut loses the largest batches
        images = [torch.randn(3, side, side, generator=g) for _ in range(b)]  # [3, H, W] f32
        for system, fn in batch_runs(enc, graphs, hf, images, args.systems).items():
            if time.perf_counter() - t_start > args.budget_s:
                row = {"system": system, "batch": b, "ms": None,
                       "skipped": f"budget {args.budget_s:.0f} s spent"}
            else:
                row = time_point(system, fn, b, flops, peak, device, args.warmup, args.iters)
            res["rows"].append(row)
            write_json(out, res)
        if device.type == "cuda" and time.perf_counter() - t_start < args.budget_s:
            try:
                res["transfers"].append(transfer_row(enc, images, args.warmup, args.iters))
            except Exception as e:
                print(f"batch {b} transfers: {type(e).__name__}: {e}"[:500], flush=True)
    if "sdpa" in hf:
        x = torch.randn(2, 3, side, side, generator=g).to(device)  # [2, 3, H, W]
        res["parity"] = parity(enc, hf["sdpa"], x)
    if not args.no_preprocess:
        res["preprocess"] = preprocess_rate(enc, side)
    res["wall_s"] = time.perf_counter() - t_start
    png = Path(args.png) if args.png else out.with_suffix(".png")
    res["png"] = plot(res, png)
    write_json(out, res)
    print_table(res)
    print(f"wrote {out}" + (f" and {png}" if res["png"] else " (no matplotlib: no PNG)"))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
