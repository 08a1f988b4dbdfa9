"""Issue 4, acceptance 3: the built-in demo model loads and answers in under 10 s on the CPU.

    python bench/demo_model_load.py [--out bench/results/demo_model_load.json]

Runs in a fresh interpreter each time (imports included, as a user would pay them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, "deploy/demo_model")
import shapes
from frontend import LLM, SamplingParams
llm = LLM()
t1 = time.perf_counter()
s = shapes.make_sample(7, "shape")
out = llm.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": s.image},
                {"type": "text", "text": s.question}]}], SamplingParams(temperature=0, max_tokens=24))
t2 = time.perf_counter()
print(t1 - t0, t2 - t0, out[0].outputs[0].text, s.answer, sep="|")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="bench/results/demo_model_load.json")
    args = ap.parse_args()
    runs = []
    for _ in range(args.runs):
        line = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                              check=True).stdout.strip().splitlines()[-1]
        load, first, answer, truth = line.split("|")
        runs.append({"load_s": float(load), "first_answer_s": float(first), "answer": answer,
                     "truth": truth})
    result = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "runs": runs,
              "max_first_answer_s": max(r["first_answer_s"] for r in runs)}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
