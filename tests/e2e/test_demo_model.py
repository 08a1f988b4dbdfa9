"""Issue 4: the built-in demo model really sees. Through the HTTP server (`mmserve serve` with no
MODEL), on freshly generated held-out pictures (seeds training and model selection never used),
colour and shape questions are answered right >= 95% of the time and counts >= 90%; and
transformers gives the same greedy answers (parity)."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import openai
import pytest
from server_utils import Server

from frontend.random_model import DEMO_MODEL, demo_model_path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "demo_model"))
import shapes  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(demo_model_path() is None, reason="no demo checkpoint")]
N = 60  # per category; start=5000 is beyond every index used in training or evaluation


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server():
    srv = Server("", "--max-num-seqs", "16", no_model=True)
    yield srv
    srv.stop()


def ask(client, sample) -> str:
    r = client.chat.completions.create(
        model=DEMO_MODEL, max_tokens=24, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(sample.image)}},
            {"type": "text", "text": sample.question}]}])
    return r.choices[0].message.content


@pytest.mark.parametrize("category,threshold", [("shape", 0.95), ("colour", 0.95),
                                                ("count", 0.90)])
def test_demo_model_answers_held_out_pictures(server, category, threshold):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    samples = list(shapes.heldout_samples(category, N, start=5000))
    answers = [ask(client, s) for s in samples]
    right = sum(shapes.is_correct(a, s) for a, s in zip(answers, samples))
    assert right / N >= threshold, (category, right, list(zip(answers, samples))[:5])
    assert len(set(answers)) > 1  # not one canned answer


def test_transformers_gives_the_same_answers():
    import torch
    import transformers

    from frontend import LLM, SamplingParams

    path = str(demo_model_path())
    proc = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    llm = LLM()
    params = SamplingParams(temperature=0.0, max_tokens=24)
    for cat in ("shape", "colour", "count", "describe"):
        for s in shapes.heldout_samples(cat, 5, start=6000):
            msgs = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": s.question}]}]
            prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
            inputs = proc(images=s.image, text=prompt, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
            want = out[0, inputs["input_ids"].shape[1]:].tolist()
            got = llm.chat([{"role": "user", "content": [
                {"type": "image_pil", "image_pil": s.image},
                {"type": "text", "text": s.question}]}], params)[0].outputs[0]
            eos = proc.tokenizer.eos_token_id
            assert got.token_ids == want[: want.index(eos) + 1 if eos in want else None]
