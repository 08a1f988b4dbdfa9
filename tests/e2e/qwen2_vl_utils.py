"""Shared by the Qwen2-VL end-to-end tests: transformers' greedy answer for a prompt with images
and videos.

transformers' `Qwen2VLProcessor` needs torchvision (for its video half), so the reference is
assembled from its parts: the PIL image processor gives pixel values and grids, each
``<|image_pad|>`` is widened to its grid's count and marked in ``mm_token_type_ids`` as the
processor does, and the model generates from those. A video is its frames through the same
image processor (each frame's patches hold it ``temporal_patch_size`` times; the video
processor instead fills a temporal patch with consecutive frames, the last one repeated to fill
the final patch), grid (frames / temporal, h, w), marked 2 in ``mm_token_type_ids``, and for
Qwen2.5-VL ``second_per_grid_ts`` = temporal / the sampled frames' rate."""

from __future__ import annotations

import copy

import numpy as np
import torch
import transformers
from PIL import Image

VISION = "<|vision_start|><|image_pad|><|vision_end|>"
MODELS = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
          "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}


def image(seed: int, size=(40, 50)) -> Image.Image:
    """A random RGB image of (height, width) ``size``."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), np.uint8))


class HFQwen2VL:
    def __init__(self, path: str, arch: str = "qwen2_vl"):
        self.path = path
        self.tok = transformers.AutoTokenizer.from_pretrained(path)
        self.images = transformers.Qwen2VLImageProcessorPil.from_pretrained(path)
        self.video_images = self.images  # what video frames go through (`video_inputs`)
        self.model = MODELS[arch].from_pretrained(path, dtype=torch.float32).eval()
        self.pad = self.model.config.image_token_id
        self.video_pad = self.model.config.video_token_id
        self.arch = arch

    def with_processor(self, videos: dict | None = None, **kwargs) -> HFQwen2VL:
        """This reference with its image processor built with ``kwargs`` (e.g. min_pixels and
        max_pixels, as transformers' users pass them), and the one for video frames with
        ``videos`` (default: the same); the model is shared."""
        other = copy.copy(self)
        load = transformers.Qwen2VLImageProcessorPil.from_pretrained
        other.images = load(self.path, **kwargs)
        other.video_images = other.images if videos is None else load(self.path, **videos)
        return other

    def chat_prompt(self, content: list[dict]) -> str:
        parts = [p if p["type"] == "text" else
                 {"type": "video" if p["type"].startswith("video") else "image"} for p in content]
        return self.tok.apply_chat_template([{"role": "user", "content": parts}],
                                            add_generation_prompt=True, tokenize=False)

    def video_inputs(self, frames: list[Image.Image]) -> tuple[torch.Tensor, list[int]]:
        """A video's pixel values [t * h * w, C * temporal * p * p] and grid, from the PIL
        image processor frame by frame plus the video processor's temporal patchify."""
        tps = self.video_images.temporal_patch_size
        frames = frames + [frames[-1]] * (-len(frames) % tps)
        out = self.video_images(images=frames, return_tensors="pt")
        _, h, w = out["image_grid_thw"][0].tolist()
        c, p = 3, self.video_images.patch_size
        # [frames, h*w, C, tps, p, p]: each frame repeated over the temporal patch; keep one copy
        per_frame = out["pixel_values"].view(len(frames), h * w, c, tps, p, p)[:, :, :, 0]
        steps = per_frame.view(len(frames) // tps, tps, h * w, c, p, p).permute(0, 2, 3, 1, 4, 5)
        return steps.reshape(-1, c * tps * p * p), [len(frames) // tps, h, w]

    def greedy(self, prompt: str, images: list[Image.Image], n: int,
               videos: list[tuple[list[Image.Image], float]] = ()) -> list[int]:
        """``videos``: each (frames, the sampled frames' rate)."""
        ids = self.tok.encode(prompt, add_special_tokens=False)
        kw = {}
        counts = {self.pad: [], self.video_pad: []}
        if images:
            inputs = self.images(images=images, return_tensors="pt")
            counts[self.pad] = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
            kw = {"pixel_values": inputs["pixel_values"],
                  "image_grid_thw": inputs["image_grid_thw"]}
        if videos:
            made = [self.video_inputs(frames) for frames, _ in videos]
            grids = torch.tensor([g for _, g in made])
            counts[self.video_pad] = (grids.prod(-1) // 4).tolist()
            kw.update(pixel_values_videos=torch.cat([v for v, _ in made]), video_grid_thw=grids)
            if self.arch == "qwen2_5_vl":
                kw["second_per_grid_ts"] = torch.tensor(
                    [self.images.temporal_patch_size / fps for _, fps in videos])
        if images or videos:
            for tok, c in counts.items():
                assert ids.count(tok) == len(c)
            widened, taken = [], dict.fromkeys(counts, 0)
            for t in ids:
                if t in counts:
                    widened.extend([t] * counts[t][taken[t]])
                    taken[t] += 1
                else:
                    widened.append(t)
            ids = widened
            # which tokens are image (1) / video (2) rows: M-RoPE positions come from it (the
            # processor's output; without it transformers falls back to 1-D positions)
            kw["mm_token_type_ids"] = torch.tensor(
                [[1 if t == self.pad else 2 if t == self.video_pad else 0 for t in ids]])
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=n, eos_token_id=[], do_sample=False, **kw)
        return out[0, len(ids):].tolist()
