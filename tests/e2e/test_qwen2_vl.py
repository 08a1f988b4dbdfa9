"""Issue 9, Qwen2-VL and Qwen2.5-VL end to end: greedy parity with transformers through
LLM.generate, LLM.chat and HTTP (the official openai client) for one odd-size image, several
images of different sizes and interleaved text; swapping the images changes the answer."""

from __future__ import annotations

import base64

import openai
import pytest
from llava_utils import png
from qwen2_vl_utils import VISION, HFQwen2VL, image
from server_utils import Server

from frontend import LLM, SamplingParams

N = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
ODD = image(1, (37, 90))  # (height, width): a resize on both sides
TALL, WIDE = image(2, (120, 50)), image(3, (33, 101))


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def ckpt(request, tmp_path_factory):
    from frontend.random_model import build_random_qwen2_vl

    return request.param, str(build_random_qwen2_vl(tmp_path_factory.mktemp(request.param),
                                                    arch=request.param))


@pytest.fixture(scope="module")
def hf(ckpt):
    return HFQwen2VL(ckpt[1], ckpt[0])


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt[1], max_num_batched_tokens=16)  # prompts span several prefill chunks


def test_generate_parity(llm, hf):
    cases = [
        (f"{VISION}What is this?", [ODD]),
        (f"Compare {VISION} with {VISION} now", [TALL, WIDE]),
        (f"A {VISION} then text, then {VISION} and {VISION}.", [WIDE, ODD, TALL]),
        (f"Compare {VISION} with {VISION} now", [WIDE, TALL]),
    ]
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": imgs}} for p, imgs in cases],
                        GREEDY)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == [hf.greedy(p, imgs, N) for p, imgs in cases]
    assert got[1] != got[3], "swapping the images must change the answer"


def test_bare_embeddings_are_a_clear_400(llm):
    import torch

    from frontend.errors import RequestError

    embeds = torch.randn(1, 6, llm.media.placeholders.hidden_size)
    with pytest.raises(RequestError, match="image_grid_thw") as e:
        llm.generate({"prompt": f"{VISION}Hi", "multi_modal_data": {"image": embeds}}, GREEDY)
    assert e.value.status == 400
    assert not llm.engine.has_work()


def test_chat_parity(llm, hf):
    url = "data:image/png;base64," + base64.b64encode(png(WIDE)).decode()
    content = [{"type": "text", "text": "Look:"}, {"type": "image_pil", "image_pil": ODD},
               {"type": "text", "text": "and"}, {"type": "image_url", "image_url": {"url": url}}]
    out = llm.chat([{"role": "user", "content": content}], GREEDY)[0]
    assert out.outputs[0].token_ids == hf.greedy(hf.chat_prompt(content), [ODD, WIDE], N)


@pytest.mark.slow
def test_http_parity(ckpt, hf):
    srv = Server(ckpt[1], "--max-num-batched-tokens", "16")
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)
        content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                       + base64.b64encode(png(img)).decode()}}
                   for img in (TALL, ODD)]
        content.insert(1, {"type": "text", "text": "versus"})
        resp = client.chat.completions.create(
            model=client.models.list().data[0].id, max_tokens=N, temperature=0,
            messages=[{"role": "user", "content": content}], extra_body={"ignore_eos": True})
        want = hf.greedy(hf.chat_prompt(content), [TALL, ODD], N)
        assert resp.choices[0].message.content == hf.tok.decode(want, skip_special_tokens=True) != ""
        assert resp.usage.completion_tokens == N
    finally:
        srv.stop()
