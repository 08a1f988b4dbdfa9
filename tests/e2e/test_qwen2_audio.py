"""Audio input for Qwen2-Audio end to end (issue 11): greedy parity with transformers'
`Qwen2AudioForConditionalGeneration` through LLM.generate (one clip, two clips, clips at 8 /
16 / 44.1 kHz), LLM.chat (input_audio parts) and HTTP with the official openai client
(input_audio, audio_url as data / file / http URL, a uuid reused by ``null``); swapping two
clips changes the answer, so each clip's rows reach its own placeholders. Bad audio over HTTP is
a 400 naming the part, and the server keeps serving.

The tiny checkpoint's window is 4 s (``frontend.random_audio``): a 5 s clip is cut to it, as
transformers' processor cuts a 40 s clip for the real model."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
from image_host import ImageHost
from qwen2_audio_utils import AUDIO, HFQwen2Audio, at_16k, clip, pcm16, wav16
from server_utils import Server, get

from frontend import LLM, SamplingParams
from frontend.errors import RequestError
from frontend.media.audio import float_wav

N = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)


def prompt(*texts_and_clips: str) -> str:
    body = "".join(texts_and_clips)
    return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from frontend.random_audio import build_random_qwen2_audio

    return str(build_random_qwen2_audio(tmp_path_factory.mktemp("qwen2_audio")))


@pytest.fixture(scope="module")
def hf(ckpt):
    return HFQwen2Audio(ckpt)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, max_num_batched_tokens=32)  # prompts span several prefill chunks


def tokens(out) -> list[int]:
    return [o.outputs[0].token_ids for o in out]


def test_generate_parity_one_and_two_clips(llm, hf):
    a, b = clip(1, 1.3), clip(2, 2.2)
    one = prompt(f"Audio 1: {AUDIO}\nWhat is this?")
    two = prompt(f"Audio 1: {AUDIO}\nAudio 2: {AUDIO}\nCompare them.")
    long = clip(3, 5.0)  # past the 4 s window: cut to it
    cases = [(one, [a]), (two, [a, b]), (two, [b, a]), (one, [long])]
    got = tokens(llm.generate([{"prompt": p, "multi_modal_data": {"audio": [(c, 16_000)
                                                                            for c in cs]}}
                               for p, cs in cases], GREEDY))
    assert got == [hf.greedy(p, cs, N) for p, cs in cases]
    assert got[1] != got[2], "swapping the clips must change the answer"
    assert len({tuple(g) for g in got}) == 4


@pytest.mark.parametrize("rate", [8_000, 16_000, 44_100])
def test_generate_parity_across_sample_rates(llm, hf, rate):
    x = clip(10 + rate, 1.7, rate)
    p = prompt(f"Audio 1: {AUDIO}\nWhat rate?")
    got = tokens(llm.generate({"prompt": p, "multi_modal_data": {"audio": (x, rate)}}, GREEDY))
    assert got == [hf.greedy(p, [at_16k(x, rate)], N)]
    # A stereo clip is down-mixed: the same clip on both channels answers the same.
    stereo = np.stack([x, x])
    assert tokens(llm.generate({"prompt": p, "multi_modal_data": {"audio": (stereo, rate)}},
                               GREEDY)) == got


def test_chat_parity_input_audio(llm, hf):
    a, b = clip(4, 1.1, 8_000), clip(5, 0.9)
    content = [{"type": "text", "text": "Listen:"},
               {"type": "input_audio", "input_audio": {
                   "data": base64.b64encode(wav16(a, 8_000, channels=2)).decode(),
                   "format": "wav"}},
               {"type": "input_audio", "input_audio": {
                   "data": base64.b64encode(float_wav(b[:, None], 16_000)).decode(),
                   "format": "wav"}},
               {"type": "text", "text": "and answer."}]
    got = tokens(llm.chat([{"role": "user", "content": content}], GREEDY))
    want = hf.greedy(hf.chat_prompt(content), [at_16k(pcm16(a), 8_000), b], N)
    assert got == [want]


def test_uuid_reuse_and_audio_embeddings(llm, hf):
    x = clip(6, 1.5)
    p = prompt(f"Audio 1: {AUDIO}\nAgain?")
    first = llm.generate({"prompt": p, "multi_modal_data": {"audio": (x, 16_000)},
                          "multi_modal_uuids": {"audio": ["clip-6"]}}, GREEDY)
    again = llm.generate({"prompt": p, "multi_modal_data": {"audio": [None]},
                          "multi_modal_uuids": {"audio": ["clip-6"]}}, GREEDY)
    want = hf.greedy(p, [x], N)
    assert tokens(first) == tokens(again) == [want]
    # transformers' own rows for the clip, given as embeddings, answer as the clip does.
    out = llm.generate({"prompt": p, "multi_modal_data": {"audio": hf.audio_rows(x)}}, GREEDY)
    assert tokens(out) == [want]
    assert tokens(llm.generate({"prompt": p, "multi_modal_data": {
        "audio": hf.audio_rows(clip(7, 1.5))}}, GREEDY)) != [want]


def test_offline_refusals(llm):
    p = prompt(f"Audio 1: {AUDIO}\n?")

    def refused(data, param, match):
        with pytest.raises(RequestError, match=match) as e:
            llm.generate({"prompt": p, "multi_modal_data": data}, GREEDY)
        assert e.value.param == param and e.value.status == 400

    where = "prompts[0].multi_modal_data"
    refused({"audio": (np.zeros(0, np.float32), 16_000)}, f"{where}.audio", "empty")
    refused({"audio": (np.zeros(100, np.float32), 16_000)}, f"{where}.audio", "too short")
    refused({"audio": (np.zeros(10, np.int16), 16_000)}, f"{where}.audio", "floating")
    refused({"audio": (clip(0), 100)}, f"{where}.audio", "sample rate")
    refused({"audio": (np.zeros((9, 1000), np.float32), 16_000)}, f"{where}.audio", "channels")
    refused({"audio": [(clip(0), 16_000)] * 5}, where, "at most 4 audio")
    refused({"audio": [None]}, f"{where}.audio[0]", "uuid")
    refused({"audio": "a.wav"}, f"{where}.audio", "tuple")
    assert not llm.engine.has_work()


# -- HTTP -----------------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def input_audio(data: bytes, fmt: str = "wav", uuid: str | None = None) -> dict:
    part: dict = {"type": "input_audio", "input_audio": {"data": _b64(data), "format": fmt}}
    if uuid:
        part["uuid"] = uuid
    return part


def audio_url(url: str | None, uuid: str | None = None) -> dict:
    part: dict = {"type": "audio_url", "audio_url": None if url is None else {"url": url}}
    if uuid:
        part["uuid"] = uuid
    return part


def ten_hour_flac() -> bytes:
    """A real 1 s FLAC whose STREAMINFO declares 10 hours of samples."""
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="flac") as c:
        s = c.add_stream("flac", rate=16_000)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray((clip(0)[None] * 30000).astype(np.int16),
                                           format="s16", layout="mono")
        frame.sample_rate = 16_000
        for pkt in [*s.encode(frame), *s.encode(None)]:
            c.mux(pkt)
    data = bytearray(buf.getvalue())
    info = int.from_bytes(data[18:26], "big")  # rate(20) channels(3) bits(5) total samples(36)
    info = (info & ~((1 << 36) - 1)) | (16_000 * 36_000)
    data[18:26] = info.to_bytes(8, "big")
    return bytes(data)


@pytest.mark.slow
def test_http_parity_and_bad_audio(ckpt, hf, tmp_path):
    a, b = clip(7, 1.2, 44_100), clip(8, 0.8)
    wav_a, wav_b = wav16(a, 44_100), wav16(b, 16_000)
    (tmp_path / "b.wav").write_bytes(wav_b)
    host = ImageHost({"b.wav": wav_b})
    srv = Server(ckpt, "--max-num-batched-tokens", "32", "--limit-mm-per-prompt",
                 '{"audio": 2}', "--allowed-local-media-path", str(tmp_path),
                 "--allowed-media-domains", "127.0.0.1", "--max-media-bytes",
                 str(200_000))
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id

        def ask(*parts: dict) -> str:
            content = [{"type": "text", "text": "Hear"}, *parts,
                       {"type": "text", "text": "now"}]
            resp = client.chat.completions.create(
                model=model, max_tokens=N, temperature=0,
                messages=[{"role": "user", "content": content}],
                extra_body={"ignore_eos": True})
            return resp.choices[0].message.content

        def want(*clips: np.ndarray) -> str:
            content = [{"type": "text", "text": "Hear"}, *[{"type": "audio"}] * len(clips),
                       {"type": "text", "text": "now"}]
            ids = hf.greedy(hf.chat_prompt(content), list(clips), N)
            return hf.tok.decode(ids, skip_special_tokens=True)

        ref_a, ref_b = at_16k(pcm16(a), 44_100), pcm16(b)
        both = want(ref_a, ref_b)
        assert ask(input_audio(wav_a, uuid="clip-a"),
                   audio_url("data:audio/wav;base64," + _b64(wav_b))) == both != ""
        assert ask(audio_url(f"file://{tmp_path}/b.wav"), input_audio(wav_a)) == want(ref_b,
                                                                                       ref_a)
        assert ask(audio_url(f"{host.base}/img/b.wav")) == want(ref_b)
        assert ask({"type": "input_audio", "input_audio": None, "uuid": "clip-a"}) == want(ref_a)
        assert ask(audio_url(None, uuid="clip-a")) == want(ref_a)

        def bad(parts: list[dict], param: str, match: str) -> None:
            with pytest.raises(openai.BadRequestError) as e:
                ask(*parts)
            err = e.value.body
            assert err["param"] == param and match in err["message"], err

        at = "messages[0].content[1]"
        bad([input_audio(b"RIFF\0\0\0\0WAVEjunkjunkjunk")], f"{at}.input_audio.data",
            "cannot decode audio")
        bad([input_audio(b"\x00" * 64)], f"{at}.input_audio.data", "not a wav")
        bad([input_audio(wav16(np.zeros(0, np.float32), 16_000))], f"{at}.input_audio.data",
            "empty")
        bad([input_audio(ten_hour_flac(), "flac")], f"{at}.input_audio.data", "too long")
        bad([input_audio(wav_b, "mp3")], f"{at}.input_audio.format", "wav file")
        bad([input_audio(wav_b, "aiff")], f"{at}.input_audio.format", "one of")
        bad([input_audio(wav_b)] * 3, "messages", "at most 2 audio")
        bad([input_audio(wav16(clip(9, 7.0), 16_000))], f"{at}.input_audio.data",
            "larger than 200000 bytes")
        # the SSRF guards apply: only the allowed host, on every redirect hop
        hits = len(host.hits)
        bad([audio_url(f"http://localhost:{host.port}/img/b.wav")], f"{at}.audio_url",
            "not allowed")
        bad([audio_url(f"{host.base}/redirect")], f"{at}.audio_url", "not allowed")
        assert host.hits[hits:] == ["/redirect"]
        bad([audio_url(None, uuid="never-sent")], f"{at}.audio_url", "uuid")
        assert get(srv.base + "/health")[0] == 200
        assert ask(input_audio(wav_b)) == want(ref_b)  # still serving
    finally:
        srv.stop()
        host.stop()


def test_chat_string_content_format_places_the_clip(llm, hf):
    """A string-content template gets each clip as Qwen2-Audio's placeholder text
    (``<|audio_bos|><|AUDIO|><|audio_eos|>``), ahead of the text, as vLLM places it."""
    x = clip(11, 1.0)
    content = [{"type": "text", "text": "What is it?"},
               {"type": "input_audio", "input_audio": {
                   "data": base64.b64encode(float_wav(x[:, None], 16_000)).decode(),
                   "format": "wav"}}]
    got = tokens(llm.chat([{"role": "user", "content": content}], GREEDY,
                          chat_template_content_format="string"))
    assert got == [hf.greedy(prompt(f"{AUDIO}\nWhat is it?"), [x], N)]
