"""Issue 7 through the offline API: vLLM's offline media shapes (PIL, numpy, tensors, None +
uuid), limit_mm_per_prompt, and every other value a RequestError naming its exact field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llava_utils import image

from frontend import LLM, SamplingParams
from frontend.errors import RequestError

N = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llava):
    return LLM(tiny_llava, limit_mm_per_prompt={"image": 4})


def tokens(out) -> list[int]:
    return out[0].outputs[0].token_ids


def gen(llm, images, prompt=None, **extra):
    n = len(images) if isinstance(images, list) else 1
    p = {"prompt": prompt or "<image>" * n + "Hi", "multi_modal_data": {"image": images}, **extra}
    return tokens(llm.generate(p, GREEDY))


def refused(fn, param: str, match: str | None = None) -> RequestError:
    with pytest.raises(RequestError, match=match) as e:
        fn()
    assert e.value.param == param and e.value.status == 400
    return e.value


def test_limit_mm_per_prompt_is_enforced(llm):
    imgs = [image(i, (20, 20)) for i in range(5)]
    refused(lambda: gen(llm, imgs), "prompts[0].multi_modal_data", "at most 4")
    # Counted from the shape: five embeddings in one tensor, and a 4-D batch of five images.
    hidden = llm.media.placeholders.hidden_size
    refused(lambda: gen(llm, torch.zeros(5, 3, hidden), "<image>" * 5),
            "prompts[0].multi_modal_data", "got 5")
    refused(lambda: gen(llm, np.zeros((5, 20, 20, 3), np.uint8), "<image>" * 5),
            "prompts[0].multi_modal_data", "at most 4")
    assert len(gen(llm, imgs[:4])) == N
    assert not llm.engine.has_work()


def test_numpy_images_equal_pil(llm):
    pil = image(1, (30, 40))
    by_pil = gen(llm, pil)
    arr = np.array(pil)  # [H, W, 3] uint8
    assert gen(llm, arr) == by_pil
    assert gen(llm, arr.astype(np.float32) / 255) == by_pil  # floats in [0, 1]
    assert gen(llm, torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)) == by_pil  # [1,C,H,W]
    assert gen(llm, [torch.from_numpy(arr).permute(2, 0, 1)]) == by_pil  # [C, H, W] in a list
    assert gen(llm, arr[None]) == by_pil  # [1, H, W, C]
    gray = np.asarray(pil.convert("L"))
    assert gen(llm, gray) == gen(llm, gray[..., None]) == gen(llm, pil.convert("L"))
    rgba = np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)])
    assert gen(llm, rgba) == by_pil  # opaque alpha changes nothing


def test_chat_accepts_numpy_tensor_embeds_and_pil_none_uuid(llm, tiny_llava):
    pil = image(2, (30, 30))
    text = {"type": "text", "text": "What?"}

    def chat(part):
        return tokens(llm.chat([{"role": "user", "content": [part, text]}], GREEDY))

    by_pil = chat({"type": "image_pil", "image_pil": pil, "uuid": "chat-pic"})
    assert chat({"type": "image_pil", "image_pil": np.asarray(pil)}) == by_pil
    assert chat({"type": "image_pil", "image_pil": None, "uuid": "chat-pic"}) == by_pil
    # The tensor form of vLLM's guide: the item's own embeddings give the same answer.
    from llava_utils import HFLlava

    feats = HFLlava(tiny_llava).features(pil)  # [num_tokens, hidden]
    assert chat({"type": "image_embeds", "image_embeds": feats}) == by_pil
    refused(lambda: chat({"type": "image_embeds", "image_embeds": feats[None].expand(2, -1, -1)}),
            "messages[0].content[0].image_embeds", "holds 2 images")
    refused(lambda: chat({"type": "image_pil", "image_pil": None}),
            "messages[0].content[0].image_pil", "uuid")
    refused(lambda: chat({"type": "image_pil", "image_pil": "/tmp/cat.png"}),
            "messages[0].content[0].image_pil", "PIL")


@pytest.mark.parametrize("bad,match", [
    ("/tmp/cat.png", "got str"), (b"\x89PNG", "got bytes"),
    ({"url": "x"}, r"must hold image_embeds \(and image_grid_thw\), got keys \[.url.\]"),
    (3, "got int"), ([[image(0)]], "got list"),
])
def test_wrong_image_values_name_the_field(llm, bad, match):
    where = "prompts[0].multi_modal_data.image"
    refused(lambda: gen(llm, bad), where if not isinstance(bad, list) else where + "[0]", match)
    refused(lambda: gen(llm, [image(0), bad]), where + "[1]", match)


@pytest.mark.parametrize("arr,match", [
    (np.zeros((20, 20, 3), np.float32) + 2, r"\[0, 1\]"),
    (np.full((20, 20, 3), np.nan, np.float32), r"\[0, 1\]"),
    (np.zeros((20, 20, 3), np.int64) - 1, "0..255"),
    (np.zeros((20, 20, 3), bool), "uint8 or float"),
    (np.zeros((20, 20, 5), np.uint8), "shape"),
    (np.zeros((20,), np.uint8), "shape"),
    (np.zeros((20, 20, 3), np.complex64), "uint8 or float"),
    (np.zeros((2, 20_000, 3), np.uint8), "aspect ratio"),
    (np.zeros((1, 1, 3), np.uint8), "too small"),
    # Zero strides: a 10^10-pixel view of 3 bytes is refused from its shape, never read.
    (np.broadcast_to(np.zeros(3, np.uint8), (100_000, 100_000, 3)), "too large"),
    (torch.zeros(3, 1, 1).expand(3, 100_000, 100_000), "too large"),
    (torch.zeros(3, 20, 20, dtype=torch.complex64), "uint8 or float"),
])
def test_bad_arrays_are_refused_before_reading(llm, arr, match):
    refused(lambda: gen(llm, [arr]), "prompts[0].multi_modal_data.image[0]", match)


def test_embedding_tensors_are_validated(llm):
    hidden = llm.media.placeholders.hidden_size
    where = "prompts[0].multi_modal_data.image"
    huge = torch.zeros(1).expand(4, 10**6, 10**6)
    refused(lambda: gen(llm, huge), where, "hidden size")
    refused(lambda: gen(llm, [torch.zeros(5, hidden + 1)]), where + "[0]", "hidden size")
    refused(lambda: gen(llm, [torch.zeros(5, hidden, dtype=torch.int64)]), where + "[0]", "dtype")
    refused(lambda: gen(llm, torch.zeros(1, hidden).expand(2, 16000, hidden)), where, "repeats")
    nan = torch.zeros(3, hidden)
    nan[1, 1] = float("nan")
    refused(lambda: gen(llm, [nan]), where + "[0]", "NaN")


def test_uuids_are_checked(llm):
    img = image(3, (20, 20))
    where = "prompts[0].multi_modal_uuids"
    for uuids, param, match in [
        (["a", "b"], where, "2 image uuids for 1"),
        ([7], where + ".image[0]", "printable"),
        (["x" * 257], where + ".image[0]", "at most 256"),
        (["bad\nid"], where + ".image[0]", "printable"),
        (["\ud800"], where + ".image[0]", "printable"),
        ([""], where + ".image[0]", "non-empty"),
        (5, where, "list of str"),
    ]:
        refused(lambda u=uuids: gen(llm, [img], multi_modal_uuids={"image": u}), param, match)
    refused(lambda: gen(llm, [img], multi_modal_uuids={"video": ["a"]}), where, "video")
    refused(lambda: gen(llm, [img], multi_modal_uuids=["a"]), where, "dict")
    one = gen(llm, img, multi_modal_uuids={"image": "one-str"})  # one string for one item
    assert gen(llm, [None], multi_modal_uuids={"image": ["one-str"]}) == one


def test_other_modalities_and_shapes(llm):
    refused(lambda: tokens(llm.generate({"prompt": "Hi", "multi_modal_data": {"audio": [1]}},
                                        GREEDY)), "prompts[0].multi_modal_data", "audio")
    refused(lambda: tokens(llm.generate({"prompt": "Hi", "multi_modal_data": [image(0)]},
                                        GREEDY)), "prompts[0].multi_modal_data", "dict")
    assert not llm.engine.has_work() and llm.engine.embeds.refs == {}


def test_text_only_model_refuses_media(tiny_llama):
    llm = LLM(tiny_llama)
    refused(lambda: llm.generate({"prompt": "Hi", "multi_modal_data": {"image": image(0)}},
                                 GREEDY), "prompts[0].multi_modal_data", "does not accept")


def test_multi_modal_data_that_is_not_a_dict(llm):
    # A tensor or array given as multi_modal_data itself has no truth value: still a 400.
    for bad in (torch.zeros(2, 3), np.zeros((4, 4, 3), np.uint8), "cat.png"):
        refused(lambda bad=bad: llm.generate({"prompt": "<image>Hi", "multi_modal_data": bad},
                                             GREEDY),
                "prompts[0].multi_modal_data")
    # uuids without any data are checked too (they name no image).
    with pytest.raises(RequestError):
        llm.generate({"prompt": "Hi", "multi_modal_uuids": {"image": ["a"]}}, GREEDY)
    assert not llm.engine.has_work()
