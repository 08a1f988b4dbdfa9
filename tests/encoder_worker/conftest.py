"""Fixtures of the encoder tests: one tiny random LLaVA checkpoint and its transformers twin."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import transformers
from PIL import Image


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> str:
    from frontend.random_model import build_random_llava

    return str(build_random_llava(tmp_path_factory.mktemp("tiny_llava")))


@pytest.fixture(scope="session")
def hf_llava(tiny_llava):
    """(image processor, model) of transformers, fp32: the reference of every parity test.

    The PIL backend of the processor, named explicitly: where torchvision is installed,
    transformers picks its torchvision backend, whose resize differs by ~1e-2 per pixel."""
    processor = transformers.CLIPImageProcessorPil.from_pretrained(tiny_llava)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tiny_llava,
                                                                       dtype=torch.float32)
    return processor, model.eval()


@pytest.fixture(scope="session")
def hf_features(hf_llava):
    """images -> transformers' projected features, one [num_tokens, hidden] tensor each."""
    processor, model = hf_llava

    def features(images: list[Image.Image]) -> list[torch.Tensor]:
        pixels = torch.from_numpy(np.asarray(processor(images, return_tensors="np")["pixel_values"]))
        with torch.no_grad():
            out = model.get_image_features(pixel_values=pixels)
        # transformers 5 returns a model output whose pooler_output is the per-image list.
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return [f.reshape(-1, f.shape[-1]) for f in feats]

    return features


def random_image(seed: int, height: int = 40, width: int = 50) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def make_image():
    return random_image


@pytest.fixture
def to_png():
    return png_bytes
