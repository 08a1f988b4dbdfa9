"""Issue 10, several frontends: two `mmserve frontend` processes on their own ports, one engine,
an encoder that joined the registry; the official openai client through both. Each frontend
gets the outputs of its own requests only, and a uuid sent through one is reused through the
other: Qwen2-VL sizes an image by its pixels, so the second frontend must find the item (and
the geometry it was sized by) in the encoder's store, not in its own memory."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from cluster_utils import Cluster, encoder_stats, wait_encoders, wait_healthy
from llava_utils import png
from qwen2_vl_utils import image

pytestmark = pytest.mark.slow
N = 6


@pytest.fixture(scope="module")
def fronts(tiny_qwen2_vl):
    cluster = Cluster(tiny_qwen2_vl)
    try:
        registry = cluster.registry()
        engine = cluster.engine("--max-num-batched-tokens", "64")
        encoder, _ = cluster.encoder(registry)
        bases = [cluster.frontend(engine, registry) for _ in range(2)]
        for base in bases:
            wait_healthy(base)
            wait_encoders(base, 1, 60)
        yield bases, encoder
    finally:
        cluster.close()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def ask(c: openai.OpenAI, content: list[dict]) -> str:
    out = c.chat.completions.create(model=c.models.list().data[0].id, max_tokens=N,
                                    messages=[{"role": "user", "content": content}],
                                    temperature=0, extra_body={"ignore_eos": True})
    return out.choices[0].message.content or ""


def picture(seed: int, size=(37, 90), uuid: str | None = None) -> dict:
    url = "data:image/png;base64," + base64.b64encode(png(image(seed, size))).decode()
    part: dict = {"type": "image_url", "image_url": {"url": url}}
    return {**part, "uuid": uuid} if uuid else part


def by_uuid(uuid: str) -> dict:
    return {"type": "image_url", "image_url": None, "uuid": uuid}


def test_each_frontend_serves_text_and_images_concurrently(fronts):
    bases, _ = fronts
    text = [{"type": "text", "text": "Say something"}]
    with_image = [picture(7), {"type": "text", "text": "What is it?"}]
    # The same questions through both at once: each answer reaches the frontend that asked
    # (a wrong reply_to would leave the other one waiting), and greedy answers agree.
    jobs = [(b, content) for b in bases for content in (text, with_image)] * 3
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: ask(client(j[0]), j[1]), jobs))
    by_question = {}
    for (_, content), answer in zip(jobs, answers):
        by_question.setdefault(id(content), set()).add(answer)
    assert all(len(a) == 1 and "" not in a for a in by_question.values()), by_question


def test_a_uuid_sent_through_one_frontend_is_reused_through_the_other(fronts):
    (a, b), encoder = fronts
    question = {"type": "text", "text": "Describe"}
    first = ask(client(a), [picture(11, (120, 50), uuid="shared-11"), question])
    hits = encoder_stats(encoder).num_cache_hits
    # Frontend b never saw the image: it asks the owner's store for the item and its size.
    assert ask(client(b), [by_uuid("shared-11"), question]) == first
    assert encoder_stats(encoder).num_cache_hits == hits + 1
    assert ask(client(a), [by_uuid("shared-11"), question]) == first
    with pytest.raises(openai.BadRequestError) as e:  # nobody holds this one: a clean 400
        ask(client(b), [by_uuid("never-sent"), question])
    assert "uuid" in e.value.message
