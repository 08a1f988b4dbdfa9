"""bench/timeline_report.py joins each process's events to their request; `ttft.py --timeline`
reports them per variant, in causal order, on a real (tiny, CPU) server."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _report_module():
    spec = importlib.util.spec_from_file_location("timeline_report", BENCH / "timeline_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ev(t_us: int, role: str, event: str, key: str) -> dict:
    return {"t": t_us * 1000, "pid": 1, "role": role, "event": event, "key": key}


def test_join_by_request_id_choice_id_and_media_key():
    report = _report_module()
    k = "blake3:ab"
    events = [
        ev(10, "frontend", "http_entered", "warm"),  # a warm-up with the same image
        ev(20, "frontend", "encode_sent", f"warm|{k}"),
        ev(30, "encoder", "tower_start", k),
        ev(95, "client", "sent", "r1"),  # the client's clock starts before the frontend's
        ev(100, "frontend", "http_entered", "r1"),
        ev(110, "frontend", "encode_sent", f"r1|{k}"),
        ev(112, "encoder", "encode_received", f"warm|{k}"),  # another request's, by its id
        ev(115, "llm-worker", "request_received", "r1-0"),
        ev(120, "encoder", "embedding_sent", k),
        ev(200, "frontend", "http_entered", "r2"),
        ev(210, "frontend", "encode_sent", f"r2|{k}"),
        ev(215, "llm-worker", "request_received", "r2-0"),
        ev(240, "encoder", "embedding_sent", k),  # r2's: the latest request that sent k
        ev(250, "encoder", "embedding_sent", k),  # a repeat: the first occurrence counts
    ]
    times = report.per_request(events, ["r1", "r2"])
    assert times["r1"] == {"client.sent": 95_000, "frontend.http_entered": 100_000,
                           "frontend.encode_sent": 110_000,
                           "llm-worker.request_received": 115_000,
                           "encoder.embedding_sent": 120_000}
    assert times["r2"]["encoder.embedding_sent"] == 240_000
    s = report.summarize(events, ["r1", "r2"])
    assert s["requests"] == 2
    assert list(s["offsets_ms"]) == ["client.sent", "frontend.http_entered",
                                     "frontend.encode_sent", "llm-worker.request_received",
                                     "encoder.embedding_sent"]
    assert s["offsets_ms"]["encoder.embedding_sent"] == pytest.approx((20 + 40) / 2 / 1e3)
    assert s["gaps_ms"]["encoder.embedding_sent"] == pytest.approx((5 + 25) / 2 / 1e3)
    assert s["count"]["client.sent"] == 1


@pytest.mark.slow
def test_ttft_timeline_cpu_smoke(tmp_path):
    out = tmp_path / "t.json"
    cmd = [sys.executable, str(BENCH / "ttft.py"), "--tiny", "--device", "cpu", "--requests",
           "2", "--timeline", "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    tl = rows["image"]["timeline"]
    assert tl["requests"] == rows["image"]["completed"] == 2
    offsets = tl["offsets_ms"]
    assert offsets["frontend.http_entered"] == 0.0
    assert any(n.startswith("encoder.") for n in offsets)
    assert any(n.startswith("llm-worker.") for n in offsets)
    # Causal in every request, so in the medians too.
    chain = ["client.sent", "frontend.http_entered", "frontend.encode_sent",
             "encoder.encode_received", "encoder.tower_done", "encoder.embedding_sent",
             "llm-worker.embedding_received", "llm-worker.prefill_launched",
             "llm-worker.first_token", "llm-worker.first_output_sent", "frontend.first_output",
             "frontend.first_chunk", "client.first_chunk"]
    assert [offsets[n] for n in chain] == sorted(offsets[n] for n in chain)
    assert "encoder.tower_done" not in rows["image_repeat"]["timeline"]["offsets_ms"]  # store hit
    assert not any(n.startswith("encoder.") for n in rows["text"]["timeline"]["offsets_ms"])
