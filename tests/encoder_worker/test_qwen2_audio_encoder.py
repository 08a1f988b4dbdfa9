"""Qwen2-Audio's encoder slice (encoder_worker/models/qwen2_audio.py) against transformers'
`Qwen2AudioEncoder` + projector on the same features: clips of different lengths in one batch
(each with its padding masked, as transformers' forward masks it) give the same rows; the
Whisper tower alone equals transformers' `WhisperEncoder` on full windows; the encoder core
takes WAV bytes to rows; a checkpoint whose feature extractor disagrees with its tower is
refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from transformers.masking_utils import create_bidirectional_mask

from encoder_worker.core import EncoderCore
from encoder_worker.models.qwen2_audio import Qwen2AudioEncoder
from encoder_worker.models.whisper import WhisperEncoder
from frontend.media.audio import float_wav
from frontend.random_audio import build_random_qwen2_audio
from protocol.geometry.qwen2_audio import Qwen2AudioGeometry


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_random_qwen2_audio(tmp_path_factory.mktemp("qwen2_audio")))


@pytest.fixture(scope="module")
def hf(ckpt):
    return transformers.Qwen2AudioForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32).eval()


def clips(*samples: int) -> list[np.ndarray]:
    rng = np.random.default_rng(sum(samples))
    return [(0.2 * rng.standard_normal(n)).astype(np.float32) for n in samples]


def hf_rows(hf, ckpt, audio: list[np.ndarray]) -> list[torch.Tensor]:
    fe = transformers.WhisperFeatureExtractor.from_pretrained(ckpt)
    inputs = fe(audio, sampling_rate=16_000, padding="max_length", return_attention_mask=True,
                return_tensors="pt")
    tower = hf.model.audio_tower
    rows_in, rows_out = tower._get_feat_extract_output_lengths(inputs["attention_mask"].sum(-1))
    t = (inputs["input_features"].shape[-1] - 2) // 2 + 1
    mask = (torch.arange(t)[None] < rows_in[:, None]).long()
    mask = create_bidirectional_mask(config=tower.config,
                                     inputs_embeds=torch.zeros(len(audio), t, 1),
                                     attention_mask=mask)
    with torch.no_grad():
        out = hf.model.multi_modal_projector(
            tower(inputs["input_features"], attention_mask=mask).last_hidden_state)
    return [out[i, :int(n)] for i, n in enumerate(rows_out)]


def test_batch_of_clips_matches_transformers(ckpt, hf):
    enc = Qwen2AudioEncoder(ckpt, torch.device("cpu"), torch.float32)
    audio = clips(400, 16_000, 37_123, 64_000, 90_000)  # the last one is cut to the 4 s window
    items = [enc.preprocess_audio(a, None) for a in audio]
    geo = Qwen2AudioGeometry({}, json.load(open(f"{ckpt}/preprocessor_config.json")))
    assert [it.num_tokens for it in items] == [geo.audio(a.size, 16_000).num_tokens
                                               for a in audio] == [1, 25, 58, 100, 100]
    ours = enc.encode_packed(items)
    refs = hf_rows(hf, ckpt, audio)
    for item, got, want in zip(items, ours, refs):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # alone (the tower then runs on a shorter prefix of the window) or in a batch: the
        # padding is masked, so the same rows
        torch.testing.assert_close(enc.encode_packed([item])[0], want, rtol=1e-4, atol=1e-5)


def test_whisper_tower_matches_transformers_whisper_encoder():
    config = transformers.WhisperConfig(num_mel_bins=16, d_model=32, encoder_layers=2,
                                        encoder_attention_heads=4, encoder_ffn_dim=64,
                                        max_source_positions=50)
    torch.manual_seed(0)
    ref = transformers.models.whisper.modeling_whisper.WhisperEncoder(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.15)
    ours = WhisperEncoder(config).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items()}, strict=True)
    features = torch.randn(3, 16, 100)
    with torch.no_grad():
        want = ref(features).last_hidden_state
        got = ours(features, [100, 100, 100])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_core_takes_wav_bytes_to_rows(ckpt, hf):
    enc = Qwen2AudioEncoder(ckpt, torch.device("cpu"), torch.float32)
    core = EncoderCore(enc, max_image_pixels=1 << 20)
    (audio,) = clips(24_000)
    geometry = {"num_tokens": 37, "num_samples": 24_000}
    inputs = core.prepare(float_wav(audio[:, None], 16_000), {}, geometry, "audio")
    (rows,) = core.encode([inputs])
    torch.testing.assert_close(rows, hf_rows(hf, ckpt, [audio])[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="geometry"):
        core.prepare(float_wav(audio[:, None], 16_000), {},
                     {"num_tokens": 38, "num_samples": 24_000}, "audio")


def test_mismatched_feature_extractor_is_refused(ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "preprocessor_config.json").read_text())
    (bad / "preprocessor_config.json").write_text(json.dumps({**cfg, "feature_size": 80}))
    with pytest.raises(ValueError, match="mel bins"):
        Qwen2AudioEncoder(str(bad), torch.device("cpu"), torch.float32)
    (bad / "preprocessor_config.json").write_text(json.dumps(
        {**cfg, "chunk_length": 30, "n_samples": 480_000}))
    with pytest.raises(ValueError, match="window"):
        Qwen2AudioEncoder(str(bad), torch.device("cpu"), torch.float32)
