"""Video input for Qwen2-VL and Qwen2.5-VL end to end: greedy parity with transformers through
LLM.generate (in-memory frames; a video with an image) and HTTP (an mp4 as a data URL, decoded
by the encoder process); the same frames reversed give another answer, so frame order reaches
the tower and M-RoPE.

Every video here has a temporal position (Qwen2.5-VL: scaled by time, 4 tokens/s) below its
merged rows and columns: past that, text after a video sits past its last frame (Qwen's
reference and vLLM, `protocol/geometry/mrope.py`) where transformers 5 restarts it lower, so the
answers differ by design. In-memory frames count as 2 fps (one second per grid step), hence
short clips; the mp4 runs at 16 fps."""

from __future__ import annotations

import base64
import io

import av
import numpy as np
import openai
import pytest
from PIL import Image
from qwen2_vl_utils import VISION, HFQwen2VL, image
from server_utils import Server

from frontend import LLM, SamplingParams

N = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
IN_MEMORY_FPS = 2  # frontend.media.video.IN_MEMORY_FPS


def frames(seed: int, num: int = 4, size=(50, 140)) -> np.ndarray:
    """[num, H, W, 3] uint8: random noise over a moving gradient, so frames differ."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, size[1], dtype=np.float32)[None, :, None]
    out = [np.clip(rng.integers(0, 56, (*size, 3)) + np.roll(ramp, 5 * i, axis=1), 0, 255)
           for i in range(num)]
    return np.stack(out).astype(np.uint8)


def mp4(video: np.ndarray, rate: int = 16) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=rate)
        s.width, s.height, s.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        for f in video:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    return buf.getvalue()


def decoded(data: bytes) -> list[Image.Image]:
    with av.open(io.BytesIO(data)) as c:
        return [f.to_image() for f in c.decode(c.streams.video[0])]


def pil(video: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(f) for f in video]


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
    odd = frames(1, num=3, size=(45, 150))  # an odd count: the last frame fills the patch
    clip = frames(2)
    cases = [
        (f"{VIDEO}What happens?", {"video": clip}, [], [(pil(clip), IN_MEMORY_FPS)]),
        (f"{VISION} then {VIDEO} now", {"image": [image(3, (40, 60))], "video": odd},
         [image(3, (40, 60))], [(pil(odd), IN_MEMORY_FPS)]),
        (f"{VIDEO}What happens?", {"video": clip[::-1].copy()}, [],
         [(pil(clip[::-1]), IN_MEMORY_FPS)]),
    ]
    outs = llm.generate([{"prompt": p, "multi_modal_data": data} for p, data, _, _ in cases],
                        GREEDY)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == [hf.greedy(p, imgs, N, videos) for p, _, imgs, videos in cases]
    assert got[0] != got[2], "reversing the frames must change the answer"


def test_video_list_of_frames_and_uuid_reuse(llm, hf):
    clip = frames(4)
    prompt = f"{VIDEO}Again?"
    first = llm.generate({"prompt": prompt, "multi_modal_data": {"video": pil(clip)},
                          "multi_modal_uuids": {"video": ["clip-4"]}}, GREEDY)
    again = llm.generate({"prompt": prompt, "multi_modal_data": {"video": [None]},
                          "multi_modal_uuids": {"video": ["clip-4"]}}, GREEDY)
    want = hf.greedy(prompt, [], N, [(pil(clip), IN_MEMORY_FPS)])
    assert first[0].outputs[0].token_ids == again[0].outputs[0].token_ids == want


@pytest.mark.slow
def test_http_parity(ckpt, hf):
    clip = frames(5, num=10, size=(40, 150))
    data = mp4(clip)
    srv = Server(ckpt[1], "--max-num-batched-tokens", "16", "--limit-mm-per-prompt",
                 '{"image": 2, "video": 1}')
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)
        url = "data:video/mp4;base64," + base64.b64encode(data).decode()
        content = [{"type": "text", "text": "Watch"},
                   {"type": "video_url", "video_url": {"url": url}, "uuid": "clip-5"},
                   {"type": "text", "text": "closely"}]
        model = client.models.list().data[0].id
        resp = client.chat.completions.create(
            model=model, max_tokens=N, temperature=0,
            messages=[{"role": "user", "content": content}], extra_body={"ignore_eos": True})
        # 10 frames at 16 fps, all sampled (the default count is 32)
        want = hf.greedy(hf.chat_prompt(content), [], N, [(decoded(data), 16.0)])
        text = hf.tok.decode(want, skip_special_tokens=True)
        assert resp.choices[0].message.content == text != ""
        content[1] = {"type": "video_url", "video_url": None, "uuid": "clip-5"}  # reuse
        resp = client.chat.completions.create(
            model=model, max_tokens=N, temperature=0,
            messages=[{"role": "user", "content": content}], extra_body={"ignore_eos": True})
        assert resp.choices[0].message.content == text
    finally:
        srv.stop()
