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


def test_image_embeds_with_their_grid_equal_the_image(llm, hf):
    import torch

    from frontend.errors import RequestError

    feats, thw = _features(hf, ODD)
    grid = torch.tensor([thw])  # [1, 3], as transformers' processor returns it
    prompt = f"{VISION}What is this?"
    by_image = llm.generate({"prompt": prompt, "multi_modal_data": {"image": ODD}}, GREEDY)
    by_embeds = llm.generate({"prompt": prompt, "multi_modal_data": {
        "image": {"image_embeds": feats, "image_grid_thw": grid}}}, GREEDY)
    assert by_embeds[0].outputs[0].token_ids == by_image[0].outputs[0].token_ids
    t, h, w = thw
    with pytest.raises(RequestError, match="makes .* tokens but image_embeds has") as e:
        llm.generate({"prompt": prompt, "multi_modal_data": {
            "image": {"image_embeds": feats, "image_grid_thw": [t, h + 2, w]}}}, GREEDY)
    assert e.value.param.endswith("image.image_grid_thw")
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
        resp = _ask(client, content)
        want = hf.greedy(hf.chat_prompt(content), [TALL, ODD], N)
        text = hf.tok.decode(want, skip_special_tokens=True)
        assert resp.choices[0].message.content == text != ""
        assert resp.usage.completion_tokens == N
        # The second image as its embeddings + grid (vLLM's wire form: base64 of torch.save).
        feats, grid = _features(hf, ODD)
        content[2] = {"type": "image_embeds", "image_embeds": {
            "image_embeds": _b64_tensor(feats), "image_grid_thw": grid}}
        assert _ask(client, content).choices[0].message.content == text
        content[2]["image_embeds"]["image_grid_thw"] = [grid[0], grid[1], grid[2] + 2]
        with pytest.raises(openai.BadRequestError, match="image_grid_thw"):
            _ask(client, content)
        assert _ask(client, content[:1]).usage.completion_tokens == N  # still serving
    finally:
        srv.stop()


def _ask(client, content):
    return client.chat.completions.create(
        model=client.models.list().data[0].id, max_tokens=N, temperature=0,
        messages=[{"role": "user", "content": content}], extra_body={"ignore_eos": True})


def _features(hf, img):
    """transformers' embeddings of one image [n, hidden] and its grid [t, h, w]."""
    import torch

    inputs = hf.images(images=[img], return_tensors="pt")
    with torch.no_grad():
        feats = hf.model.get_image_features(pixel_values=inputs["pixel_values"],
                                            image_grid_thw=inputs["image_grid_thw"])
    feats = getattr(feats, "pooler_output", feats)
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    return feats, inputs["image_grid_thw"][0].tolist()


def _b64_tensor(t) -> str:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(t.contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode()
