"""mm_processor_kwargs for Qwen2-VL and Qwen2.5-VL end to end: the same image at other pixel
bounds is another token count, and each answer equals transformers' with an image processor
built with those bounds (per prompt, server-wide under LLM(...) and --mm-processor-kwargs, and
per request over HTTP); a video's fps and pixel bounds reach its sampling, its sizes and
Qwen2.5-VL's time positions; every refused setting is a 400 (offline: a ValueError) naming it,
and the server keeps serving."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import openai
import pytest
from llava_utils import png
from qwen2_vl_utils import VISION, HFQwen2VL, image
from server_utils import Server
from test_qwen2_video import VIDEO, decoded, frames, mp4, pil

from frontend import LLM, SamplingParams
from frontend.errors import RequestError

N = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
P = 28 * 28  # pixels of one merged token; the checkpoint's bounds are [2, 16] of them
IMG = image(12, (200, 300))  # (height, width): 16 tokens by the checkpoint's bounds
SETTINGS = [{}, {"max_pixels": 4 * P}, {"min_pixels": 20 * P, "max_pixels": 30 * P}]
BAD = [  # (mm_processor_kwargs, the field the error names)
    ({"max_pixles": 4 * P}, "max_pixles"),
    ({"max_pixels": "many"}, "max_pixels"),
    ({"min_pixels": 9 * P, "max_pixels": 8 * P}, "min_pixels"),
    ({"max_pixels": 1 << 30}, "max_pixels"),  # past the encoder's cap on one image
    ({"size": {"longest_edge": -1}}, "size.longest_edge"),
    ({"fps": 0}, "fps"),
    ({"videos_kwargs": {"fps": -1.5}}, "videos_kwargs.fps"),
]


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
    return LLM(ckpt[1], max_num_batched_tokens=16)


def test_same_image_at_other_bounds_other_counts_each_equal_transformers(llm, hf):
    prompt = f"{VISION}What is this?"
    outs = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": IMG},
                          "mm_processor_kwargs": kw} for kw in SETTINGS], GREEDY)
    assert len({len(o.prompt_token_ids) for o in outs}) == len(SETTINGS)
    for out, kw in zip(outs, SETTINGS):
        assert out.outputs[0].token_ids == hf.with_processor(**kw).greedy(prompt, [IMG], N), kw


def test_server_wide_settings_under_the_prompts(ckpt, hf):
    llm = LLM(ckpt[1], mm_processor_kwargs={"max_pixels": 4 * P})
    prompt = f"{VISION}And this?"
    plain, own = llm.generate([
        {"prompt": prompt, "multi_modal_data": {"image": IMG}},
        {"prompt": prompt, "multi_modal_data": {"image": IMG},
         "mm_processor_kwargs": {"size": {"longest_edge": 8 * P}}}], GREEDY)
    assert plain.outputs[0].token_ids == hf.with_processor(max_pixels=4 * P).greedy(
        prompt, [IMG], N)
    assert own.outputs[0].token_ids == hf.with_processor(max_pixels=8 * P).greedy(
        prompt, [IMG], N)
    content = [{"type": "image_pil", "image_pil": IMG}, {"type": "text", "text": "Well?"}]
    chat = llm.chat([{"role": "user", "content": content}], GREEDY,
                    mm_processor_kwargs={"min_pixels": 10 * P, "max_pixels": 12 * P})[0]
    assert chat.outputs[0].token_ids == hf.with_processor(
        min_pixels=10 * P, max_pixels=12 * P).greedy(hf.chat_prompt(content), [IMG], N)
    with pytest.raises(ValueError, match="mm_processor_kwargs.fps"):
        LLM(ckpt[1], mm_processor_kwargs={"fps": 0})


def test_video_fps_and_pixel_bounds(llm, hf):
    # In-memory frames are all kept, taken as frames at the given rate (Qwen2.5-VL: 2 / 8 s per
    # temporal step; slow enough rates would put time positions past the frame's rows, where
    # transformers 5 places text otherwise, see test_qwen2_video); videos_kwargs bounds only the
    # video, a flat bound both.
    clip, prompt = frames(6, num=4, size=(64, 160)), f"{VISION}{VIDEO}What now?"
    cases = [({"fps": 8, "videos_kwargs": {"max_pixels": 8 * P}}, {}, {"max_pixels": 8 * P}),
             ({"max_pixels": 6 * P, "fps": 8}, {"max_pixels": 6 * P}, {"max_pixels": 6 * P})]
    answers = []
    for kw, image_kw, video_kw in cases:
        out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": IMG, "video": clip},
                            "mm_processor_kwargs": kw}, GREEDY)[0]
        ref = hf.with_processor(videos=video_kw, **image_kw)
        assert out.outputs[0].token_ids == ref.greedy(prompt, [IMG], N, [(pil(clip), 8)]), kw
        answers.append(out.outputs[0].token_ids)
    assert answers[0] != answers[1]
    # A fetched video is sampled at the rate: 10 frames at 16 fps sampled at 8 fps are
    # 10 / 16 * 8 = 5 frames, rounded down to the temporal patch (4), at int(0, 2.5, 5, 7.5).
    data = mp4(frames(5, num=10, size=(40, 150)))
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    content = [{"type": "video_url", "video_url": {"url": url}},
               {"type": "text", "text": "Slower"}]
    out = llm.chat([{"role": "user", "content": content}], GREEDY,
                   mm_processor_kwargs={"fps": 8})[0]
    sampled = [decoded(data)[i] for i in (0, 2, 5, 7)]
    assert out.outputs[0].token_ids == hf.greedy(hf.chat_prompt(content), [], N,
                                                 [(sampled, 4 / 10 * 16)])


@pytest.mark.parametrize("kwargs,field", BAD)
def test_offline_refusals_are_value_errors_naming_the_field(llm, kwargs, field):
    with pytest.raises(ValueError) as e:
        llm.generate({"prompt": f"{VISION}Hi", "multi_modal_data": {"image": IMG},
                      "mm_processor_kwargs": kwargs}, GREEDY)
    assert isinstance(e.value, RequestError)
    assert e.value.param == f"prompts[0].mm_processor_kwargs.{field}"
    assert not llm.engine.has_work()


@pytest.mark.slow
def test_http(ckpt, hf):
    srv = Server(ckpt[1], "--max-num-batched-tokens", "16",
                 "--mm-processor-kwargs", json.dumps({"max_pixels": 4 * P}))
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)
        url = "data:image/png;base64," + base64.b64encode(png(IMG)).decode()
        content = [{"type": "image_url", "image_url": {"url": url}, "uuid": "img-11"},
                   {"type": "text", "text": "What?"}]
        prompt = hf.chat_prompt(content)
        for kw, ref in (({}, {"max_pixels": 4 * P}), ({"max_pixels": 8 * P}, {"max_pixels": 8 * P}),
                        ({"min_pixels": 20 * P, "max_pixels": 30 * P}, SETTINGS[2])):
            want = hf.tok.decode(hf.with_processor(**ref).greedy(prompt, [IMG], N),
                                 skip_special_tokens=True)
            assert _ask(client, content, kw).choices[0].message.content == want != "", kw
        # The uuid alone finds the item only under the settings it was sent with.
        reuse = [{"type": "image_url", "image_url": None, "uuid": "img-11"}, content[1]]
        assert _ask(client, reuse, {"max_pixels": 8 * P}).usage.prompt_tokens == \
            _ask(client, content, {"max_pixels": 8 * P}).usage.prompt_tokens
        with pytest.raises(openai.BadRequestError, match="uuid"):
            _ask(client, reuse, {"max_pixels": 12 * P})
        for kw, field in BAD:
            with pytest.raises(openai.BadRequestError) as e:
                _ask(client, content, kw)
            assert e.value.body["param"] == f"mm_processor_kwargs.{field}", kw
        with pytest.raises(openai.BadRequestError) as e:
            _ask(client, content, [1, 2])
        assert e.value.body["param"] == "mm_processor_kwargs"
        assert _ask(client, content, {}).usage.completion_tokens == N  # still serving
    finally:
        srv.stop()


def _ask(client, content, kwargs):
    return client.chat.completions.create(
        model=client.models.list().data[0].id, max_tokens=N, temperature=0,
        messages=[{"role": "user", "content": content}],
        extra_body={"ignore_eos": True, "mm_processor_kwargs": kwargs})


def test_refused_server_wide_settings_stop_the_server_before_it_starts(ckpt):
    run = subprocess.run([sys.executable, "-m", "frontend.cli", "serve", ckpt[1],
                          "--mm-processor-kwargs", '{"max_pixels": 0}'],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "mm_processor_kwargs.max_pixels" in run.stderr
