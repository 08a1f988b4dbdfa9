"""TTFT of one 30-frame video request at low load, end to end over HTTP (issue 9's "Measure"):
a Qwen2.5-VL-7B-shaped model, bf16, one 336x336 clip at 30 fps + 40 text tokens.

    python bench/video_ttft.py --device cuda --out $OUT/video_ttft.json  # builds ~14 GB once
    python bench/video_ttft.py --tiny --device cpu --requests 2          # smoke, tiny model

1. Builds (or reuses, by a marker file holding the spec) a random bf16 checkpoint: the
   Qwen2.5-VL-7B vision tower (bench/qwen_tower.py's config: 32 blocks of width 1280, 16 heads,
   MLP 3420, 112 px windows with full attention in blocks 7/15/23/31, patch 14, temporal patch 2,
   merge 2, out 3584) under a Qwen2-7B LM (hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP
   18944, rope_theta 1e6, mrope_section 16/24/24) with the vocabulary cut to the offline BPE
   (frontend/random_model.py) plus Qwen's vision tokens; the Qwen2-VL chat template with image
   and video parts; Qwen2.5-VL's image processor config and transformers' video processor
   defaults (video_preprocessor_config.json). Built on `--device` (bf16, std 0.02, norm gains 1)
   in /dev/shm when tmpfs has room, else $TMPDIR; `--model DIR` takes any Qwen2.5-VL folder.
2. Writes warm-up + timed + 1 distinct clips (PyAV, `--codec` h264 or mpeg4 in mp4; a random
   colour field with ~14 px detail panning across the frame, plus grain, ~60 KB in h264: every
   clip its own bytes, so the encoder store never hits across requests) into the folder served as
   `--allowed-local-media-path`, and starts `mmserve serve` with `--media-io-kwargs
   '{"video": {"num_frames": 30}}'` (every frame sampled; the default, 32, would take all 30
   too), then waits for /health.
3. Sends streamed chat requests one at a time (bench/ttft.py's client: one keep-alive
   connection, temperature 0, `max_tokens` with ignore_eos, the clip as a file:// URL). Variants,
   each after its own warm-up:
     video         a fresh clip per request, then 40 text tokens (the target)
     text          the same 40-token prompts without the clip
     video_repeat  one clip for every request, then the text: encoder store hit, and the KV
                   blocks of the video tokens are prefix-cache hits
   Texts differ per request, so no variant reuses another request's prefix by accident.

TTFT, first text and TPOT as in bench/ttft.py; per variant p50 / p90 / min / mean / max, prompt
tokens (the video's = video - text, checked against the geometry: 15 x 24 x 24 patches merged
2x2 = 2160 placeholders + vision start/end) and the deltas of the server's /metrics counters.
Everything runs within `--budget-s`; the server's process tree is always taken down (also on
error, SIGTERM, or when this process is killed: the server gets SIGTERM through
PR_SET_PDEATHSIG). JSON to `--out`, the server log beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    REPO,
    env_record,
    resolve_device,
    reuse_or_clear,
    save_random_bf16,
    scratch_dir,
    write_json,
)
from mm_server import served
from qwen_tower import VISION_7B, VISION_TINY
from ttft import (
    SERVER_MODULES,
    Variant,
    check_imports,
    expand,
    file_part,
    make_texts,
    print_header,
    run_all,
    text_part,
)

# Patch cutting and M-RoPE time scale of Qwen2.5-VL-7B's vision config on the Hub.
_CUTS = dict(patch_size=14, temporal_patch_size=2, spatial_merge_size=2, tokens_per_second=2)
SHAPES: dict[str, dict] = {
    # Qwen/Qwen2.5-VL-7B-Instruct without its vocabulary (152k -> the offline BPE's 388)
    "qwen2_5_vl_7b": dict(
        vision=dict(VISION_7B["qwen2_5_vl"], **_CUTS),
        text=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, intermediate_size=18944, rope_theta=1e6,
                  mrope_section=[16, 24, 24], max_position_embeddings=32768)),
    "tiny": dict(
        vision=dict(VISION_TINY["qwen2_5_vl"], **_CUTS),
        text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, rope_theta=1e6,
                  mrope_section=[2, 3, 3], max_position_embeddings=4096)),
}
MARKER = "MMSERVE_BENCH_QWEN2_5_VL.json"
VARIANTS = ("video", "text", "video_repeat")
# Qwen2.5-VL-7B's image processor bounds; transformers' Qwen2VLVideoProcessor defaults (a 336x336
# frame, 112,896 pixels, is inside them: it stays 336x336).
IMAGE_PROCESSOR = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
VIDEO_PROCESSOR = {
    "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5_VLProcessor",
    "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_frames": 4,
    "max_frames": 768, "do_resize": True, "resample": 3, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD, "do_convert_rgb": True, "do_sample_frames": False,
}


# -- checkpoint ------------------------------------------------------------------------------------

def is_norm_gain(name: str) -> bool:
    """RMSNorm gains of the LM and the tower (norm1/norm2, the merger's ln_q): set to 1."""
    return name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight"))


def build_checkpoint(out_dir: str | Path, shape: str, device: torch.device, std: float = 0.02,
                     seed: int = 0) -> Path:
    """A random bf16 Qwen2_5_VLForConditionalGeneration of `shape` with tokenizer (Qwen's vision
    tokens added), chat template and image + video processor configs; reused when `out_dir`
    holds one of the same spec."""
    import transformers

    from frontend.random_model import QWEN2_VL_TEMPLATE, QWEN2_VL_TOKENS, build_tokenizer

    out, s = Path(out_dir), SHAPES[shape]
    spec = dict(shape=shape, **s, std=std, seed=seed, image_processor=IMAGE_PROCESSOR,
                video_processor=VIDEO_PROCESSOR)
    spec = json.loads(json.dumps(spec))  # as the marker reads back (lists, not tuples)
    if reuse_or_clear(out, MARKER, spec):
        return out
    build_tokenizer(out, chat_template=QWEN2_VL_TEMPLATE)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    tok.add_tokens(QWEN2_VL_TOKENS, special_tokens=True)
    tok.save_pretrained(out)
    ids = dict(zip(QWEN2_VL_TOKENS, tok.convert_tokens_to_ids(QWEN2_VL_TOKENS)))
    t = dict(s["text"])
    rope = {"rope_type": "default", "rope_theta": t.pop("rope_theta"),
            "mrope_section": t.pop("mrope_section")}
    text = dict(t, vocab_size=len(tok), rms_norm_eps=1e-6, rope_parameters=rope,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    config = transformers.Qwen2_5_VLConfig(
        vision_config=dict(s["vision"]), text_config=text, tie_word_embeddings=False,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    save_random_bf16(transformers.Qwen2_5_VLForConditionalGeneration, config, out, device, std,
                     seed, eos_token_id=tok.eos_token_id, norm_gain=is_norm_gain)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()  # the server's engine sizes its KV cache from free memory
    # The image processor alone, flat in preprocessor_config.json (a whole Qwen2_5_VLProcessor
    # needs torchvision for its video half); the video settings in their own file.
    transformers.Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR, image_mean=CLIP_MEAN,
                                          image_std=CLIP_STD).save_pretrained(out)
    (out / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PROCESSOR, indent=2))
    (out / MARKER).write_text(json.dumps(spec))
    return out


def default_ckpt_dir(shape: str) -> Path:
    if shape == "tiny":
        return Path(tempfile.gettempdir()) / "mmserve_qwen2_5_vl_tiny"
    return scratch_dir("mmserve_qwen2_5_vl_7b", 20 << 30)  # 14.4 GB


def weight_bytes(model_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


# -- inputs ----------------------------------------------------------------------------------------

def write_videos(folder: Path, n: int, side: int, frames: int, rate: int, codec: str,
                 seed: int) -> list[Path]:
    """n distinct clips of `frames` frames: a random colour field with ~14 px detail (each clip
    its own) panning across the frame, plus grain, so the codec does real work (~60 KB a clip
    in h264 at 336x336) without the worst case that pure noise would be."""
    import av
    from PIL import Image

    rng = np.random.default_rng(seed)
    step = max(side // frames, 1)
    width = side + step * frames
    cells = max(side // 14, 4)
    paths = []
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (cells, cells * width // side, 3),
                                           dtype=np.uint8))
        field = np.asarray(low.resize((width, side), Image.BICUBIC), dtype=np.int16)
        path = folder / f"clip_{i:03d}.mp4"
        with av.open(str(path), "w", format="mp4") as c:
            s = c.add_stream(codec, rate=rate)
            s.width = s.height = side
            s.pix_fmt = "yuv420p"
            for f in range(frames):
                grain = rng.integers(-16, 17, (side, side, 3), dtype=np.int16)
                img = np.clip(field[:, f * step:f * step + side] + grain, 0, 255).astype(np.uint8)
                c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            c.mux(s.encode())
        paths.append(path)
    return paths


def expected_video(model_dir: str, clip: Path, num_frames: int | None) -> dict:
    """What the server should make of `clip` (its header; this checkpoint's geometry): frames
    sampled, grid, placeholder tokens."""
    from protocol.geometry import load_geometry
    from protocol.video import read_header

    info = read_header(clip.read_bytes())
    geo = load_geometry(model_dir)
    idx = geo.sample_frames(info.num_frames, info.fps, num_frames)
    item = geo.video(info.width, info.height, len(idx), len(idx) / info.num_frames * info.fps)
    return {"declared_frames": info.num_frames, "fps": info.fps, "codec": info.codec,
            "size": [info.width, info.height], "sampled_frames": len(idx),
            "grid_thw": list(item.grid_thw), "placeholder_tokens": item.num_tokens}


def plan(names: list[str], clips: list[Path], texts: list[str], warmup: int,
         n: int) -> list[Variant]:
    """Contents of every request; clips[:warmup + n] are fresh ones, the last one repeated."""
    texts_left = iter(texts)
    vid = lambda p: file_part("video_url", p)  # noqa: E731
    build = {
        "video": lambda i: [vid(clips[i]), text_part(next(texts_left))],
        "text": lambda i: [text_part(next(texts_left))],
        "video_repeat": lambda i: [vid(clips[-1]), text_part(next(texts_left))],
    }
    return expand(names, build, warmup, n)


# -- main ------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="a Qwen2.5-VL checkpoint folder (default: build the random "
                                    "one)")
    ap.add_argument("--ckpt-dir", help="where to build/reuse it (default /dev/shm/"
                                       "mmserve_qwen2_5_vl_7b if tmpfs has room, else $TMPDIR; "
                                       "tiny: $TMPDIR)")
    ap.add_argument("--tiny", action="store_true", help="a tiny Qwen2.5-VL (CPU smoke)")
    ap.add_argument("--device", default="auto", help="auto, cuda, cpu (engine and encoder)")
    ap.add_argument("--dtype", default="auto", help="serve's --dtype (auto: bf16 on CUDA)")
    ap.add_argument("--requests", type=int, default=20, help="timed requests per variant")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up requests per variant")
    ap.add_argument("--prompt-tokens", type=int, default=40)
    ap.add_argument("--frames", type=int, default=30, help="frames in each clip")
    ap.add_argument("--fps", type=int, default=30, help="the clips' frame rate")
    ap.add_argument("--side", type=int, default=336, help="frame width = height")
    ap.add_argument("--codec", default="h264", choices=("h264", "mpeg4"))
    ap.add_argument("--num-frames", type=int, default=None,
                    help="serve's media_io_kwargs video num_frames (default: --frames, all)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--serve-args", default="", help="extra `mmserve serve` flags, one string")
    ap.add_argument("--ready-timeout-s", type=float, default=90.0,
                    help="model load + warm-up allowance before /health must be 200")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="whole run; variants past it are cut short or skipped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="JSON path; the server log goes beside it (default: "
                                  "bench/results/video_ttft.json, with --tiny "
                                  "$TMPDIR/video_ttft_tiny.json)")
    args = ap.parse_args()
    t_start = time.monotonic()
    deadline = t_start + args.budget_s - 25.0  # leave time to stop the server and write JSON
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` => finally still runs
    check_imports((*SERVER_MODULES, "av"), "video_ttft.py")
    device = resolve_device(args.device)
    shape = "tiny" if args.tiny else "qwen2_5_vl_7b"
    num_frames = args.num_frames or args.frames

    t0 = time.monotonic()
    if args.model:
        model_dir, built = args.model, None
    else:
        ckpt = Path(args.ckpt_dir) if args.ckpt_dir else default_ckpt_dir(shape)
        reused = (ckpt / MARKER).is_file()
        model_dir = str(build_checkpoint(ckpt, shape, device, seed=args.seed))
        built = {"shape": shape, "spec": SHAPES[shape], "dir": model_dir,
                 "marker_found": reused, "seconds": round(time.monotonic() - t0, 1)}
    size_gb = weight_bytes(model_dir) / 1e9
    print(f"checkpoint {model_dir} ({size_gb:.2f} GB; "
          + (f"{'reused' if built['marker_found'] else 'built'}, {built['seconds']} s)"
             if built else "given)"), flush=True)
    out = Path(args.out or (Path(tempfile.gettempdir()) / "video_ttft_tiny.json" if args.tiny
                            else REPO / "bench" / "results" / "video_ttft.json"))
    log_path = out.with_name(out.stem + "_server.log")
    out.parent.mkdir(parents=True, exist_ok=True)
    media = Path(tempfile.mkdtemp(prefix="mmserve_video_ttft_media_"))
    report: dict = {"bench": "video_ttft", "env": env_record(device),
                    "checkpoint": dict(built or {"dir": model_dir}, weight_GB=round(size_gb, 2)),
                    "config": vars(args)}
    try:
        t0 = time.monotonic()
        n_fresh = args.warmup + args.requests
        clips = write_videos(media, n_fresh + 1, args.side, args.frames, args.fps, args.codec,
                             args.seed)
        texts = make_texts(model_dir, n_fresh * len(args.variants), args.prompt_tokens, args.seed)
        variants = plan(args.variants, clips, texts, args.warmup, args.requests)
        report["videos"] = {
            "count": len(clips), "container": "mp4", "url": "file://",
            "mean_bytes": int(np.mean([p.stat().st_size for p in clips])),
            "write_s": round(time.monotonic() - t0, 1),
            **expected_video(model_dir, clips[0], num_frames)}
        v = report["videos"]
        print(f"{len(clips)} clips ({args.codec}, {v['mean_bytes']} B): {v['sampled_frames']} of "
              f"{v['declared_frames']} frames sampled, grid {v['grid_thw']}, "
              f"{v['placeholder_tokens']} video tokens", flush=True)
        serve_argv = ["--allowed-local-media-path", str(media), "--device", str(device),
                      "--encoder-device", str(device), "--dtype", args.dtype,
                      "--media-io-kwargs", json.dumps({"video": {"num_frames": num_frames}}),
                      *shlex.split(args.serve_args)]
        report["server"] = {"argv": serve_argv, "log": str(log_path)}
        report["definitions"] = {
            "ttft_ms": "request sent -> first SSE chunk (written with the first token)",
            "first_text_ms": "-> first non-empty content",
            "tpot_ms": "(last token chunk - first chunk) / (tokens - 1)",
            "video_tokens": "prompt tokens of `video` - those of `text` (placeholders + vision "
                            "start/end)"}
        ready_by = min(time.monotonic() + args.ready_timeout_s, deadline)
        with served(model_dir, serve_argv, log_path, ready_by, report) as base:
            print_header()
            model, rows = asyncio.run(run_all(base, variants, args.max_tokens, deadline))
            report["server"]["model"] = model
            report["results"] = rows
    except BaseException as e:
        report.setdefault("error", f"{type(e).__name__}: {e}")
        raise
    finally:
        shutil.rmtree(media, ignore_errors=True)
        summarize(report)
        report["wall_s"] = round(time.monotonic() - t_start, 1)
        write_json(out, report)
        print(f"wrote {out} and {log_path.name} ({report['wall_s']} s in all)", flush=True)


def summarize(report: dict) -> None:
    """The issue-9 number: TTFT p50 of the fresh-video variant; the video's prompt tokens as the
    difference to the text-only variant, against the geometry's count (all frames sampled)."""
    rows = {r["variant"]: r for r in report.get("results", []) if "ttft_ms" in r}
    vid, txt, rep = rows.get("video"), rows.get("text"), rows.get("video_repeat")
    s: dict = {}
    if vid and vid["ttft_ms"].get("n"):
        s.update(ttft_p50_ms=vid["ttft_ms"]["p50"], ttft_p90_ms=vid["ttft_ms"]["p90"],
                 tpot_p50_ms=vid["tpot_ms"].get("p50"))
    for name, r in (("text", txt), ("video_repeat", rep)):
        if r and r["ttft_ms"].get("n"):
            s[f"{name}_ttft_p50_ms"] = r["ttft_ms"]["p50"]
    if vid and txt and vid["prompt_tokens"] and txt["prompt_tokens"]:
        s["video_tokens"] = vid["prompt_tokens"][0] - txt["prompt_tokens"][0]
        want = report.get("videos", {}).get("placeholder_tokens")
        if want is not None:
            s["video_tokens_match_geometry"] = s["video_tokens"] == want + 2  # + start/end
    report["summary"] = s
    if "ttft_p50_ms" in s:
        v = report.get("videos", {})
        print(f"video ({v.get('sampled_frames')} frames, {s.get('video_tokens')} tokens) + "
              f"{report['config']['prompt_tokens']} text tokens: TTFT p50 "
              f"{s['ttft_p50_ms']:.1f} ms (p90 {s['ttft_p90_ms']:.1f}), TPOT p50 "
              f"{s['tpot_p50_ms'] or 0:.2f} ms; text alone "
              f"{s.get('text_ttft_p50_ms', float('nan')):.1f} ms, repeated video "
              f"{s.get('video_repeat_ttft_p50_ms', float('nan')):.1f} ms", flush=True)
    if s.get("video_tokens_match_geometry") is False:
        print(f"WARNING: the video took {s['video_tokens']} prompt tokens, the geometry says "
              f"{report['videos']['placeholder_tokens']} + 2", flush=True)


if __name__ == "__main__":
    main()
