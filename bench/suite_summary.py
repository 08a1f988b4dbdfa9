"""The GPU suite's summary: one row per (batch, context) with mmserve, the peer and the roofline
side by side, from the JSON files a suite run left in one folder (bench/gpu_suite.sh).

    python bench/suite_summary.py RESULTS_DIR      # table + summary.json (+ summary.png)
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from common import write_json


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(results: Path) -> dict:
    """One row per (batch, context): ms/step of each system found in `results`, and the
    roofline of the triton (else reference) run, with ratios computed from the same run."""
    systems = {"mmserve-triton": "decode_triton.json", "mmserve-cublas": "decode_cublas.json",
               "mmserve-unfused": "decode_unfused.json", "mmserve-sync": "decode_sync.json",
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
    cols = ["mmserve-triton", "mmserve-sync", "mmserve-cublas", "mmserve-unfused", "mmserve-eager", "mmserve-tp2-eager",
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
          "mmserve-unfused": "tab:brown", "mmserve-sync": "tab:gray",
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
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    results = Path(sys.argv[1])
    s = summarize(results)
    png = plot_summary(s, results / "summary.png")
    s["png"] = png
    write_json(results / "summary.json", s)
    print_summary(s)
    print(f"\nsummary.json{' and summary.png' if png else ' (no matplotlib: no PNG)'} "
          f"in {results}")


if __name__ == "__main__":
    main()
