"""A request timeline read back (`MMSERVE_TIMELINE`, protocol/timeline.py), for `ttft.py
--timeline`: per request, each event's time from the frontend's `http_entered`; per variant, the
medians of those offsets and of the gaps between consecutive events.

Events join their request by key: its id (the frontend's "chatcmpl-<hex>", the engine's
"chatcmpl-<hex>-<choice>"), "<id>|<media key>", or a media key alone (the encoder's tower and the
engine's embedding inbox know only that). A media key alone goes to the latest request that sent
it (frontend `encode_sent`) and had begun by then: the client sends one request at a time, so
that is the one. A request keeps the first occurrence of each event.
"""

from __future__ import annotations

import statistics

START = "frontend.http_entered"


def label(e: dict) -> str:
    return f"{e['role']}.{e['event']}"


def _owner(e: dict, start: dict[str, int], senders: dict[str, list[str]]) -> str | None:
    rid, sep, _ = e["key"].partition("|")
    if rid in start:
        return rid
    if rid.rpartition("-")[0] in start:  # an engine request: choice i of the frontend's
        return rid.rpartition("-")[0]
    if sep:
        return None  # another request's (a warm-up's)
    begun = [r for r in senders.get(rid, []) if start[r] <= e["t"]]
    return max(begun, key=start.__getitem__, default=None)


def per_request(events: list[dict], request_ids: list[str]) -> dict[str, dict[str, int]]:
    """Request id -> {"role.event": monotonic ns of its first occurrence}, for those of
    ``request_ids`` the frontend recorded; ``events`` in time order (`timeline.load`)."""
    wanted = set(request_ids)
    start = {e["key"]: e["t"] for e in events if label(e) == START and e["key"] in wanted}
    senders: dict[str, list[str]] = {}  # media key -> the requests that sent it
    for e in events:
        rid, _, mm_key = e["key"].partition("|")
        if label(e) == "frontend.encode_sent" and rid in start:
            senders.setdefault(mm_key, []).append(rid)
    times: dict[str, dict[str, int]] = {rid: {} for rid in start}
    for e in events:
        rid = _owner(e, start, senders)
        if rid is not None:
            times[rid].setdefault(label(e), e["t"])
    return times


def summarize(events: list[dict], request_ids: list[str]) -> dict:
    """Median offset (ms from `http_entered`) of each event, in the order of those medians; the
    median gap (ms) from the event before in that order, over the requests that have both; and
    how many requests had each event."""
    times = per_request(events, request_ids)
    offsets: dict[str, list[float]] = {}
    for t in times.values():
        for name, ns in t.items():
            offsets.setdefault(name, []).append((ns - t[START]) / 1e6)
    order = sorted(offsets, key=lambda name: statistics.median(offsets[name]))
    gaps = {}
    for a, b in zip(order, order[1:]):
        d = [(t[b] - t[a]) / 1e6 for t in times.values() if a in t and b in t]
        if d:
            gaps[b] = round(statistics.median(d), 3)
    return {"requests": len(times),
            "offsets_ms": {n: round(statistics.median(offsets[n]), 3) for n in order},
            "gaps_ms": gaps, "count": {n: len(offsets[n]) for n in order}}


def add(rows: list[dict], events: list[dict]) -> None:
    """Each variant's row of ttft.py gets the `timeline` of its timed requests (`request_ids`),
    printed as a table."""
    for row in rows:
        if row.get("request_ids"):
            row["timeline"] = summarize(events, row["request_ids"])
            print_table(row["variant"], row["timeline"])


def print_table(variant: str, s: dict) -> None:
    print(f"timeline {variant}: medians over {s['requests']} requests, ms from {START} "
          "(offset) and from the event above (gap)", flush=True)
    for name, offset in s["offsets_ms"].items():
        gap = s["gaps_ms"].get(name)
        print(f"    {name:<32} {offset:>9.3f} {'-' if gap is None else f'{gap:.3f}':>9} "
              f"{s['count'][name]:>4}", flush=True)
