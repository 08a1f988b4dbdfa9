"""The mmserve: metric families of the roles' stats, shared by every role's metrics server.

The engine and the encoders report EngineStats / EncoderStats in their heartbeats. Each role's
`--metrics-port` serves `RoleCollector` over its own latest stats; the frontend serves it over
`Totals` of what every role reported, so a Prometheus that scrapes all of them reads the same
names everywhere. Counters end in _total and histograms come as _bucket/_sum/_count, as
prometheus_client writes them.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from protocol.messages import BucketCounts, EncoderStats, EngineStats

# Fields that are levels (summed over the processes still reporting); the others count up.
ENGINE_GAUGES = frozenset({"num_running", "num_waiting", "num_free_blocks", "num_total_blocks",
                           "executor_healthy"})
ENCODER_GAUGES = frozenset({"store_bytes", "store_items"})


def _valid(h: BucketCounts) -> bool:
    return len(h.counts) == len(h.bounds) + 1 and h.bounds == sorted(h.bounds)


def fold_buckets(total: BucketCounts | None, old: BucketCounts | None,
                 new: BucketCounts) -> BucketCounts | None:
    """``total`` plus what ``new`` counted since ``old`` (all of it without an ``old``). Counts
    from a peer with other bounds go to our first bucket that holds their upper bound: folding
    can make a histogram coarser, never wrong about `le`."""
    if not _valid(new):
        return total  # a broken peer must not take the frontend's inbox down
    grew, grew_sum = new.counts, new.sum
    if old is not None and _valid(old) and old.bounds == new.bounds and all(
            n >= o for n, o in zip(new.counts, old.counts)):
        grew = [n - o for n, o in zip(new.counts, old.counts)]
        grew_sum = new.sum - old.sum
    if total is None:
        total = BucketCounts(list(new.bounds), [0] * len(new.counts))
    if total.bounds == new.bounds:
        total.counts = [t + g for t, g in zip(total.counts, grew)]
    else:
        for bound, g in zip([*new.bounds, math.inf], grew):
            total.counts[bisect.bisect_left(total.bounds, bound)] += g
    total.sum += grew_sum
    return total


class Totals:
    """One role's reports folded into totals that only go up. Each slot (an engine, an encoder
    address) adds its increase since its previous report; a new instance id in a slot is a
    restarted process, whose counters start again from 0, so all it reports is new."""

    def __init__(self, cls: type[msgspec.Struct], gauges: frozenset[str]):
        self.cls, self.gauges = cls, gauges
        self.total: Any = cls()
        self.last: dict[str, tuple[str, Any]] = {}  # slot -> (instance id, its latest stats)

    def report(self, slot: str, instance: str, stats: Any) -> None:
        prev_id, prev = self.last.get(slot, ("", None))
        if prev_id != instance:
            prev = None
        self.last[slot] = (instance, stats)
        for f in self.cls.__struct_fields__:
            if f in self.gauges:
                continue
            new, old = getattr(stats, f), getattr(prev, f, None)
            if isinstance(new, BucketCounts):
                setattr(self.total, f, fold_buckets(getattr(self.total, f), old, new))
            elif new is not None:
                grew = new - old if old is not None and new >= old else new
                setattr(self.total, f, getattr(self.total, f) + grew)

    def snapshot(self, slots: Iterable[str]) -> Any:
        """The totals, with each gauge summed over ``slots`` (the processes still reporting)."""
        latest = [self.last[s][1] for s in slots if s in self.last]
        return msgspec.structs.replace(
            self.total, **{g: sum(getattr(st, g) for st in latest) for g in self.gauges})


# -- families --------------------------------------------------------------------------------------

def _one(cls: type, name: str, doc: str, value: float, model: str) -> Metric:
    m = cls(name, doc, labels=["model_name"])
    m.add_metric([model], value)
    return m


def histogram(name: str, doc: str, h: BucketCounts | None, model: str) -> Metric:
    """A reported histogram as prometheus_client's family (cumulative buckets); before the first
    report, an empty one, so the family is there from the start."""
    bounds, counts, total = (h.bounds, h.counts, h.sum) if h is not None else ([], [0], 0.0)
    cum = list(accumulate(counts))
    buckets = [(floatToGoString(b), c) for b, c in zip(bounds, cum)] + [("+Inf", cum[-1])]
    m = HistogramMetricFamily(name, doc, labels=["model_name"])
    m.add_metric([model], buckets, total)
    return m


def engine_families(s: EngineStats, model: str) -> Iterator[Metric]:
    gauge, counter = GaugeMetricFamily, CounterMetricFamily
    yield _one(gauge, "mmserve:num_requests_running", "Requests in the engine's running batch.",
               s.num_running, model)
    yield _one(gauge, "mmserve:num_requests_waiting",
               "Requests waiting to be scheduled (also those waiting for their embeddings).",
               s.num_waiting, model)
    used = s.num_total_blocks - s.num_free_blocks
    yield _one(gauge, "mmserve:kv_cache_usage_perc",
               "KV-cache usage: the fraction of KV blocks in use (1 = full).",
               used / s.num_total_blocks if s.num_total_blocks else 0.0, model)
    yield _one(counter, "mmserve:num_preemptions",
               "Requests preempted: their KV dropped, to be recomputed.", s.num_preemptions, model)
    yield _one(counter, "mmserve:prefix_cache_queries",
               "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries, model)
    yield _one(counter, "mmserve:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
               s.prefix_cache_hits, model)
    yield _one(counter, "mmserve:engine_steps", "Engine steps that ran work.", s.num_steps, model)
    yield _one(counter, "mmserve:engine_step_seconds",
               "Wall time inside engine steps that ran work.", s.step_seconds, model)
    yield _one(gauge, "mmserve:executor_healthy", "1 while the engine's TP group serves, 0 from "
               "a worker's death until a new group is up (summed over engines).",
               int(s.executor_healthy), model)
    yield _one(counter, "mmserve:executor_restarts",
               "TP groups the engine started again after one failed.", s.executor_restarts, model)


def encoder_families(s: EncoderStats, model: str) -> Iterator[Metric]:
    gauge, counter = GaugeMetricFamily, CounterMetricFamily
    yield _one(counter, "mmserve:embedding_cache_hits",
               "Media items found in an encoder's embedding store.", s.num_cache_hits, model)
    yield _one(counter, "mmserve:embedding_cache_misses",
               "Media items the embedding store did not hold (encoded, or refused).",
               s.num_cache_misses, model)
    yield _one(gauge, "mmserve:embedding_cache_bytes",
               "Bytes of embeddings held in the encoders' stores.", s.store_bytes, model)
    yield _one(gauge, "mmserve:embedding_cache_items",
               "Embeddings held in the encoders' stores.", s.store_items, model)
    yield _one(counter, "mmserve:encoder_items_encoded",
               "Media items that ran through a vision/audio tower.", s.num_encoded, model)
    yield _one(counter, "mmserve:encoder_device_handoffs",
               "Embeddings handed to an engine on the same GPU as a slot of the encoder's device "
               "ring (CUDA IPC), not as bytes.", s.num_device_handoffs, model)
    yield _one(counter, "mmserve:encoder_errors", "Encode requests answered with an error.",
               s.num_errors, model)
    yield histogram("mmserve:encoder_batch_size", "Media items per tower forward.",
                    s.batch_size, model)
    yield histogram("mmserve:encoder_latency_seconds",
                    "An encoded item's seconds from its arrival at the encoder to its "
                    "publication (decode + batch wait + tower).", s.latency, model)


class RoleCollector:
    """A prometheus_client collector of the mmserve: families over the latest stats that
    ``engine`` / ``encoder`` return (either may be None)."""

    def __init__(self, model_name: str, engine: Callable[[], EngineStats] | None = None,
                 encoder: Callable[[], EncoderStats] | None = None):
        self.model_name, self.engine, self.encoder = model_name, engine, encoder

    def collect(self) -> Iterator[Metric]:
        if self.engine is not None:
            yield from engine_families(self.engine(), self.model_name)
        if self.encoder is not None:
            yield from encoder_families(self.encoder(), self.model_name)


def serve_role_metrics(addr: tuple[str, int], collector: RoleCollector) -> None:
    """Serve ``collector`` (and the process's CPU / memory / fds) over HTTP on a daemon thread:
    prometheus_client's own server, so the role's busy loop never handles a scrape."""
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    start_http_server(addr[1], addr=addr[0], registry=registry)
