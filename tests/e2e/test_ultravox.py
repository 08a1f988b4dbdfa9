"""Ultravox (issue 11, acceptance 3). Its reference code is remote code that cannot be fetched
here, so each part is checked against what can be:

- the tiny checkpoint (`frontend.random_audio.build_random_ultravox`) carries the published
  config keys and weight names, and every role loads it (AutoConfig through
  `protocol.models.register_config`, the encoder slice, the frontend slice);
- the Whisper part equals transformers' `WhisperEncoder` holding the checkpoint's
  ``audio_tower.*`` weights, on a full window (``audio_tower.model.encoder.*`` loads the same);
- the projector equals the published architecture written out step by step below (frames
  stacked by a reshape, Llama RMSNorm, a bias-free linear, SwiGLU taking the first half as the
  value and the second as the gate, RMSNorm, a bias-free linear: fixie-ai's
  ``UltravoxProjector`` with ``projector_ln_mid``, as vLLM's ``UltravoxFeedForwardProjector``
  implements it); swapping the SwiGLU halves breaks it;
- the LM equals transformers' `LlamaForCausalLM` built from ``text_config`` with the
  ``language_model.*`` weights: our greedy answer for a prompt with clips is its greedy answer
  from the same audio rows spliced into the prompt's embeddings;
- end to end, answers are deterministic and the same from a fresh `LLM` and over HTTP;
- the released layout (a tokenizer without ``<|audio|>``, ``audio_token_index`` one past the
  LM's vocabulary) answers as the in-vocab checkpoint of the same weights, offline and over
  HTTP; an id past the vocabulary anywhere but at a clip is refused.
"""

from __future__ import annotations

import base64
import json
import math

import openai
import pytest
import torch
import torch.nn.functional as F
import transformers
from qwen2_audio_utils import clip, wav16
from safetensors.torch import load_file, save_file
from server_utils import Server

from encoder_worker.models.ultravox import UltravoxEncoder
from frontend import LLM, SamplingParams
from frontend.models import load_placeholders
from protocol.geometry.ultravox import UltravoxGeometry
from protocol.messages import GenerateRequest, MMItem, Sampling
from protocol.models import register_config

N = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
PUBLISHED_KEYS = {"architectures", "model_type", "audio_config", "text_config", "audio_model_id",
                  "text_model_id", "audio_token_index", "hidden_size", "stack_factor",
                  "projector_act", "projector_ln_mid", "norm_init", "ignore_index",
                  "initializer_range", "vocab_size"}


def prompt(body: str) -> str:
    return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from frontend.random_audio import build_random_ultravox

    return str(build_random_ultravox(tmp_path_factory.mktemp("ultravox")))


@pytest.fixture(scope="module")
def enc(ckpt):
    return UltravoxEncoder(ckpt, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def weights(ckpt):
    return load_file(f"{ckpt}/model.safetensors")


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, max_num_batched_tokens=32)


def test_published_config_and_weight_names_load(ckpt, enc, weights):
    config = json.loads(open(f"{ckpt}/config.json").read())
    assert PUBLISHED_KEYS <= set(config) and config["architectures"] == ["UltravoxModel"]
    assert config["projector_act"] == "swiglu" and config["audio_config"]["model_type"] == "whisper"
    assert {k.split(".")[0] for k in weights} == {"audio_tower", "multi_modal_projector",
                                                  "language_model"}
    assert {k for k in weights if k.startswith("multi_modal_projector.")} == {
        f"multi_modal_projector.{n}.weight" for n in ("ln_pre", "linear_1", "ln_mid", "linear_2")}
    register_config(ckpt)
    hf = transformers.AutoConfig.from_pretrained(ckpt)
    assert hf.model_type == "ultravox" and hf.text_config.model_type == "llama"
    assert hf.audio_config.d_model == config["audio_config"]["d_model"]
    slice_ = load_placeholders(ckpt)
    assert slice_.modalities == ("audio",) and slice_.audio_token_id == config["audio_token_index"]
    assert enc.hidden_size == config["text_config"]["hidden_size"]


def test_token_counts_of_the_published_geometry():
    """At the released checkpoints' sizes (Whisper's 1500 positions, stack 8): 188 tokens per
    full 30 s chunk (vLLM's count), a partial last chunk by its own frames."""
    geo = UltravoxGeometry({"stack_factor": 8, "audio_config": {"max_source_positions": 1500}},
                           {})
    tokens = lambda s: geo.audio(int(s * 16_000), 16_000).num_tokens  # noqa: E731
    assert tokens(30) == 188 and tokens(60) == 376 and tokens(1) == 7 and tokens(0.1) == 1
    assert tokens(30.02) == 189 and tokens(100) == 3 * 188 + math.ceil(500 / 8)
    with pytest.raises(ValueError, match="too short"):
        geo.audio(100, 16_000)


def test_whisper_part_matches_transformers_whisper_encoder(ckpt, enc, weights, tmp_path):
    config = transformers.AutoConfig.from_pretrained(ckpt).audio_config
    ref = transformers.models.whisper.modeling_whisper.WhisperEncoder(config).eval()
    ref.load_state_dict({k.removeprefix("audio_tower."): v for k, v in weights.items()
                         if k.startswith("audio_tower.")})
    x = clip(1, 2.0)  # exactly one window: 200 frames
    features = enc.preprocess_audio(x, None)
    assert features.values.shape == (1, config.num_mel_bins, 200) and features.frames == (200,)
    with torch.no_grad():
        want = ref(features.values).last_hidden_state
        got = enc.tower.audio_tower(features.values, [200])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the other published layout of the tower's names loads the same weights
    import shutil

    other = tmp_path / "nested"
    shutil.copytree(ckpt, other)
    save_file({k.replace("audio_tower.", "audio_tower.model.encoder.", 1): v
               for k, v in weights.items()}, str(other / "model.safetensors"))
    nested = UltravoxEncoder(str(other), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(nested.encode_packed([features])[0],
                               enc.encode_packed([features])[0], rtol=0, atol=0)


def published_projector(rows: torch.Tensor, w: dict, stack: int, swap: bool = False):
    """fixie-ai's UltravoxProjector (projector_act swiglu, projector_ln_mid), step by step."""
    def rms(x, g):
        return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    b, t, c = rows.shape
    t_pad = (t + stack - 1) // stack * stack
    x = F.pad(rows, (0, 0, 0, t_pad - t)).reshape(b, t_pad // stack, c * stack)
    h = rms(x, w["multi_modal_projector.ln_pre.weight"]) @ w["multi_modal_projector.linear_1.weight"].T
    value, gate = h.chunk(2, dim=-1)
    if swap:
        value, gate = gate, value
    h = rms(F.silu(gate) * value, w["multi_modal_projector.ln_mid.weight"])
    return h @ w["multi_modal_projector.linear_2.weight"].T


def test_projector_matches_the_published_architecture(ckpt, enc, weights):
    stack = json.loads(open(f"{ckpt}/config.json").read())["stack_factor"]
    rows = torch.randn(2, 50, enc.tower.audio_tower.dim)  # 50 rows: the last stack is padded
    with torch.no_grad():
        got = enc.tower.multi_modal_projector(rows)
    assert got.shape == (2, math.ceil(50 / stack), enc.hidden_size)
    torch.testing.assert_close(got, published_projector(rows, weights, stack), rtol=1e-4,
                               atol=1e-5)
    assert not torch.allclose(got, published_projector(rows, weights, stack, swap=True),
                              atol=1e-3)


class HFLlama:
    """transformers' LlamaForCausalLM from text_config and the language_model.* weights; audio
    rows spliced into the prompt's embeddings where the placeholder is."""

    def __init__(self, ckpt: str, weights: dict):
        config = json.loads(open(f"{ckpt}/config.json").read())
        self.audio = config["audio_token_index"]
        self.tok = transformers.AutoTokenizer.from_pretrained(ckpt)
        self.lm = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**config["text_config"])).eval()
        self.lm.load_state_dict({k.removeprefix("language_model."): v
                                 for k, v in weights.items() if k.startswith("language_model.")})

    def greedy(self, text: str, rows: list[torch.Tensor], n: int) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        assert ids.count(self.audio) == len(rows)
        parts, it = [], iter(rows)
        emb = self.lm.get_input_embeddings()
        for t in ids:
            parts.append(next(it) if t == self.audio else emb(torch.tensor([t])))
        embeds = torch.cat(parts)[None]
        with torch.no_grad():
            out = self.lm.generate(inputs_embeds=embeds, max_new_tokens=n, do_sample=False,
                                   attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                   eos_token_id=[])
        return out[0].tolist()


def test_lm_matches_llama_and_answers_depend_on_the_audio(llm, enc, ckpt, weights):
    hf = HFLlama(ckpt, weights)
    a, b = clip(2, 5.0), clip(3, 1.3)  # 5 s: three chunks of the 2 s window
    cases = [(prompt("Listen <|audio|>What is it?"), [a]),
             (prompt("<|audio|> and <|audio|>?"), [a, b]),
             (prompt("<|audio|> and <|audio|>?"), [b, a])]
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"audio": [(c, 16_000) for c in cs]}}
                         for p, cs in cases], GREEDY)
    got = [o.outputs[0].token_ids for o in outs]
    with torch.no_grad():
        rows = {id(c): enc.encode_packed([enc.preprocess_audio(c, None)])[0] for c in (a, b)}
    assert rows[id(a)].shape[0] == 63  # 25 + 25 + 13 tokens
    assert got == [hf.greedy(p, [rows[id(c)] for c in cs], N) for p, cs in cases]
    assert got[1] != got[2], "swapping the clips must change the answer"


@pytest.mark.slow
def test_tensor_parallel_workers_load_the_checkpoint(llm, ckpt):
    """TP workers are fresh processes: they register Ultravox's config class themselves, and
    TP=2 answers as TP=1 does."""
    x = clip(5, 2.5)
    p = {"prompt": prompt("Hear <|audio|> now"), "multi_modal_data": {"audio": (x, 16_000)}}
    want = llm.generate(p, GREEDY)[0].outputs[0].token_ids
    tp2 = LLM(ckpt, tensor_parallel_size=2, executor="mp", max_num_batched_tokens=32)
    try:
        assert tp2.generate(p, GREEDY)[0].outputs[0].token_ids == want
    finally:
        tp2.engine.shutdown()


@pytest.mark.slow
def test_answers_are_deterministic_and_stable_across_runs(llm, ckpt):
    x = clip(4, 3.1, 44_100)
    p = {"prompt": prompt("Hear <|audio|> now"), "multi_modal_data": {"audio": (x, 44_100)}}
    first = llm.generate(p, GREEDY)[0].outputs[0].token_ids
    assert llm.generate(p, GREEDY)[0].outputs[0].token_ids == first
    assert LLM(ckpt).generate(p, GREEDY)[0].outputs[0].token_ids == first  # a fresh run
    # and over HTTP (the encoder and decoder in their own processes)
    srv = Server(ckpt, "--max-num-batched-tokens", "32")
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)
        data = base64.b64encode(wav16(x, 44_100)).decode()
        content = [{"type": "text", "text": "Hear "},
                   {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                   {"type": "text", "text": " now"}]
        answers = [client.chat.completions.create(
            model=client.models.list().data[0].id, max_tokens=N, temperature=0,
            extra_body={"ignore_eos": True}, messages=[{"role": "user", "content": content}]
        ).choices[0].message.content for _ in range(2)]
        offline = llm.chat([{"role": "user", "content": content}], GREEDY)[0].outputs[0].text
        assert answers[0] == answers[1] == offline != ""
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The released checkpoints' layout, the default build's weights less the audio row."""
    from frontend.random_audio import build_random_ultravox

    return str(build_random_ultravox(tmp_path_factory.mktemp("ultravox_released"),
                                     audio_token_in_vocab=False))


@pytest.fixture(scope="module")
def released_llm(released):
    return LLM(released, max_num_batched_tokens=32)


def test_released_layout_has_no_audio_token(released, ckpt):
    config = json.loads(open(f"{released}/config.json").read())
    tok = transformers.AutoTokenizer.from_pretrained(released)
    assert config["audio_token_index"] == config["text_config"]["vocab_size"] == len(tok)
    assert "<|audio|>" not in tok.get_vocab() and len(tok.encode("<|audio|>")) > 1
    assert config["audio_token_index"] == json.loads(
        open(f"{ckpt}/config.json").read())["audio_token_index"]


def test_released_layout_answers_as_the_in_vocab_checkpoint(llm, released_llm, released):
    """``<|audio|>`` as text, wherever BPE merges it with its neighbours (" <|", "|>?"), and a
    chat input_audio part: the same prompt ids and the same greedy tokens as the checkpoint
    whose tokenizer has the token."""
    audio_id = json.loads(open(f"{released}/config.json").read())["audio_token_index"]
    a, b = clip(2, 5.0), clip(3, 1.3)
    prompts = [{"prompt": prompt(body), "multi_modal_data": {"audio": [(c, 16_000) for c in cs]}}
               for body, cs in (("Listen <|audio|>What is it?", [a]),
                                ("<|audio|> and <|audio|>?", [a, b]),
                                ("Hear <|audio|> now", [b]))]
    want = llm.generate(prompts, GREEDY)
    got = released_llm.generate(prompts, GREEDY)
    assert [o.prompt_token_ids for o in got] == [o.prompt_token_ids for o in want]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert all(audio_id not in o.outputs[0].token_ids for o in want)  # the premise of parity
    assert got[0].prompt_token_ids.count(audio_id) == 63
    # a repetition penalty reads the prompt's ids: the placeholder's is past the logits
    penalised = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True,
                               repetition_penalty=1.5)
    assert (released_llm.generate(prompts[0], penalised)[0].outputs[0].token_ids
            == llm.generate(prompts[0], penalised)[0].outputs[0].token_ids)
    content = [{"type": "text", "text": "Hear "},
               {"type": "input_audio",
                "input_audio": {"data": base64.b64encode(wav16(b, 16_000)).decode(),
                                "format": "wav"}},
               {"type": "text", "text": " now"}]
    chat = [{"role": "user", "content": content}]
    w, g = llm.chat(chat, GREEDY)[0], released_llm.chat(chat, GREEDY)[0]
    assert g.prompt_token_ids == w.prompt_token_ids and audio_id in g.prompt_token_ids
    assert g.outputs[0].token_ids == w.outputs[0].token_ids
    # a client's own ids, the placeholder id once per clip
    enc = released_llm.get_tokenizer().encode
    before, after = prompt("Hear <|audio|> now").split("<|audio|>")
    given = {"prompt_token_ids": [*enc(before), audio_id, *enc(after)],
             "multi_modal_data": {"audio": (b, 16_000)}}
    assert (released_llm.generate(given, GREEDY)[0].outputs[0].token_ids
            == llm.generate(given, GREEDY)[0].outputs[0].token_ids)


def test_released_layout_refuses_ids_past_the_vocabulary_outside_clips(released_llm, released):
    vocab = json.loads(open(f"{released}/config.json").read())["text_config"]["vocab_size"]
    with pytest.raises(ValueError, match="out of vocabulary") as e:
        released_llm.generate({"prompt_token_ids": [5, vocab, 6]}, GREEDY)
    assert e.value.param == "prompt"
    with pytest.raises(ValueError, match="out of vocabulary"):  # a clip's id, but no clip there
        released_llm.generate({"prompt_token_ids": [5, vocab, 6, vocab + 1],
                               "multi_modal_data": {"audio": (clip(1, 0.5), 16_000)}}, GREEDY)
    # the engine's own check, a peer that skipped the frontend's
    core, greedy = released_llm.engine, Sampling(max_tokens=2)
    item = MMItem("k", "audio", 1, 2, {})
    err = core.validate(GenerateRequest("bad", [5, vocab, vocab, 6, vocab], greedy, [], "", [item]))
    assert err == f"prompt token ids must be in [0, {vocab}) outside media items"
    assert core.validate(GenerateRequest("ok", [5, vocab, vocab, 6], greedy, [], "", [item])) is None


@pytest.mark.slow
def test_released_layout_over_http(llm, released):
    srv = Server(released, "--max-num-batched-tokens", "32")
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)
        x = clip(4, 3.1, 44_100)
        content = [{"type": "text", "text": "Hear "},
                   {"type": "input_audio", "input_audio": {
                       "data": base64.b64encode(wav16(x, 44_100)).decode(), "format": "wav"}},
                   {"type": "text", "text": " now?"}]
        messages = [{"role": "user", "content": content}]
        answer = client.chat.completions.create(
            model=client.models.list().data[0].id, max_tokens=N, temperature=0,
            extra_body={"ignore_eos": True}, messages=messages).choices[0].message.content
        assert answer == llm.chat(messages, GREEDY)[0].outputs[0].text != ""
    finally:
        srv.stop()
