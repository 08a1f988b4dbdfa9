"""The frontend's /metrics: vLLM's names under mmserve:, with prometheus_client.

What the frontend sees itself it measures on its own clock: every token it streams, so TTFT,
inter-token latency, time per output token, end to end and token counts (`RequestTimer`, fed
by EngineClient.generate). The rest the roles report in their heartbeats; `Totals` folds each
report's increase in, so a restarted engine or encoder never makes a counter go back, and
`role_metrics` names the families (every role's own --metrics-port serves the same ones).

The mmserve_* families are the raw per-role numbers that bench/ and the tests read, kept as they
were; those that count up are untyped (a Prometheus counter's name must end in _total), and
their typed twins are the mmserve: ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric, UnknownMetricFamily

from frontend.engine_client import BUSY_AFTER_S
from frontend.role_metrics import (
    ENCODER_GAUGES,
    ENGINE_GAUGES,
    RoleCollector,
    Totals,
)
from protocol.messages import EncoderStats, EngineStats, GenerateRequest, TokenOutput

if TYPE_CHECKING:
    from frontend.engine_client import EngineClient
    from frontend.media.encoder_pool import EncoderPool

# Text format 0.0.4: what every Prometheus reads (prometheus_client's default is now 1.0.0).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's bucket boundaries (v1 loggers), so dashboards made for vLLM read these unchanged.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
TOKEN_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                         5.0, 7.5, 10.0, 20.0, 40.0, 80.0]  # ITL and TPOT
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]

# The _created series would double the exposition, and no dashboard reads them.
disable_created_metrics()
# The raw mmserve_encoder_* numbers (the histograms have their mmserve: families only).
_ENCODER_NUMBERS = [f for f in EncoderStats.__struct_fields__
                    if isinstance(getattr(EncoderStats(), f), (int, float))]


def token_buckets(max_len: int) -> list[float]:
    """vLLM's 1-2-5 series up to ``max_len``: the buckets of per-request token counts."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_len:
                return out
            out.append(float(m * scale))
        scale *= 10


class RequestTimer:
    """One engine request's clock, fed each TokenOutput the frontend streams. Times run on the
    frontend's wall clock from the request's arrival_time (set when its prompt was built), so
    TTFT includes tokenizing and waiting for the encoders, as a client sees it."""

    __slots__ = ("m", "arrival", "prompt_tokens", "first", "last", "tokens", "done")

    def __init__(self, metrics: FrontendMetrics, req: GenerateRequest):
        self.m = metrics
        self.arrival = req.arrival_time or time.time()
        self.prompt_tokens = len(req.prompt_token_ids)
        self.first = self.last = 0.0
        self.tokens = 0
        self.done = False

    def output(self, out: TokenOutput) -> None:
        m, now, n = self.m, time.time(), len(out.new_token_ids)
        if n:
            if not self.tokens:
                m.ttft.observe(now - self.arrival)
                m.prompt_tokens.inc(self.prompt_tokens)  # its prefill is done
                self.first = now
            else:
                m.itl.observe(now - self.last)
            self.last = now
            self.tokens += n
            m.generation_tokens.inc(n)
        if out.queue_seconds is not None:
            m.queue.observe(out.queue_seconds)
        if out.finish_reason is not None:
            self.end(out.finish_reason)

    def end(self, reason: str) -> None:
        """The request is over: ``reason`` is the engine's finish reason, "abort" when the
        frontend closed the stream first (client gone, stop string), "error" when it failed."""
        if self.done:
            return
        self.done = True
        m = self.m
        m.success.labels(m.model_name, reason).inc()
        if reason == "error":
            return
        m.e2e.observe(time.time() - self.arrival)
        m.prompt_hist.observe(self.prompt_tokens)
        m.generation_hist.observe(self.tokens)
        if self.tokens > 1:
            m.tpot.observe((self.last - self.first) / (self.tokens - 1))


class FrontendMetrics:
    """The frontend's registry. Wires itself into ``client`` (request timers, the engine's
    beats) and ``pool`` (the encoders' beats); ``frontend_counters`` are OpenAIServing's.
    `exposition` is the body of /metrics."""

    def __init__(self, model_name: str, max_model_len: int, client: EngineClient,
                 pool: EncoderPool | None, frontend_counters: dict[str, float]):
        self.model_name, self.client, self.pool = model_name, client, pool
        self.frontend_counters = frontend_counters
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)

        def hist(name: str, doc: str, buckets: list[float]):
            return Histogram(name, doc, ["model_name"], buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.ttft = hist("mmserve:time_to_first_token_seconds", "Time to first token: from the "
                         "request's arrival at the frontend to its first token.", TTFT_BUCKETS)
        self.itl = hist("mmserve:inter_token_latency_seconds",
                        "Time between two outputs of a request.", TOKEN_LATENCY_BUCKETS)
        self.tpot = hist("mmserve:time_per_output_token_seconds", "A request's mean time per "
                         "output token after the first.", TOKEN_LATENCY_BUCKETS)
        self.e2e = hist("mmserve:e2e_request_latency_seconds", "From the request's arrival at "
                        "the frontend to its last token.", REQUEST_LATENCY_BUCKETS)
        self.queue = hist("mmserve:request_queue_time_seconds", "Time in the engine's queue "
                          "before the first schedule (also waiting for embeddings).",
                          REQUEST_LATENCY_BUCKETS)
        self.prompt_hist = hist("mmserve:request_prompt_tokens", "Prompt tokens per request.",
                                token_buckets(max_model_len))
        self.generation_hist = hist("mmserve:request_generation_tokens",
                                    "Generated tokens per request.", token_buckets(max_model_len))
        self.prompt_tokens = Counter("mmserve:prompt_tokens", "Prefill tokens processed.",
                                     ["model_name"], registry=self.registry).labels(model_name)
        self.generation_tokens = Counter("mmserve:generation_tokens", "Tokens generated.",
                                         ["model_name"], registry=self.registry
                                         ).labels(model_name)
        self.success = Counter("mmserve:request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=self.registry)
        self.engine = Totals(EngineStats, ENGINE_GAUGES)
        self.encoders = Totals(EncoderStats, ENCODER_GAUGES)
        self.registry.register(_Cluster(self))
        client.request_metrics = self
        client.on_stats = lambda engine_id, stats: self.engine.report("engine", engine_id, stats)
        if pool is not None:
            pool.on_stats = self.encoders.report

    def start(self, req: GenerateRequest) -> RequestTimer:
        return RequestTimer(self, req)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Cluster:
    """What the roles reported: their folded totals as mmserve: families, then the raw
    mmserve_* families of before (per encoder, by its index in the pool)."""

    def __init__(self, m: FrontendMetrics):
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m, client, pool = self.m, self.m.client, self.m.pool
        live = pool.live() if pool is not None else []
        yield from RoleCollector(
            m.model_name, engine=lambda: m.engine.snapshot(["engine"]),
            encoder=(lambda: m.encoders.snapshot(live)) if pool is not None else None).collect()
        if pool is not None:
            yield _gauge("mmserve:encoders_live", "Encoders sending heartbeats.", len(live),
                         {"model_name": m.model_name})
        yield from self._legacy(client, pool, live)

    def _legacy(self, client: EngineClient, pool: EncoderPool | None,
                live: list[str]) -> Iterator[Metric]:
        engine = client.health()
        yield _gauge("mmserve_engine_healthy", "1 while the engine serves: heartbeats arrive "
                     "and its TP group is up", int(engine.ok))
        yield _gauge("mmserve_engine_busy", f"1 while an engine step has run longer than "
                     f"{BUSY_AFTER_S:g} s (heartbeats still arrive)", int(engine.state == "busy"))
        yield _gauge("mmserve_engine_step_running_seconds", "how long the engine step in flight "
                     "has run (0 when idle)", round(engine.step_running_s or 0.0, 3))
        for field in EngineStats.__struct_fields__:
            yield _raw(f"mmserve_{field}", f"engine {field.replace('_', ' ')}",
                       field in ENGINE_GAUGES, [({}, getattr(client.stats, field))])
        if pool is not None:
            yield _gauge("mmserve_encoders_live", "encoders sending heartbeats", len(live))
            encoders = list(pool.encoders.values())
            for field in _ENCODER_NUMBERS:
                values = [({"encoder": str(i)}, getattr(e.stats, field))
                          for i, e in enumerate(encoders)]
                yield _raw(f"mmserve_encoder_{field}", f"encoder {field.replace('_', ' ')}",
                           field in ENCODER_GAUGES, values)
        for name, value in self.m.frontend_counters.items():
            yield _raw(f"mmserve_frontend_{name}", f"frontend {name.replace('_', ' ')}", False,
                       [({}, value)])


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    g = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    g.add_metric(list((labels or {}).values()), value)
    return g


def _raw(name: str, doc: str, gauge: bool, values: list[tuple[dict[str, str], float]]) -> Metric:
    m = GaugeMetricFamily(name, doc) if gauge else UnknownMetricFamily(name, doc)
    for labels, value in values:
        m.add_sample(name, labels, value)
    return m
