"""LLaVA-NeXT end to end: greedy parity with transformers through LLM.generate (one odd image,
two images of different sizes in one prompt, interleaved text), LLM.chat and HTTP with the openai
client; swapping the two images changes the answer.

The reference is transformers' own LlavaNextProcessor (its PIL image processor: the default one
needs torchvision), so the placeholder widening is transformers' count, not ours."""

from __future__ import annotations

import base64

import pytest
import torch
import transformers
from llava_utils import image, png

from frontend import LLM, SamplingParams

N = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
IMAGE = "<image>"

ODD = image(1, (37, 91))  # 1x3 tiles, rows cut
TALL, SQUARE = image(2, (91, 37)), image(3, (40, 50))  # 3x1 cut; 2x2, columns cut


class HFLlavaNext:
    def __init__(self, path: str):
        tok = transformers.AutoTokenizer.from_pretrained(path)
        self.model = transformers.LlavaNextForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32).eval()
        cfg = self.model.config
        self.proc = transformers.LlavaNextProcessor(
            image_processor=transformers.LlavaNextImageProcessorPil.from_pretrained(path),
            tokenizer=tok, patch_size=cfg.vision_config.patch_size,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            num_additional_image_tokens=1)
        self.tok = tok

    def chat_prompt(self, content: list[dict]) -> str:
        parts = [{"type": "image"} if p["type"] != "text" else p for p in content]
        return self.tok.apply_chat_template([{"role": "user", "content": parts}],
                                            add_generation_prompt=True, tokenize=False)

    def greedy(self, prompt: str, images: list, n: int) -> list[int]:
        inputs = self.proc(text=prompt, images=images, return_tensors="pt",
                           add_special_tokens=False)
        with torch.no_grad():
            # no eos ids: ignore_eos lets EOS through, min_new_tokens would forbid it
            out = self.model.generate(**inputs, max_new_tokens=n, do_sample=False,
                                      eos_token_id=[])
        return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    from frontend.random_llava_next import build_random_llava_next

    return str(build_random_llava_next(tmp_path_factory.mktemp("llava_next")))


@pytest.fixture(scope="module")
def hf(ckpt):
    return HFLlavaNext(ckpt)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, max_num_batched_tokens=32)  # prompts span several prefill chunks


def test_generate_parity(llm, hf):
    cases = [
        (f"{IMAGE}What is this?", [ODD]),
        (f"Compare {IMAGE} with {IMAGE} now", [TALL, SQUARE]),
        (f"Compare {IMAGE} with {IMAGE} now", [SQUARE, TALL]),
    ]
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": imgs}} for p, imgs in cases],
                        GREEDY)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == [hf.greedy(p, imgs, N) for p, imgs in cases]
    assert got[1] != got[2], "swapping the images must change the answer"
    # every image tiled, one or two per prompt: 16 base rows + the unpadded map + newlines
    assert outs[1].prompt_token_ids.count(hf.model.config.image_token_id) == 66 + 70


def test_chat_parity(llm, hf):
    url = "data:image/png;base64," + base64.b64encode(png(TALL)).decode()
    content = [{"type": "text", "text": "Look:"}, {"type": "image_pil", "image_pil": ODD},
               {"type": "text", "text": "and"}, {"type": "image_url", "image_url": {"url": url}}]
    out = llm.chat([{"role": "user", "content": content}], GREEDY)[0]
    assert out.outputs[0].token_ids == hf.greedy(hf.chat_prompt(content), [ODD, TALL], N)


@pytest.mark.slow
def test_http_parity(ckpt, hf):
    """Over HTTP with the official openai client: one odd image, then two of different sizes."""
    import openai
    from server_utils import Server

    srv = Server(ckpt, "--max-num-batched-tokens", "32")
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id

        def part(img):
            return {"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(png(img)).decode()}}

        for images in ([ODD], [SQUARE, TALL]):
            content = [part(img) for img in images] + [{"type": "text", "text": "Describe."}]
            resp = client.chat.completions.create(
                model=model, max_tokens=N, temperature=0, extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": content}])
            want = hf.greedy(hf.chat_prompt(content), images, N)
            assert resp.choices[0].message.content == hf.tok.decode(
                want, skip_special_tokens=True) != ""
    finally:
        srv.stop()
