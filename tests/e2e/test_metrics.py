"""Issue 10, acceptance 5: a real server's /metrics parses with prometheus_client's parser and its
histograms move under load (text, an image, the same image again, a stream); every role serves
the same mmserve: names on its own --metrics-port."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time

import openai
import pytest
from llava_utils import image, png
from prometheus_client.parser import text_string_to_metric_families
from server_utils import Server, get

from protocol.addresses import free_port, tcp

pytestmark = pytest.mark.slow
N = 6  # tokens per request

COUNTERS = ["prompt_tokens", "generation_tokens", "request_success", "num_preemptions",
            "prefix_cache_queries", "prefix_cache_hits", "embedding_cache_hits",
            "embedding_cache_misses"]
GAUGES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
          "encoders_live", "embedding_cache_bytes"]
HISTOGRAMS = ["time_to_first_token_seconds", "time_per_output_token_seconds",
              "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "request_prompt_tokens", "request_generation_tokens",
              "encoder_batch_size", "encoder_latency_seconds"]
Samples = list[tuple[str, dict[str, str], float]]


def scrape(url: str) -> tuple[dict[str, str], Samples]:
    """{family: type} and every sample, through prometheus_client's own parser."""
    status, body = get(url, 5.0)
    assert status == 200, body
    families = list(text_string_to_metric_families(body.decode()))
    return ({f.name: f.type for f in families},
            [(s.name, s.labels, s.value) for f in families for s in f.samples])


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and labels.items() <= lab.items())


def buckets(samples: Samples, name: str) -> list[tuple[float, float]]:
    return sorted((float(lab["le"]), v) for n, lab, v in samples if n == name + "_bucket")


def data_url(seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image(seed))).decode()


@pytest.fixture(scope="module")
def server(tiny_llava):
    srv = Server(tiny_llava, "--encoders", "1")
    yield srv
    srv.stop()


def test_metrics_parse_and_histograms_move_under_load(server):
    types, before = scrape(server.base + "/metrics")
    for name in COUNTERS:
        assert types["mmserve:" + name] == "counter", name
    for name in GAUGES:
        assert types["mmserve:" + name] == "gauge", name
    for name in HISTOGRAMS:
        assert types["mmserve:" + name] == "histogram", name
    assert "mmserve_num_steps" in types  # the raw numbers bench/ reads are still there

    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    picture = {"type": "image_url", "image_url": {"url": data_url(11)}}
    contents = ["Hello there", "Tell me more", [picture, {"type": "text", "text": "What?"}],
                [picture, {"type": "text", "text": "Again?"}]]  # the same picture: a cache hit
    prompt_tokens = 0
    for content in contents:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=N,
            temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == N
        prompt_tokens += r.usage.prompt_tokens
    stream = client.completions.create(model=model, prompt="Once upon", max_tokens=N,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    usage = [c.usage for c in stream if c.usage is not None]
    assert usage[-1].completion_tokens == N
    prompt_tokens += usage[-1].prompt_tokens
    requests = len(contents) + 1

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    deadline = time.monotonic() + 10
    while True:  # the roles' numbers come with their heartbeats
        _, after = scrape(server.base + "/metrics")
        if (grew("mmserve:embedding_cache_hits_total") > 0
                and grew("mmserve:prefix_cache_queries_total") > 0):
            break
        assert time.monotonic() < deadline, "the encoder's or the engine's stats never arrived"
        time.sleep(0.2)

    for h in ["time_to_first_token_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "time_per_output_token_seconds",
              "request_prompt_tokens", "request_generation_tokens"]:
        assert grew(f"mmserve:{h}_count") == requests, h
        assert grew(f"mmserve:{h}_sum") > 0, h
    assert grew("mmserve:inter_token_latency_seconds_count") == requests * (N - 1)
    assert grew("mmserve:request_generation_tokens_sum") == requests * N
    assert grew("mmserve:generation_tokens_total") == requests * N
    assert grew("mmserve:prompt_tokens_total") == prompt_tokens
    assert grew("mmserve:request_prompt_tokens_sum") == prompt_tokens
    assert grew("mmserve:request_success_total", finished_reason="length") == requests
    # One picture, encoded once in one batch of one; its second use hit the store.
    assert grew("mmserve:encoder_batch_size_count") == 1
    assert grew("mmserve:encoder_batch_size_sum") == 1
    assert grew("mmserve:encoder_latency_seconds_count") == 1
    assert grew("mmserve:encoder_latency_seconds_sum") > 0
    assert grew("mmserve:embedding_cache_misses_total") == 1
    assert grew("mmserve:embedding_cache_hits_total") == 1
    assert total(after, "mmserve:embedding_cache_bytes") > 0
    assert total(after, "mmserve:encoders_live") == 1
    assert 0 <= total(after, "mmserve:kv_cache_usage_perc") <= 1
    for h in HISTOGRAMS:  # cumulative buckets that end in +Inf == count
        got = buckets(after, "mmserve:" + h)
        assert [v for _, v in got] == sorted(v for _, v in got), h
        assert got[-1] == (float("inf"), total(after, f"mmserve:{h}_count")), h
    # Under load a finite TTFT bucket moved too (the CPU server answers within 2560 s).
    ttft = dict(buckets(after, "mmserve:time_to_first_token_seconds"))
    assert ttft[2560.0] - dict(buckets(before, "mmserve:time_to_first_token_seconds"))[2560.0] \
        == requests


def _wait_scrape(url: str, procs: list[subprocess.Popen], timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        status, _ = get(url, 1.0)
        if status == 200:
            return scrape(url)
        assert all(p.poll() is None for p in procs), "a role exited"
        assert time.monotonic() < deadline, f"{url} never answered"
        time.sleep(0.3)


def test_every_role_serves_its_own_metrics(tiny_llava):
    engine_addr, encoder_addr = tcp(), tcp()
    engine_port, encoder_port, http_port = free_port(), free_port(), free_port()
    cli = [sys.executable, "-m", "frontend.cli"]
    env = dict(os.environ, MMSERVE_LOG_LEVEL="WARNING")
    argvs = [["llm-worker", "--model", tiny_llava, "--input-addr", engine_addr,
              "--metrics-port", str(engine_port)],
             ["encoder", "--model", tiny_llava, "--input-addr", encoder_addr,
              "--metrics-port", str(encoder_port)],
             ["frontend", "--model", tiny_llava, "--engine-addr", engine_addr,
              "--encoder-addrs", encoder_addr, "--port", str(http_port)]]
    procs = [subprocess.Popen(cli + a, env=env, start_new_session=True) for a in argvs]
    try:
        engine_url = f"http://127.0.0.1:{engine_port}/metrics"
        encoder_url = f"http://127.0.0.1:{encoder_port}/metrics"
        types, _ = _wait_scrape(engine_url, procs)
        assert types["mmserve:num_requests_running"] == "gauge"
        assert types["mmserve:prefix_cache_queries"] == "counter"
        assert "process_cpu_seconds" in types  # the process collector rides along
        types, enc_before = _wait_scrape(encoder_url, procs)
        assert types["mmserve:encoder_batch_size"] == "histogram"
        base = f"http://127.0.0.1:{http_port}"
        while get(base + "/health", 1.0)[0] != 200:
            assert all(p.poll() is None for p in procs), "a role exited"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        client.chat.completions.create(
            model=client.models.list().data[0].id, max_tokens=2, messages=[{
                "role": "user", "content": [{"type": "image_url",
                                             "image_url": {"url": data_url(12)}}]}])
        _, enc = scrape(encoder_url)  # read live: the reply came after the embedding
        assert total(enc, "mmserve:encoder_batch_size_count") == 1
        assert total(enc, "mmserve:encoder_latency_seconds_count") == 1
        assert total(enc, "mmserve:embedding_cache_misses_total") == 1
        deadline = time.monotonic() + 5
        while True:  # the engine's numbers: its busy loop's snapshot, renewed every 0.2 s
            _, eng = scrape(engine_url)
            if total(eng, "mmserve:prefix_cache_queries_total") > 0:
                break
            assert time.monotonic() < deadline, eng
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_a_stop_string_counts_as_stop(server):
    """A request the frontend ends on a stop string is a `stop` success, not an `abort`."""
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    kw = dict(model=model, prompt="Once upon a time", max_tokens=N, temperature=0,
              extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    assert len(text) >= 4, text  # greedy on the tiny model: a few characters to stop on
    stop = text[len(text) // 2:len(text) // 2 + 2]
    _, before = scrape(server.base + "/metrics")
    r = client.completions.create(**kw, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    _, after = scrape(server.base + "/metrics")
    for reason, want in (("stop", 1), ("abort", 0)):
        grew = (total(after, "mmserve:request_success_total", finished_reason=reason)
                - total(before, "mmserve:request_success_total", finished_reason=reason))
        assert grew == want, reason
