"""LLaVA-OneVision end to end: greedy parity with transformers through LLM.generate (one odd
image, several sizes in one prompt, interleaved text; a video, a video with an image), LLM.chat
and HTTP; swapping the images or reversing the frames changes the answer.

As in transformers' processor, a prompt's single image is tiled (anyres) and each image of a
multi-image prompt is its base tile alone (`ItemGeometry.variant` "base"), so the reference
passes the prompt's images as one sample (``batch_num_images``). A video's reference pixels are
each frame's base tile from the PIL image processor (the video processor needs torchvision),
handed to the model as ``pixel_values_videos``."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
import transformers
from llava_utils import png
from PIL import Image
from test_qwen2_video import decoded, frames, mp4, pil

from frontend import LLM, SamplingParams

N = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
IMAGE, VIDEO = "<image>", "<video>"


def image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A random RGB image of (height, width) ``size``."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), np.uint8))


ODD = image(1, (37, 91))  # 1x3 tiles, padding cut
SHRUNK, PLAIN = image(2, (40, 50)), image(3, (30, 60))  # 2x2 tiles past the budget; 1x2 as is
TALL = image(4, (97, 29))


class HFOnevision:
    """transformers' greedy answer; each ``<image>`` widened to its image's feature rows and
    ``<video>`` to the video's, as the processor does (the processor itself needs torchvision
    for its video half)."""

    def __init__(self, path: str):
        self.tok = transformers.AutoTokenizer.from_pretrained(path)
        self.images = transformers.LlavaOnevisionImageProcessorPil.from_pretrained(path)
        self.model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32).eval()
        self.token = self.model.config.image_token_id
        self.video_token = self.model.config.video_token_id

    def chat_prompt(self, content: list[dict]) -> str:
        parts = [p if p["type"] == "text" else
                 {"type": "video" if p["type"].startswith("video") else "image"} for p in content]
        return self.tok.apply_chat_template([{"role": "user", "content": parts}],
                                            add_generation_prompt=True, tokenize=False)

    def greedy(self, prompt: str, images: list[Image.Image], n: int,
               video: list[Image.Image] | None = None) -> list[int]:
        """``video``: the sampled frames of the prompt's one video."""
        ids = self.tok.encode(prompt, add_special_tokens=False)
        kw, counts = {}, {self.token: [], self.video_token: []}
        if images:
            inputs = self.images(images=[images], return_tensors="pt")  # one sample of n images
            kw = {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"],
                  "batch_num_images": inputs["batch_num_images"]}
            with torch.no_grad():
                rows = self.model.model.get_image_features(**kw).pooler_output
            counts[self.token] = [r.shape[0] for r in rows]
        if video:
            # each frame's base tile (the processor's first tile: the whole frame resized)
            tiles = [self.images(f, return_tensors="pt")["pixel_values"][0][0] for f in video]
            kw["pixel_values_videos"] = torch.stack(tiles)[None]  # [1, frames, 3, side, side]
            with torch.no_grad():
                rows = self.model.model.get_video_features(
                    kw["pixel_values_videos"], vision_feature_layer=-1,
                    vision_feature_select_strategy="full").pooler_output
            counts[self.video_token] = [rows.shape[1]]
        widened, taken = [], dict.fromkeys(counts, 0)
        for tok, c in counts.items():
            assert ids.count(tok) == len(c)
        for t in ids:
            if t in counts:
                widened.extend([t] * counts[t][taken[t]])
                taken[t] += 1
            else:
                widened.append(t)
        input_ids = torch.tensor([widened])
        # ignore_eos: EOS may be the argmax and generation goes on. No eos ids (not
        # min_new_tokens, which would forbid EOS and pick the runner-up) says the same to HF.
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=n, do_sample=False, eos_token_id=[], **kw)
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


def test_video_generate_parity(llm, hf):
    """In-memory frames (all kept): a video alone, a video after a (tiled) image, and the first
    video reversed, which must answer otherwise (frame order reaches the LM)."""
    clip, odd = frames(2), frames(1, num=3, size=(45, 150))
    cases = [
        (f"{VIDEO}What happens?", {"video": clip}, [], clip),
        (f"{IMAGE} then {VIDEO} now", {"image": [ODD], "video": odd}, [ODD], odd),
        (f"{VIDEO}What happens?", {"video": clip[::-1].copy()}, [], clip[::-1]),
    ]
    outs = llm.generate([{"prompt": p, "multi_modal_data": data} for p, data, _, _ in cases],
                        GREEDY)
    got = [o.outputs[0].token_ids for o in outs]
    # 4 frames, each 4x4 features pooled to 2x2, then one newline row
    assert outs[0].prompt_token_ids.count(hf.video_token) == 4 * 2 * 2 + 1
    assert got == [hf.greedy(p, imgs, N, pil(v)) for p, _, imgs, v in cases]
    assert got[0] != got[2], "reversing the frames must change the answer"


def test_video_chat_parity(llm, hf):
    """LLM.chat with an mp4 as a data URL (decoded by the encoder, every frame sampled) and a
    PIL image."""
    data = mp4(frames(3, num=5, size=(40, 70)))
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    content = [{"type": "text", "text": "Watch"}, {"type": "video_url", "video_url": {"url": url}},
               {"type": "text", "text": "and see"}, {"type": "image_pil", "image_pil": TALL}]
    out = llm.chat([{"role": "user", "content": content}], GREEDY)[0]
    want = hf.greedy(hf.chat_prompt(content), [TALL], N, decoded(data))
    assert out.outputs[0].token_ids == want


@pytest.mark.slow
def test_http_parity(ckpt, hf, tmp_path):
    """Over HTTP with the official openai client: one tiled image, then two (base tiles), then
    a file:// mp4 sampled to 4 of its 10 frames (--media-io-kwargs) with an image."""
    import openai
    from server_utils import Server

    data = mp4(frames(5, num=10, size=(40, 150)))
    (tmp_path / "clip.mp4").write_bytes(data)
    srv = Server(ckpt, "--max-num-batched-tokens", "32", "--allowed-local-media-path",
                 str(tmp_path), "--media-io-kwargs", '{"video": {"num_frames": 4}}',
                 "--limit-mm-per-prompt", '{"image": 2, "video": 1}')
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
        content = [{"type": "video_url", "video_url": {"url": f"file://{tmp_path}/clip.mp4"}},
                   part(PLAIN), {"type": "text", "text": "What changed?"}]
        resp = client.chat.completions.create(
            model=model, max_tokens=N, temperature=0, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": content}])
        sampled = [decoded(data)[i] for i in (0, 2, 5, 7)]  # arange(4) * 10 // 4
        want = hf.greedy(hf.chat_prompt(content), [PLAIN], N, sampled)
        assert resp.choices[0].message.content == hf.tok.decode(
            want, skip_special_tokens=True) != ""
    finally:
        srv.stop()
