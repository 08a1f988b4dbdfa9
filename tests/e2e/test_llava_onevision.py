"""LLaVA-OneVision end to end: greedy parity with transformers through LLM.generate (one odd
image, several sizes in one prompt, interleaved text) and LLM.chat; swapping the images changes
the answer.

As in transformers' processor, a prompt's single image is tiled (anyres) and each image of a
multi-image prompt is its base tile alone (`ItemGeometry.variant` "base"), so the reference
passes the prompt's images as one sample (``batch_num_images``)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
import transformers
from llava_utils import png
from PIL import Image

from frontend import LLM, SamplingParams

N = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
IMAGE = "<image>"


def image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A random RGB image of (height, width) ``size``."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), np.uint8))


ODD = image(1, (37, 91))  # 1x3 tiles, padding cut
SHRUNK, PLAIN = image(2, (40, 50)), image(3, (30, 60))  # 2x2 tiles past the budget; 1x2 as is
TALL = image(4, (97, 29))


class HFOnevision:
    """transformers' greedy answer; each ``<image>`` widened to its image's feature rows, as the
    processor does (the processor itself needs torchvision for its video half)."""

    def __init__(self, path: str):
        self.tok = transformers.AutoTokenizer.from_pretrained(path)
        self.images = transformers.LlavaOnevisionImageProcessorPil.from_pretrained(path)
        self.model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32).eval()
        self.token = self.model.config.image_token_id

    def chat_prompt(self, content: list[dict]) -> str:
        parts = [{"type": "image"} if p["type"] != "text" else p for p in content]
        return self.tok.apply_chat_template([{"role": "user", "content": parts}],
                                            add_generation_prompt=True, tokenize=False)

    def greedy(self, prompt: str, images: list[Image.Image], n: int) -> list[int]:
        ids = self.tok.encode(prompt, add_special_tokens=False)
        inputs = self.images(images=[images], return_tensors="pt")  # one sample of n images
        kw = {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"],
              "batch_num_images": inputs["batch_num_images"]}
        with torch.no_grad():
            rows = self.model.model.get_image_features(**kw).pooler_output
        counts = [r.shape[0] for r in rows]
        assert ids.count(self.token) == len(counts)
        widened, k = [], 0
        for t in ids:
            widened.extend([t] * (counts[k] if t == self.token else 1))
            k += t == self.token
        input_ids = torch.tensor([widened])
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
        return out[0, len(widened):].tolist()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    from frontend.random_onevision import build_random_llava_onevision

    return str(build_random_llava_onevision(tmp_path_factory.mktemp("onevision")))


@pytest.fixture(scope="module")
def hf(ckpt):
    return HFOnevision(ckpt)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, max_num_batched_tokens=32)  # prompts span several prefill chunks


def test_generate_parity(llm, hf):
    cases = [
        (f"{IMAGE}What is this?", [ODD]),
        (f"Compare {IMAGE} with {IMAGE} now", [SHRUNK, PLAIN]),
        (f"A {IMAGE} then text, then {IMAGE} and {IMAGE}.", [TALL, ODD, SHRUNK]),
        (f"Compare {IMAGE} with {IMAGE} now", [PLAIN, SHRUNK]),
    ]
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": imgs}} for p, imgs in cases],
                        GREEDY)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == [hf.greedy(p, imgs, N) for p, imgs in cases]
    assert got[1] != got[3], "swapping the images must change the answer"


def test_chat_parity(llm, hf):
    url = "data:image/png;base64," + base64.b64encode(png(PLAIN)).decode()
    content = [{"type": "text", "text": "Look:"}, {"type": "image_pil", "image_pil": ODD},
               {"type": "text", "text": "and"}, {"type": "image_url", "image_url": {"url": url}}]
    out = llm.chat([{"role": "user", "content": content}], GREEDY)[0]
    assert out.outputs[0].token_ids == hf.greedy(hf.chat_prompt(content), [ODD, PLAIN], N)


@pytest.mark.slow
def test_http_parity(ckpt, hf):
    """Over HTTP with the official openai client: one tiled image, then two (base tiles)."""
    import openai
    from server_utils import Server

    srv = Server(ckpt, "--max-num-batched-tokens", "32")
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id

        def part(img):
            return {"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(png(img)).decode()}}

        for images in ([ODD], [TALL, PLAIN]):
            content = [part(img) for img in images] + [{"type": "text", "text": "Describe."}]
            resp = client.chat.completions.create(
                model=model, max_tokens=N, temperature=0, extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": content}])
            want = hf.greedy(hf.chat_prompt(content), images, N)
            assert resp.choices[0].message.content == hf.tok.decode(
                want, skip_special_tokens=True) != ""
    finally:
        srv.stop()
