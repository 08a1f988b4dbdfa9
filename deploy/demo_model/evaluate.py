"""Held-out accuracy of the demo model by question category, through mmserve's engine
(`frontend.LLM`, the chat path a server request takes) and optionally through transformers.

    python deploy/demo_model/evaluate.py [--model DIR] [--n 200] [--backends mmserve,transformers]

Pictures come from held-out seeds (shapes.heldout_seed), which training never uses; by default
from index 1000 on, past the ones train.py watched while training (and the run was picked by). "exact" is
the canonical answer string; "ok" also accepts case changes, no full stop and a digit for a count.
Prints a table and writes JSON (default: eval_results.json next to this file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, for `frontend`

import shapes  # noqa: E402

MAX_TOKENS = 32  # the longest answer (three shapes described) is about 15 tokens


def _content(sample: shapes.Sample, kind: str, text_first: bool) -> list[dict]:
    image = {"type": "image_pil", "image_pil": sample.image} if kind == "mmserve" \
        else {"type": "image"}
    parts = [image, {"type": "text", "text": sample.question}]
    return parts[::-1] if text_first else parts


def run_mmserve(model: str, samples: list[shapes.Sample], text_first: bool):
    """-> answers, seconds to load, seconds for the first answer."""
    from frontend import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model)
    load_s = time.perf_counter() - t0
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    t0 = time.perf_counter()
    llm.chat([{"role": "user", "content": _content(samples[0], "mmserve", text_first)}], greedy)
    first_s = time.perf_counter() - t0
    answers = []
    for lo in range(0, len(samples), 64):  # batched: the engine schedules them together
        convs = [[{"role": "user", "content": _content(s, "mmserve", text_first)}]
                 for s in samples[lo:lo + 64]]
        answers += [o.outputs[0].text for o in llm.chat(convs, greedy)]
    return answers, load_s, first_s


def run_transformers(model: str, samples: list[shapes.Sample], text_first: bool):
    import torch
    import transformers

    t0 = time.perf_counter()
    proc = transformers.AutoProcessor.from_pretrained(model)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(model, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    answers = []
    with torch.inference_mode():
        for s in samples:
            messages = [{"role": "user", "content": _content(s, "hf", text_first)}]
            prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
            inputs = proc(images=[s.image], text=prompt, return_tensors="pt")
            out = hf.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
            new = out[0, inputs["input_ids"].shape[1]:]
            answers.append(proc.tokenizer.decode(new, skip_special_tokens=True))
    return answers, load_s, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(HERE / "checkpoint"))
    p.add_argument("--n", type=int, default=200, help="held-out samples per category")
    p.add_argument("--backends", default="mmserve,transformers")
    p.add_argument("--start", type=int, default=1000,
                   help="first held-out index (train.py's progress checks use 0-255)")
    p.add_argument("--text-first", action="store_true",
                   help="put the question before the image in the user message")
    p.add_argument("--json", default=str(HERE / "eval_results.json"))
    args = p.parse_args()

    samples = [s for c in shapes.CATEGORIES for s in shapes.heldout_samples(c, args.n, args.start)]
    runners = {"mmserve": run_mmserve, "transformers": run_transformers}
    results: dict = {"model": args.model, "n_per_category": args.n, "heldout_start": args.start,
                     "prompt_order": "text, image" if args.text_first else "image, text",
                     "backends": {}}
    answers_by_backend = {}
    for name in args.backends.split(","):
        t0 = time.perf_counter()
        answers, load_s, first_s = runners[name](args.model, samples, args.text_first)
        total_s = time.perf_counter() - t0
        answers_by_backend[name] = answers
        per_cat: dict = {}
        for c in shapes.CATEGORIES:
            pairs = [(a, s) for a, s in zip(answers, samples) if s.category == c]
            exact = sum(a.strip() == s.answer for a, s in pairs)
            ok = sum(shapes.is_correct(a, s) for a, s in pairs)
            wrong = [{"question": s.question, "answer": s.answer, "got": a}
                     for a, s in pairs if not shapes.is_correct(a, s)]
            per_cat[c] = {"n": len(pairs), "exact": exact / len(pairs), "ok": ok / len(pairs),
                          "wrong_examples": wrong[:5]}
        results["backends"][name] = {"categories": per_cat, "load_s": round(load_s, 2),
                                     "first_answer_s": first_s and round(first_s, 3),
                                     "total_s": round(total_s, 1)}
    if len(answers_by_backend) == 2:
        a, b = answers_by_backend.values()
        results["same_answers"] = sum(x.strip() == y.strip() for x, y in zip(a, b)) / len(a)

    print(f"{'category':<10}" + "".join(f"{n + ' exact':>20}{n + ' ok':>17}"
                                        for n in results["backends"]))
    for c in shapes.CATEGORIES:
        row = "".join(f"{r['categories'][c]['exact']:>20.1%}{r['categories'][c]['ok']:>17.1%}"
                      for r in results["backends"].values())
        print(f"{c:<10}{row}")
    for n, r in results["backends"].items():
        print(f"{n}: load {r['load_s']} s, first answer {r['first_answer_s']} s, "
              f"all {len(samples)} answers {r['total_s']} s")
    if "same_answers" in results:
        print(f"mmserve and transformers give the same answer: {results['same_answers']:.1%}")
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
