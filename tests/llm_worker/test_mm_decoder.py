"""The decoder's half of images: embeddings (as an encoder would push them) replace the
placeholder positions; greedy tokens equal transformers' LLaVA; requests wait for their keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from llm_worker.config import LLMWorkerConfig
from llm_worker.engine import EngineCore
from protocol.messages import GenerateRequest, MMItem, Sampling


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from frontend.random_model import build_random_llava

    path = str(build_random_llava(tmp_path_factory.mktemp("llava")))
    proc = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return path, proc, model


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 50, 3), np.uint8))


def hf_features(model, pixel_values) -> torch.Tensor:
    feats = model.get_image_features(pixel_values=pixel_values)
    feats = getattr(feats, "pooler_output", feats)
    if isinstance(feats, (list, tuple)):
        feats = torch.cat(list(feats))
    return feats.reshape(pixel_values.shape[0], -1, feats.shape[-1]).detach()


def mm_items(ids: list[int], image_token: int, keys: list[str]) -> list[MMItem]:
    items, i = [], 0
    while i < len(ids):
        if ids[i] == image_token:
            j = i
            while j < len(ids) and ids[j] == image_token:
                j += 1
            items.append(MMItem(keys[len(items)], "image", i, j - i))
            i = j
        else:
            i += 1
    return items


def run(core: EngineCore, reqs: list[GenerateRequest]) -> dict[str, list[int]]:
    for r in reqs:
        assert core.add_request(r) is None
    out: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    for _ in range(500):
        if not core.has_work():
            break
        for o in core.step():
            out[o.request_id] += o.new_token_ids
    return out


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_llava_decoder_parity_and_waiting_for_embeddings(llava, async_scheduling):
    path, proc, model = llava
    image_token = model.config.image_token_index
    core = EngineCore(LLMWorkerConfig(model=path, max_num_batched_tokens=24,
                                      async_scheduling=async_scheduling))
    cases = [  # (prompt, images): one image, two images, text interleaved
        ("<image>What is this?", [image(0)]),
        ("Compare <image> and <image> please", [image(1), image(2)]),
        ("<image>What is this?", [image(3)]),
    ]
    reqs, want = [], {}
    feats_by_key = {}
    for n, (prompt, imgs) in enumerate(cases):
        inputs = proc(images=imgs, text=prompt, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        feats = hf_features(model, inputs["pixel_values"])
        keys = [f"blake3:case{n}-{k}" for k in range(len(imgs))]
        feats_by_key.update(zip(keys, feats))
        g = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=[])
        want[f"r{n}"] = g[0, len(ids):].tolist()
        reqs.append(GenerateRequest(f"r{n}", ids, Sampling(max_tokens=8, temperature=0.0,
                                                           ignore_eos=True),
                                    [], "", mm_items=mm_items(ids, image_token, keys)))
    assert len(reqs[1].mm_items) == 2 and len(reqs[1].prompt_token_ids) > 24  # chunked
    for r in reqs:
        assert core.add_request(r) is None
    # No embedding yet: text before the first image may prefill, but nothing is generated.
    for _ in range(5):
        assert core.step() == []
    for key, f in feats_by_key.items():
        assert core.add_embedding(key, f.clone()) is None
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    while core.has_work():
        for o in core.step():
            got[o.request_id] += o.new_token_ids
    assert got == want
    assert got["r0"] != got["r2"], "different images must give different answers"
    # Every key released and dropped from the worker once the requests finished.
    assert core.embeds.refs == {} and core.worker_keys == set()
    assert core.kv.num_free_blocks == core.kv.num_total_blocks


def test_bad_embeddings_are_refused(llava):
    path, _, model = llava
    core = EngineCore(LLMWorkerConfig(model=path))
    hidden = model.config.text_config.hidden_size
    assert core.add_embedding("k", torch.zeros(4, hidden + 1)) is not None
    assert core.add_embedding("k", torch.zeros(4, hidden, dtype=torch.int64)) is not None
    assert core.add_embedding("k", torch.zeros(hidden)) is not None
    # An embedding whose row count doesn't match the prompt's placeholder run fails the request.
    assert core.add_embedding("k", torch.zeros(3, hidden)) is None
    r = GenerateRequest("r", [5] * 10, Sampling(max_tokens=2), [], "",
                        mm_items=[MMItem("k", "image", 2, 4)])
    assert core.add_request(r) is None
    core.step()
    assert core.errors and core.errors[0][0] == "r" and core.errors[0][1] == 400
    assert not core.has_work() and core.embeds.refs == {}


def test_decoder_loads_no_tower_weights(llava):
    """Disaggregation: the decoder role builds and loads only the LM of a LLaVA checkpoint."""
    path, _, model = llava
    core = EngineCore(LLMWorkerConfig(model=path))
    names = [n for n, _ in core.executor.worker.runner.model.named_parameters()]
    assert names and not any("vision" in n or "projector" in n for n in names)
    ours = sum(p.numel() for p in core.executor.worker.runner.model.parameters())
    lm = sum(p.numel() for n, p in model.named_parameters()
             if "vision_tower" not in n and "multi_modal_projector" not in n)
    assert ours == lm


def test_a_lost_embedding_fails_the_requests_waiting_on_it(llava):
    """An embedding sent but unreadable (a device slot overwritten, a bad frame) answers its
    waiting requests 503 instead of leaving them waiting; the others go on."""
    path, _, model = llava
    core = EngineCore(LLMWorkerConfig(model=path))
    hidden = model.config.text_config.hidden_size
    for rid, key in (("r", "k"), ("o", "k2")):
        assert core.add_request(GenerateRequest(rid, [5] * 10, Sampling(max_tokens=2), [], "",
                                                mm_items=[MMItem(key, "image", 2, 4)])) is None
    assert core.step() == []
    core.embedding_lost("k", "slot reused")
    assert [(rid, status) for rid, status, _ in core.errors] == [("r", 503)]
    assert "r" not in core.scheduler.requests and "o" in core.scheduler.requests
    assert core.add_embedding("k2", torch.randn(4, hidden)) is None
    done = []
    while core.has_work():
        done += [o.request_id for o in core.step() if o.finish_reason is not None]
    assert done == ["o"]


def test_a_device_embedding_gives_way_to_its_host_copy_once_the_runner_has_it(llava):
    """The cache holds a device embedding only until the runner takes it (device memory is not
    the cache's budget); the bytes the encoder sends behind it then serve repeats. ('meta'
    stands in for CUDA here.)"""
    path, _, model = llava
    core = EngineCore(LLMWorkerConfig(model=path))
    hidden = model.config.text_config.hidden_size
    assert core.add_request(GenerateRequest("r", [5] * 10, Sampling(max_tokens=2), [], "",
                                            mm_items=[MMItem("k", "image", 2, 4)])) is None
    dev, host = torch.empty(4, hidden, device="meta"), torch.randn(4, hidden)
    assert core.add_embedding("k", dev) is None
    assert core.add_embedding("k", host) is None
    assert core.embeds.get("k") is dev and core.host_copies["k"] is host  # not sent yet
    core.abort(["r"])  # released before a step took it: the host copy takes its place
    assert core.embeds.get("k") is host and not core.host_copies
    free, free_host = torch.empty(4, hidden, device="meta"), torch.randn(4, hidden)
    assert core.add_embedding("free", free) is None
    assert core.add_embedding("free", free_host) is None  # nobody waits for it: at once
    assert core.embeds.get("free") is free_host
    other = torch.randn(3, hidden)  # bytes of another shape are a new embedding, as ever
    assert core.add_embedding("free", other) is None and core.embeds.get("free") is other
