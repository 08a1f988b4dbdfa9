"""Audio through one encoder (issue 11's "Measure"): feature-extraction time per second of audio,
clips/s through one encoder core (decode + resample + log-mel + tower + projector), and the
bytes each hop carries for a 30 s clip.

    python bench/audio.py --out $OUT/audio.json                   # tiny towers, CPU
    python bench/audio.py --device cuda --size real --out ...     # Qwen2-Audio-7B-sized tower

- features: our torch log-mel (`encoder_worker/models/whisper_features.py`) over one 30 s
  window, on `--device`, against transformers' `WhisperFeatureExtractor` (CPU, numpy in, the
  reference); ms per second of audio.
- decode: a 30 s 44.1 kHz 16-bit WAV -> mono 16 kHz (`encoder_worker/audio.py`: PyAV + librosa).
- clips/s: `EncoderCore.prepare` (decode pool work) and `EncoderCore.encode` over batches of
  `--batch` clips of `--seconds` s, Qwen2-Audio and Ultravox. `--size tiny` is the test
  checkpoints' towers; `--size real` builds a random Qwen2-Audio-7B-shaped audio tower (32
  layers, d 1280, 20 heads, 128 mels, projector to 4096) with a 2-layer LM (the LM is not run).
- bytes per hop: the EncodeRequest (frontend -> encoder: the WAV bytes plus msgspec framing),
  the Embedding (encoder -> decoder: header + one raw frame of rows x hidden x dtype), and the
  mm item riding in the GenerateRequest (frontend -> engine).

Seeded; each timing is the median of `--repeats` after one warm-up (CUDA synchronized).
Prints a short table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoder_worker.audio import decode_audio  # noqa: E402
from encoder_worker.core import EncoderCore  # noqa: E402
from encoder_worker.models import load_encoder  # noqa: E402
from encoder_worker.models.whisper_features import LogMel  # noqa: E402
from frontend.media.audio import float_wav  # noqa: E402
from frontend.random_audio import build_random_qwen2_audio, build_random_ultravox  # noqa: E402
from protocol.codec import encode, tensor_ref  # noqa: E402
from protocol.geometry import load_geometry  # noqa: E402
from protocol.messages import Embedding, EncodeRequest, MMItem  # noqa: E402


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` after one warm-up."""
    fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def pcm16_wav(x: np.ndarray, rate: int) -> bytes:
    import struct

    data = np.round(np.clip(x, -1, 1 - 1 / 32768) * 32768).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<I", 16)
            + fmt + b"data" + struct.pack("<I", len(data)) + data)


def tone(seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t)
            + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def bench_features(device: torch.device, repeats: int) -> dict:
    from transformers import WhisperFeatureExtractor

    x = tone(30, 16_000, 0)
    mel = LogMel(128)
    ours = timed(lambda: mel(torch.from_numpy(x).to(device)), repeats, device)
    fe = WhisperFeatureExtractor(feature_size=128)
    ref = timed(lambda: fe(x, sampling_rate=16_000, return_tensors="np"), repeats,
                torch.device("cpu"))
    out = {"logmel_ms_per_audio_s": 1000 * ours / 30,
           "transformers_ms_per_audio_s": 1000 * ref / 30,
           "decode_resample_44k1_ms_per_audio_s": None}
    try:
        import librosa  # noqa: F401 - resampling needs it (a mmserve dependency)
    except ImportError:  # the lent GPU machine lacks it; 16 kHz clips never resample
        out["decode_resample_44k1_skipped"] = "librosa is not installed here"
        return out
    wav = pcm16_wav(tone(30, 44_100, 1), 44_100)
    dec = timed(lambda: decode_audio(wav, 16_000), repeats, torch.device("cpu"))
    out["decode_resample_44k1_ms_per_audio_s"] = 1000 * dec / 30
    return out


def real_qwen2_audio(out: Path) -> Path:
    """A random checkpoint with Qwen2-Audio-7B's audio tower (its LM cut to 2 small layers)."""
    import transformers

    from frontend.random_audio import _audio_tokenizer, _is_gain
    from frontend.random_model import save_random_model, tiny_text_kwargs

    out.mkdir(parents=True, exist_ok=True)
    tok = _audio_tokenizer(out)
    audio = transformers.Qwen2AudioEncoderConfig()  # 32 layers, d 1280, 20 heads, 128 mels
    text = transformers.Qwen2Config(**{**tiny_text_kwargs(tok, 4096, 1),
                                       "intermediate_size": 256, "num_attention_heads": 32,
                                       "num_key_value_heads": 32})
    config = transformers.Qwen2AudioConfig(audio_config=audio, text_config=text,
                                           audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"))
    save_random_model(transformers.Qwen2AudioForConditionalGeneration, config, out, std=0.02,
                      seed=0, norm_gain=_is_gain)
    transformers.WhisperFeatureExtractor(feature_size=128).save_pretrained(out)
    return out


def bench_encoder(name: str, model_dir: Path, device: torch.device, batch: int,
                  seconds: float, repeats: int) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    core = EncoderCore(load_encoder(str(model_dir), device, dtype), max_image_pixels=1 << 20)
    geo = load_geometry(model_dir)
    clips = [float_wav(tone(seconds, 16_000, i)[:, None], 16_000) for i in range(batch)]
    geoms = [geo.audio(int(seconds * 16_000), 16_000).to_meta() for _ in clips]
    prepare = timed(lambda: [core.prepare(c, {}, g, "audio") for c, g in zip(clips, geoms)],
                    repeats, torch.device("cpu"))
    inputs = [core.prepare(c, {}, g, "audio") for c, g in zip(clips, geoms)]
    encode_s = timed(lambda: core.encode(inputs), repeats, device)
    rows = core.encode(inputs[:1])[0]
    return {"model": name, "batch": batch, "clip_seconds": seconds,
            "prepare_ms_per_clip": 1000 * prepare / batch,
            "encode_ms_per_clip": 1000 * encode_s / batch,
            "clips_per_s_tower": batch / encode_s,
            "clips_per_s_one_decode_thread": batch / (prepare + encode_s),
            "rows": int(rows.shape[0]), "hidden": int(rows.shape[1])}


def bytes_per_hop(model_dir: Path, hidden: int, dtype_bytes: int) -> dict:
    """A 30 s 16 kHz mono 16-bit clip: what each hop carries."""
    geo = load_geometry(model_dir)
    wav = pcm16_wav(tone(30, 16_000, 2), 16_000)
    g = geo.audio(30 * 16_000, 16_000)
    req = EncodeRequest(key="blake3:" + "0" * 64, modality="audio", data=wav, kwargs={},
                        deliver_to=["tcp://127.0.0.1:5555"], reply_to="tcp://127.0.0.1:5556",
                        request_id="r" * 32, geometry=g.to_meta())
    to_encoder = sum(len(memoryview(f)) for f in encode(req))
    rows = torch.zeros(g.num_tokens, hidden, dtype=torch.bfloat16 if dtype_bytes == 2
                       else torch.float32)
    ref, buf = tensor_ref(rows, frame=2)
    frames = encode(Embedding(req.key, ref, meta={}), [buf])
    to_decoder = sum(len(memoryview(f).cast("B")) for f in frames)
    item = MMItem(req.key, "audio", 10, g.num_tokens, g.to_meta())
    import msgspec

    return {"clip_bytes": len(wav), "frontend_to_encoder": to_encoder,
            "encoder_to_decoder": to_decoder, "embedding_rows": g.num_tokens,
            "mm_item_in_generate_request": len(msgspec.msgpack.encode(item)),
            "prompt_tokens_of_clip": g.num_tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", choices=("tiny", "real"), default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    result: dict = {"device": args.device, "size": args.size,
                    "torch_threads": torch.get_num_threads()}
    result["features"] = bench_features(device, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        if args.size == "real":
            qwen = real_qwen2_audio(Path(tmp) / "qwen2_audio")
            models = [("qwen2_audio_7b_tower", qwen)]
        else:
            qwen = build_random_qwen2_audio(Path(tmp) / "qwen2_audio", chunk_length=30)
            models = [("qwen2_audio_tiny", qwen),
                      ("ultravox_tiny", build_random_ultravox(Path(tmp) / "ultravox"))]
        result["encoders"] = [bench_encoder(n, d, device, args.batch, args.seconds,
                                            args.repeats) for n, d in models]
        result["bytes_per_hop_30s"] = {
            "qwen2_audio_7b_bf16": bytes_per_hop(qwen, 4096, 2)}
    f = result["features"]
    dec = f["decode_resample_44k1_ms_per_audio_s"]
    print(f"log-mel: {f['logmel_ms_per_audio_s']:.2f} ms per audio second (transformers "
          f"{f['transformers_ms_per_audio_s']:.2f}); decode+resample 44.1k: "
          + (f"{dec:.2f} ms/s" if dec is not None else f["decode_resample_44k1_skipped"]))
    print(f"{'model':24} {'prep ms/clip':>12} {'tower ms/clip':>13} {'clips/s':>8}")
    for e in result["encoders"]:
        print(f"{e['model']:24} {e['prepare_ms_per_clip']:12.1f} {e['encode_ms_per_clip']:13.1f} "
              f"{e['clips_per_s_one_decode_thread']:8.1f}")
    print("bytes per hop, 30 s clip:", json.dumps(result["bytes_per_hop_30s"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
