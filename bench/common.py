"""Shared pieces of the issue-8 GPU benchmarks: the random checkpoint, the prompts, the two
hardware ceilings measured in the benchmark's own process, the environment record, and the
suite summary that puts mmserve, the peer and the roofline side by side.

    python bench/common.py build --out /tmp/llama7b --shape 7b --device cuda
    python bench/common.py env --out env.json --device cuda
    python bench/common.py summary RESULTS_DIR      # table + summary.json (+ summary.png)
"""

from __future__ import annotations

import argparse
import contextlib
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
# `python bench/x.py` puts bench/ first on sys.path, where bench/kernels.py would shadow the
# `kernels` package: the scripts import this module first, and it puts the repo root first (which
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

def build_checkpoint(out_dir: str | os.PathLike, shape: str = "7b", device: str = "cuda",
                     std: float = 0.02, max_position_embeddings: int = 4096,
                     seed: int = 0) -> Path:
    """A random bf16 Llama checkpoint of `shape` saved with save_pretrained; reused when the
    folder already holds one of the same shape."""
    import transformers

    from frontend.random_model import build_tokenizer

    out = Path(out_dir)
    spec = dict(SHAPES[shape], std=std, max_position_embeddings=max_position_embeddings, seed=seed)
    if (out / MARKER).is_file() and json.loads((out / MARKER).read_text()) == spec:
        return out
    out.mkdir(parents=True, exist_ok=True)
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
    """Which implementation `kernels.get` resolves each op to under this MMSERVE_KERNELS."""
    import kernels

    out = {"MMSERVE_KERNELS": os.environ.get("MMSERVE_KERNELS", "auto")}
    for op in kernels.OPS:
        try:
            fn = kernels.get(op, device)
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


# -- suite summary -----------------------------------------------------------------------------

def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(results: Path) -> dict:
    """One row per (batch, context): ms/step of each system found in `results`, and the
    roofline of the triton (else reference) run, with ratios computed from the same run."""
    systems = {"mmserve-triton": "decode_triton.json", "mmserve-cublas": "decode_cublas.json",
               "mmserve-eager": "decode_eager.json", "mmserve-tp2-eager": "decode_tp2.json",
               "mmserve-reference": "decode_reference.json", "hf-eager": "peer_eager.json",
               "hf-static-compile": "peer_static.json"}
    data = {k: _load(results / f) for k, f in systems.items()}
    rows: dict[tuple[int, int], dict] = {}
    for name, d in data.items():
        for r in (d or {}).get("rows", []):
            if r.get("ms_per_step") is None:
                continue
            row = rows.setdefault((r["batch"], r["context"]), {"batch": r["batch"],
                                                               "context": r["context"]})
            row[name] = r["ms_per_step"]
            if "roofline_ms" in r and "roofline_ms" not in row:
                row["roofline_ms"] = r["roofline_ms"]
    prefill = {}
    for name, d in data.items():
        p = (d or {}).get("prefill") or {}
        if p.get("ms") is not None:
            prefill[name] = {k: p.get(k) for k in ("batch", "length", "ms", "tok_s", "TFLOPs")}
    stages = []
    with contextlib.suppress(OSError):
        for line in (results / "stages.tsv").read_text().splitlines():
            name, rc, secs, note = (line.split("\t") + ["", "", "", ""])[:4]
            stages.append({"stage": name, "rc": rc, "seconds": secs, "note": note})
    kern = [{k: r.get(k) for k in ("op", "case", "ref_us", "triton_us", "sdpa_us",
                                   "triton_pct_bw", "triton_TFLOPs", "sdpa_TFLOPs",
                                   "max_abs_diff", "triton")}
            for r in (_load(results / "kernels.json") or {}).get("rows", [])]
    sh = next((d["shape"] for d in data.values() if d and "shape" in d), None)
    model = (f"hidden {sh['hidden_size']}, {sh['num_layers']} layers, "
             f"{sh['weight_bytes'] / 1e9:.2f} GB" if sh else "")
    par = _load(results / "parity.json") or {}
    parity = {k: par.get(k) for k in ("dtype", "ok", "rows", "args")} if par else None
    return {"rows": [rows[k] for k in sorted(rows)], "prefill": prefill, "kernels": kern,
            "model": model, "parity": parity,
            "env": (_load(results / "env.json") or {}), "stages": stages}


def print_summary(s: dict) -> None:
    cols = ["mmserve-triton", "mmserve-cublas", "mmserve-eager", "mmserve-tp2-eager",
            "mmserve-reference", "hf-eager", "hf-static-compile"]
    env = s.get("env", {})
    rec = env.get("env", {})
    ceil = env.get("ceilings", {})
    print(f"\n{rec.get('gpu', '?')} | torch {rec.get('torch')} | triton {rec.get('triton')} | "
          f"transformers {rec.get('transformers')} | {rec.get('date')}")
    if ceil:
        print(f"copy {ceil.get('copy_GBps', 0):.0f} GB/s, bf16 matmul "
              f"{ceil.get('matmul_TFLOPs', 0):.0f} TFLOP/s (env stage)")
    if s.get("kernels"):
        print("\nkernels (us; %bw = bytes moved / time / copy bandwidth)")
        print(f"{'op':<15} {'case':<26} {'ref':>9} {'triton':>9} {'sdpa':>9} {'%bw':>5} "
              f"{'TF/s':>6} {'max|d|':>8}")
        for k in s["kernels"]:
            def g(key: str, fmt: str, k: dict = k) -> str:
                v = k.get(key)
                return format(v, fmt) if isinstance(v, int | float) else "-"

            print(f"{k['op']:<15} {k['case']:<26} {g('ref_us', '9.1f'):>9} "
                  f"{g('triton_us', '9.1f'):>9} {g('sdpa_us', '9.1f'):>9} "
                  f"{g('triton_pct_bw', '5.0f'):>5} {g('triton_TFLOPs', '6.0f'):>6} "
                  f"{g('max_abs_diff', '8.1e'):>8}" + (f"  {k['triton']}"[:60]
                                                     if isinstance(k.get("triton"), str) else ""))
    print("\ndecode ms/step (tok/s = batch / ms); % = roofline / measured")
    print(f"{'batch':>5} {'ctx':>5} " + " ".join(f"{c:>17}" for c in cols) + f" {'roofline':>9}")
    for r in s["rows"]:
        cells = []
        for c in cols:
            v = r.get(c)
            if v is None:
                cells.append(f"{'-':>17}")
            else:
                pct = 100 * r["roofline_ms"] / v if r.get("roofline_ms") else float("nan")
                cells.append(f"{v:>9.2f} ({pct:>4.0f}%)")
        roof = r.get("roofline_ms")
        print(f"{r['batch']:>5} {r['context']:>5} " + " ".join(cells)
              + (f" {roof:>9.2f}" if roof else f" {'-':>9}"))
    if s["prefill"]:
        print("\nprefill")
        for name, p in s["prefill"].items():
            tf = p.get("TFLOPs")
            print(f"  {name:>18}: {p['batch']} x {p['length']} tokens in {p['ms']:.1f} ms, "
                  f"{p['tok_s']:.0f} tok/s" + (f", {tf:.0f} TFLOP/s" if tf else ""))
    par = s.get("parity")
    if par:
        rows = par.get("rows") or []
        worst = max((r["max_abs_dlogprob"] for r in rows), default=float("nan"))
        agree = sum(r["agree_steps"] for r in rows)
        print(f"\nparity ({par.get('dtype')}, triton + graphs vs reference): {agree}/"
              f"{sum(r['steps'] for r in rows)} greedy steps agree, max |d logprob| {worst:.4f}, "
              f"ok={par.get('ok')}")
    if s["stages"]:
        print("\nstages")
        for st in s["stages"]:
            print(f"  {st.get('stage', '?'):>18}: rc {st.get('rc')}, {st.get('seconds')} s"
                  + (f" ({st['note']})" if st.get("note") else ""))


COLORS = {"mmserve-triton": "tab:blue", "mmserve-cublas": "tab:green",
          "mmserve-eager": "tab:purple", "mmserve-tp2-eager": "tab:olive",
          "mmserve-reference": "tab:cyan", "hf-eager": "tab:red",
          "hf-static-compile": "tab:orange", "roofline_ms": "black"}


def plot_summary(s: dict, path: Path) -> str | None:
    """ms/step vs batch, one panel per context; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ctxs = sorted({r["context"] for r in s["rows"]})
    if not ctxs:
        return None
    fig, axes = plt.subplots(1, len(ctxs), figsize=(5 * len(ctxs), 4), squeeze=False)
    for ax, ctx in zip(axes[0], ctxs):
        rows = [r for r in s["rows"] if r["context"] == ctx]
        for key, color in COLORS.items():  # one colour per system in every panel
            pts = [(r["batch"], r[key]) for r in rows if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=key.replace("_ms", ""), color=color,
                        linestyle="--" if key == "roofline_ms" else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("ms / decode step")
        ax.set_title(f"context {ctx}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    gpu = s.get("env", {}).get("env", {}).get("gpu", "")
    fig.suptitle(f"decode, bf16, {s.get('model', '')} — {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


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
    m = sub.add_parser("summary", help="side-by-side table of a results folder")
    m.add_argument("results")
    args = ap.parse_args()
    if args.cmd == "build":
        t0 = time.perf_counter()
        path = build_checkpoint(args.out, args.shape, str(resolve_device(args.device)))
        st = checkpoint_stats(path)
        print(f"checkpoint {path}: {st['params'] / 1e9:.3f} B params, "
              f"{st['weight_bytes'] / 1e9:.2f} GB, vocab {st['vocab_size']} "
              f"({time.perf_counter() - t0:.1f} s)")
    elif args.cmd == "env":
        dev = resolve_device(args.device)
        rec = {"env": env_record(dev), "ceilings": measure_device(dev)}
        write_json(args.out, rec)
        print(json.dumps(rec, indent=2))
    else:
        results = Path(args.results)
        s = summarize(results)
        png = plot_summary(s, results / "summary.png")
        s["png"] = png
        write_json(results / "summary.json", s)
        print_summary(s)
        print(f"\nsummary.json{' and summary.png' if png else ' (no matplotlib: no PNG)'} "
              f"in {results}")


if __name__ == "__main__":
    main()
