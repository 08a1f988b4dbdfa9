"""Where each role's threads spend a py-spy recording: the heaviest functions per process and
thread, inclusive of what they call, optionally only below one function (``--under
EngineCoreProc.run``: the busy loop, not start-up). Reads `py-spy record --subprocesses --threads
--format raw` output: collapsed stacks, one "frames count" line each, whose frames start with the
process chain ('process PID:"cmdline"') and the thread ('thread (TID): name').

    py-spy record --subprocesses --threads --nonblocking --format raw -o stacks.txt -- \
        python3 bench/ttft.py ...
    python3 bench/pyspy_summary.py stacks.txt --under EngineCoreProc.run --top 25
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict

ROLE = re.compile(r"frontend\.cli (serve|frontend|encoder|llm-worker)|bench/ttft\.py")


def role_of(process_frame: str) -> str:
    m = ROLE.search(process_frame)
    if m is None:
        return process_frame[:60]
    return m.group(1) or "client"


def summarize(lines: list[str], top: int, under: str | None = None) -> dict:
    samples: dict[str, Counter] = defaultdict(Counter)  # "role / thread" -> function -> samples
    totals: Counter = Counter()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        procs = [i for i, f in enumerate(frames) if f.startswith("process ")]
        threads = [i for i, f in enumerate(frames) if f.startswith("thread (")]
        if not procs or not threads:
            continue
        names = [f.split(" (")[0] for f in frames[threads[-1] + 1:]]
        if under is not None:
            if under not in names:
                continue
            names = names[names.index(under):]
        where = f"{role_of(frames[procs[-1]])} / {frames[threads[-1]].split(': ', 1)[-1]}"
        n = int(count)
        totals[where] += n
        for fn in dict.fromkeys(names):  # inclusive: once per stack
            samples[where][fn] += n
    return {where: {"samples": totals[where],
                    "top": [(fn, n, round(100 * n / totals[where], 1))
                            for fn, n in samples[where].most_common(top)]}
            for where in sorted(totals, key=totals.__getitem__, reverse=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stacks")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--under", help="only stacks through this function, ranked below it")
    ap.add_argument("--out")
    args = ap.parse_args()
    with open(args.stacks) as f:
        res = summarize(f.readlines(), args.top, args.under)
    for where, r in res.items():
        print(f"\n{where}: {r['samples']} samples")
        for fn, n, pct in r["top"]:
            print(f"  {pct:5.1f}%  {n:7d}  {fn}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
