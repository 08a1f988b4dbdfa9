"""Video decoding on this machine's CPU: frames/s of the encoder's decode (PyAV, every frame of
a 30-frame 336x336 clip sampled) and of decode + Qwen2-VL preprocessing (resize, normalize,
patchify), per codec. The clip is random noise over a moving gradient, so the codecs do real
work.

    python bench/video_decode.py [--repeats 10] [--out bench/results/video_decode_cpu.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import av
import numpy as np

from encoder_worker.video import decode_video
from protocol.geometry.qwen2_vl import Qwen2VLGeometry

FRAMES, SIDE, RATE = 30, 336, 30
CODECS = [("libx264", "mp4"), ("mpeg4", "mp4"), ("mjpeg", "avi")]


def clip(codec: str, fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, SIDE, dtype=np.float32)[None, :, None]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=RATE)
        s.width = s.height = SIDE
        s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i in range(FRAMES):
            frame = np.clip(rng.integers(0, 56, (SIDE, SIDE, 3)) + np.roll(ramp, 7 * i, 1), 0, 255)
            c.mux(s.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")))
        c.mux(s.encode())
    return buf.getvalue()


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="bench/results/video_decode_cpu.json")
    args = ap.parse_args()
    from encoder_worker.models.qwen2_vl_image import Qwen2VLImageProcessor

    # Qwen2-VL's released video bounds (transformers' defaults): 336x336 stays 336x336.
    geometry = Qwen2VLGeometry({}, {})
    processor = Qwen2VLImageProcessor(geometry, {})
    every = lambda total, fps: list(range(total))  # noqa: E731
    rows = []
    for codec, fmt in CODECS:
        data = clip(codec, fmt)
        decode_s = timed(lambda data=data: decode_video(data, every), args.repeats)

        def preprocess(data=data):
            video = decode_video(data, every)
            return processor.video(video.frames, video.fps)

        full_s = timed(preprocess, args.repeats)
        rows.append({"codec": codec, "container": fmt, "bytes": len(data),
                     "decode_fps": FRAMES / decode_s, "decode_preprocess_fps": FRAMES / full_s,
                     "grid_thw": list(preprocess().grid_thw)})
    print(f"{FRAMES} frames of {SIDE}x{SIDE}, median of {args.repeats}")
    print(f"{'codec':<10}{'bytes':>9}{'decode f/s':>12}{'+preprocess f/s':>17}")
    for r in rows:
        print(f"{r['codec']:<10}{r['bytes']:>9}{r['decode_fps']:>12.0f}"
              f"{r['decode_preprocess_fps']:>17.0f}")
    out = {"frames": FRAMES, "side": SIDE, "rate": RATE, "repeats": args.repeats,
           "pyav": av.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "processor": platform.processor(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
