"""Shared pieces of the issue-8 GPU benchmarks: the random checkpoint, the prompts, the two
hardware ceilings measured in the benchmark's own process and the environment record (the
suite's side-by-side summary is bench/suite_summary.py).

    python bench/common.py build --out /tmp/llama7b --shape 7b --device cuda
    python bench/common.py env --out env.json --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# `python bench/x.py` puts bench/ first on sys.path, where bench/kernels.py would shadow Hugging
# Face's `kernels` package (transformers >= 5.25 imports it): the scripts import this module first, and it puts the repo root first (which
# also makes them run without `pip install -e .`) and bench/ last, for the scripts' own helpers.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(REPO), *(p for p in sys.path if Path(p or ".").resolve() not in (_BENCH, REPO)),
               str(_BENCH)]

# Llama-2-7B without its vocabulary (cut to the offline BPE's size); "tiny" smoke-tests on CPU.
SHAPES: dict[str, dict[str, int]] = {
    "7b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
               intermediate_size=11008),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=128),
}
MARKER = "MMSERVE_BENCH_SHAPE.json"


# -- checkpoint --------------------------------------------------------------------------------

def reuse_or_clear(out: Path, marker: str, spec: dict) -> bool:
    """True when `out` holds a finished build of `spec` (its `marker` file, written last, says
    so); else False, with `out` made and the marker removed, so a folder left half-written is
    rebuilt, not reused."""
    if (out / marker).is_file() and json.loads((out / marker).read_text()) == spec:
        return True
    out.mkdir(parents=True, exist_ok=True)
    (out / marker).unlink(missing_ok=True)
    return False


def build_checkpoint(out_dir: str | os.PathLike, shape: str = "7b", device: str = "cuda",
                     std: float = 0.02, max_position_embeddings: int = 4096,
                     seed: int = 0) -> Path:
    """A random bf16 Llama checkpoint of `shape` saved with save_pretrained; reused when the
    folder already holds one of the same shape."""
    import transformers

    from frontend.random_model import build_tokenizer

    out = Path(out_dir)
    spec = dict(SHAPES[shape], std=std, max_position_embeddings=max_position_embeddings, seed=seed)
    if reuse_or_clear(out, MARKER, spec):
        return out
    build_tokenizer(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    s = SHAPES[shape]
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=s["hidden_size"], num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        intermediate_size=s["intermediate_size"], max_position_embeddings=max_position_embeddings,
        initializer_range=std, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        # Built where it is fast to initialise (7B on CPU in fp32 would take ~27 GB and minutes).
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)  # never zeros: they can run faster than real data
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="5GB")
    del model
    (out / MARKER).write_text(json.dumps(spec))
    (out / "MMSERVE_RANDOM_WEIGHTS").write_text("Random weights: for speed runs only.\n")
    return out


def save_random_bf16(model_cls, config, out: Path, device, std: float, seed: int,
                     eos_token_id: int | None = None, norm_gain=None) -> None:
    """``model_cls(config)`` with random bf16 weights (std `std`; the weights ``norm_gain(name)``
    picks, by default every norm's, set to 1), built on `device` (a 7B initialises in seconds on
    a GPU, where fp32 on the CPU would take ~30 GB and minutes) and saved to `out`."""
    norm_gain = norm_gain or (lambda name: "norm" in name and name.endswith("weight"))
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norm_gain(name):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)  # never zeros: they can run faster than real data
    if eos_token_id is not None:
        model.generation_config.eos_token_id = eos_token_id
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="5GB")


def save_random_llava(config, out: Path, device, std: float, seed: int,
                      eos_token_id: int | None = None) -> None:
    """A LlavaForConditionalGeneration of `config` with random bf16 weights (`save_random_bf16`)."""
    import transformers

    save_random_bf16(transformers.LlavaForConditionalGeneration, config, out, device, std, seed,
                     eos_token_id)


def scratch_dir(name: str, need_bytes: int) -> Path:
    """Where a big random checkpoint goes: /dev/shm/`name` (the server then maps it straight
    from memory) when it is already there or tmpfs has `need_bytes` free, else $TMPDIR/`name`."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if (shm / name / "config.json").is_file():
        return shm / name
    free = shutil.disk_usage(shm).free if shm.is_dir() else 0
    return (shm if free > need_bytes else Path(tempfile.gettempdir())) / name


def checkpoint_stats(model_dir: str | os.PathLike) -> dict:
    """Shape and byte counts of a checkpoint, read from its config and safetensors headers."""
    from safetensors import safe_open

    from llm_worker.weights import safetensors_files

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    total = embed = 0
    params = 0
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                n = math.prod(sl.get_shape())
                nbytes = n * {"BF16": 2, "F16": 2, "F32": 4}.get(sl.get_dtype(), 2)
                params += n
                total += nbytes
                if "embed_tokens" in name:
                    embed += nbytes
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    layers = cfg["num_hidden_layers"]
    return {
        "params": params, "weight_bytes": total,
        # One decode step reads every weight except the embedding table (it gathers rows).
        "weight_bytes_per_step": total - embed,
        "hidden_size": cfg["hidden_size"], "num_layers": layers, "num_heads": heads,
        "num_kv_heads": kv_heads, "head_dim": head_dim, "vocab_size": cfg["vocab_size"],
        "intermediate_size": cfg["intermediate_size"],
        # K and V of one token over all layers, bf16
        "kv_bytes_per_token": 2 * layers * kv_heads * head_dim * 2,
    }


def prefill_flops(stats: dict, batch: int, length: int) -> float:
    """Matmul FLOPs of a causal prefill of `batch` prompts of `length` tokens (logits for the
    last token of each): 2 x linear params x tokens + QK^T and PV over the causal pairs."""
    h, i, L = stats["hidden_size"], stats["intermediate_size"], stats["num_layers"]
    hd, nh, nkv = stats["head_dim"], stats["num_heads"], stats["num_kv_heads"]
    per_layer = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * i
    tokens = batch * length
    pairs = batch * length * (length + 1) / 2
    return (2 * L * per_layer * tokens + 4 * L * nh * hd * pairs
            + 2 * h * stats["vocab_size"] * batch)


def prompt_ids(batch: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """The same random prompts for mmserve and the peer (ids past the 4 special tokens)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch * 10_007 + length)
    return torch.randint(4, vocab_size, (batch, length), generator=g).tolist()


# -- ceilings and environment ------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int = 3, reps: int = 10) -> list[float]:
    """Per-call times in ms: CUDA events on GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_device(device: torch.device, copy_gib: float | None = None,
                   matmul_n: int | None = None) -> dict:
    """Device copy bandwidth (bytes read + written over the time of a large device-to-device
    copy), read bandwidth (bytes read by a sum over the same buffer: the ceiling of a kernel that
    only reads, like a decode GEMV over the weights) and bf16 matmul TFLOP/s, medians, on random
    data."""
    cuda = device.type == "cuda"
    copy_gib = copy_gib or (2.0 if cuda else 0.0625)
    matmul_n = matmul_n or (8192 if cuda else 512)
    n = int(copy_gib * (1 << 30)) // 2
    t, tr = _copy_ms(n, device)
    tm = _matmul_ms(matmul_n, device)
    if cuda:
        torch.cuda.empty_cache()
    return {"copy_bytes": 2 * n * 2, "copy_ms": t, "copy_GBps": 2 * n * 2 / (t * 1e-3) / 1e9,
            "read_bytes": n * 2, "read_ms": tr, "read_GBps": n * 2 / (tr * 1e-3) / 1e9,
            "matmul_n": matmul_n, "matmul_ms": tm,
            "matmul_TFLOPs": 2 * matmul_n**3 / (tm * 1e-3) / 1e12}


def _copy_ms(n: int, device: torch.device) -> tuple[float, float]:
    """(copy ms, read-only ms) of an n-element bf16 buffer."""
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy = statistics.median(time_ms(lambda: dst.copy_(src), device))
    read = statistics.median(time_ms(lambda: src.sum(dtype=torch.float32), device))
    return copy, read


def _matmul_ms(n: int, device: torch.device) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    return statistics.median(time_ms(lambda: a @ b, device))


def env_record(device: torch.device) -> dict:
    import transformers

    rec = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "host": platform.node(),
        "device": str(device),
    }
    try:
        import triton

        rec["triton"] = triton.__version__
    except ImportError:
        rec["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        rec.update(gpu=p.name, gpu_memory_GiB=round(p.total_memory / (1 << 30), 1),
                   sms=p.multi_processor_count, cuda=torch.version.cuda)
    else:
        rec["gpu"] = f"none ({platform.machine()} CPU, {torch.get_num_threads()} threads)"
    return rec


def kernel_choice(device: torch.device) -> dict[str, str]:
    """Which implementation `mmkernels.get` resolves each op to under this MMSERVE_KERNELS."""
    import mmkernels

    out = {"MMSERVE_KERNELS": os.environ.get("MMSERVE_KERNELS", "auto")}
    for op in mmkernels.OPS:
        try:
            fn = mmkernels.get(op, device)
            out[op] = f"{fn.__module__}.{fn.__name__}"
        except Exception as e:  # a kernel module still missing or broken: say so, go on
            out[op] = f"error: {type(e).__name__}: {e}"[:200]
    return out


def print_skipped_row(r: dict) -> bool:
    """Print a grid point that has no timing (skipped or failed); True if it was one."""
    if r.get("ms_per_step") is not None:
        return False
    print(f"{r['batch']:>5} {r['context']:>5}  {r.get('skipped') or r.get('error')}")
    return True


def print_prefill(p: dict | None) -> None:
    """The prefill point of a decode/peer result, or why it is missing."""
    p = p or {}
    if p.get("ms") is not None:
        print(f"prefill {p['batch']} x {p['length']}: {p['ms']:.1f} ms, {p['tok_s']:.0f} tok/s, "
              f"{p['TFLOPs']:.1f} TFLOP/s ({p['pct_matmul_peak']:.0f}% of measured matmul)")
    elif p:
        print(f"prefill: {p.get('error') or p.get('skipped')}")


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomic write, so a stage killed by its timeout leaves the last complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the random checkpoint")
    b.add_argument("--out", required=True)
    b.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    b.add_argument("--device", default="auto")
    e = sub.add_parser("env", help="environment record + copy bandwidth + matmul rate")
    e.add_argument("--out", required=True)
    e.add_argument("--device", default="auto")
    args = ap.parse_args()
    if args.cmd == "build":
        t0 = time.perf_counter()
        path = build_checkpoint(args.out, args.shape, str(resolve_device(args.device)))
        st = checkpoint_stats(path)
        print(f"checkpoint {path}: {st['params'] / 1e9:.3f} B params, "
              f"{st['weight_bytes'] / 1e9:.2f} GB, vocab {st['vocab_size']} "
              f"({time.perf_counter() - t0:.1f} s)")
    else:
        dev = resolve_device(args.device)
        rec = {"env": env_record(dev), "ceilings": measure_device(dev)}
        write_json(args.out, rec)
        print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
