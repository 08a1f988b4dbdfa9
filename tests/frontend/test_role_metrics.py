"""frontend/role_metrics.py and frontend/metrics.py without a server: folding the roles' reports
into totals that only go up, histograms from peers with other buckets, vLLM's token buckets."""

from __future__ import annotations

import time
from types import SimpleNamespace

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from frontend.engine_client import EngineHealth
from frontend.metrics import FrontendMetrics, token_buckets
from frontend.role_metrics import (
    ENCODER_GAUGES,
    ENGINE_GAUGES,
    RoleCollector,
    Totals,
    fold_buckets,
)
from protocol.codec import decode, encode
from protocol.messages import (
    BucketCounts,
    EncoderHeartbeat,
    EncoderStats,
    EngineStats,
    GenerateRequest,
    Sampling,
    TokenOutput,
)


def enc(hits: int, counts: list[int], total: float, store: int = 0) -> EncoderStats:
    return EncoderStats(num_cache_hits=hits, store_bytes=store,
                        latency=BucketCounts([0.1, 1.0], counts, total))


def test_counters_add_each_reports_increase_and_a_restart_starts_from_zero():
    t = Totals(EncoderStats, ENCODER_GAUGES)
    t.report("a", "enc-1", enc(3, [1, 2, 0], 1.5, store=100))
    t.report("a", "enc-1", enc(5, [2, 2, 1], 4.0, store=300))
    t.report("b", "enc-2", enc(1, [0, 1, 0], 0.5, store=50))
    t.report("a", "enc-3", enc(2, [1, 0, 0], 0.05, store=10))  # a restarted at the same address
    s = t.snapshot(["a", "b"])
    assert s.num_cache_hits == 5 + 1 + 2
    assert s.latency.counts == [2 + 0 + 1, 2 + 1, 1] and s.latency.sum == 4.0 + 0.5 + 0.05
    assert s.store_bytes == 10 + 50  # gauges: the latest of each live slot
    assert t.snapshot(["b"]).store_bytes == 50  # a is not live: its store is gone from the sum


def test_engine_gauges_are_levels_and_counters_never_go_back():
    t = Totals(EngineStats, ENGINE_GAUGES)
    t.report("engine", "e1", EngineStats(num_running=4, num_preemptions=2, step_seconds=1.0))
    t.report("engine", "e1", EngineStats(num_running=1, num_preemptions=3, step_seconds=1.5))
    t.report("engine", "e2", EngineStats(num_running=0, num_preemptions=1, step_seconds=0.25))
    s = t.snapshot(["engine"])
    assert (s.num_running, s.num_preemptions, s.step_seconds) == (0, 4, 1.75)


def test_other_bounds_fold_into_the_bucket_that_holds_their_upper_bound():
    ours = BucketCounts([0.1, 1.0, 10.0], [0, 0, 0, 0])
    theirs = BucketCounts([0.05, 0.5, 20.0], [1, 2, 3, 4], 9.0)
    got = fold_buckets(ours, None, theirs)
    assert got.counts == [1, 2, 0, 3 + 4] and got.sum == 9.0


def test_a_malformed_report_changes_nothing():
    ours = BucketCounts([1.0], [2, 1], 3.0)
    assert fold_buckets(ours, None, BucketCounts([1.0, 2.0], [5], 1.0)).counts == [2, 1]
    assert fold_buckets(ours, None, BucketCounts([2.0, 1.0], [1, 1, 1], 1.0)).counts == [2, 1]


def test_role_collector_exposition_parses():
    t = Totals(EncoderStats, ENCODER_GAUGES)
    t.report("a", "enc-1", enc(3, [1, 2, 4], 9.0, store=64))
    registry = CollectorRegistry()
    registry.register(RoleCollector("m", engine=lambda: EngineStats(num_total_blocks=8,
                                                                    num_free_blocks=2),
                                     encoder=lambda: t.snapshot(["a"])))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    lat = {s.name + s.labels.get("le", ""): s.value
           for s in fams["mmserve:encoder_latency_seconds"].samples}
    assert lat == {"mmserve:encoder_latency_seconds_bucket0.1": 1,
                   "mmserve:encoder_latency_seconds_bucket1.0": 3,
                   "mmserve:encoder_latency_seconds_bucket+Inf": 7,
                   "mmserve:encoder_latency_seconds_count": 7,
                   "mmserve:encoder_latency_seconds_sum": 9.0}
    assert fams["mmserve:kv_cache_usage_perc"].samples[0].value == 0.75
    hits = fams["mmserve:embedding_cache_hits"].samples[0]
    assert hits.name == "mmserve:embedding_cache_hits_total"
    assert fams["mmserve:embedding_cache_bytes"].samples[0].labels == {"model_name": "m"}
    # Before an encoder reports its histograms, the family is there, empty.
    empty = RoleCollector("m", encoder=EncoderStats)
    batch = next(f for f in empty.collect() if f.name == "mmserve:encoder_batch_size")
    assert [(s.name, s.value) for s in batch.samples][-2:] == [
        ("mmserve:encoder_batch_size_count", 0), ("mmserve:encoder_batch_size_sum", 0.0)]


def test_new_fields_decode_from_an_old_peer_and_round_trip():
    class OldStats(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        num_requests: int = 0

    old = msgspec.msgpack.encode(OldStats(num_requests=2))
    got = msgspec.msgpack.decode(old, type=EncoderStats)
    assert got.num_requests == 2 and got.latency is None and got.num_cache_misses == 0
    beat = EncoderHeartbeat("e", 1.0, enc(1, [1, 0, 0], 0.05))
    assert decode(encode(beat)[0:2])[0] == beat
    out = TokenOutput("r", [1], queue_seconds=0.25)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(out), type=TokenOutput) == out


def test_token_buckets_are_vllms_1_2_5_series():
    assert token_buckets(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert token_buckets(4096)[-1] == 2000


def test_request_timer_observes_on_the_frontends_clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    client = SimpleNamespace(health=lambda: EngineHealth("starting", None, None),
                             stats=EngineStats())
    m = FrontendMetrics("m", 64, client, None, {})
    req = GenerateRequest("r", [1, 2, 3], Sampling(), [], "", arrival_time=99.5)
    timer = m.start(req)
    for t, out in [(100.0, TokenOutput("r", [7], queue_seconds=0.125)),
                   (100.5, TokenOutput("r", [8])), (101.5, TokenOutput("r", [9], "length"))]:
        now[0] = t
        timer.output(out)
    m.start(GenerateRequest("s", [1], Sampling(), [], "", arrival_time=100.0)).end("abort")
    m.start(GenerateRequest("u", [1], Sampling(), [], "", arrival_time=100.0)).end("error")
    got = {(s.name, s.labels.get("finished_reason")): s.value
           for f in text_string_to_metric_families(m.exposition().decode())
           for s in f.samples if "le" not in s.labels}

    def one(name: str) -> tuple[float, float]:
        return got[(f"mmserve:{name}_count", None)], got[(f"mmserve:{name}_sum", None)]

    assert one("time_to_first_token_seconds") == (1, 0.5)
    assert one("inter_token_latency_seconds") == (2, 1.5)
    assert one("time_per_output_token_seconds") == (1, 0.75)  # (101.5 - 100) / 2
    assert one("request_queue_time_seconds") == (1, 0.125)
    assert one("e2e_request_latency_seconds") == (2, 2.0 + 1.5)  # r, and s (aborted): not u
    assert one("request_generation_tokens") == (2, 3)
    assert got[("mmserve:prompt_tokens_total", None)] == 3  # only r reached its prefill
    assert got[("mmserve:generation_tokens_total", None)] == 3
    assert [got[("mmserve:request_success_total", r)] for r in ("length", "abort", "error")] \
        == [1, 1, 1]
