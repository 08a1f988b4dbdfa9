"""One source for every setting: each field of a role's config is a flag of its role's command and
of `mmserve serve` (but those serve sets itself), config -> argv -> config is the identity, and a
bad value is exit code 2 naming the flag. Values are generated from the field's type, so a new
knob is covered without an edit here (only a constrained one needs an entry in _VALID)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from encoder_worker.config import EncoderConfig
from frontend.cli import SET_BY_SERVE, build_parser, main
from frontend.config import FrontendConfig
from llm_worker.config import LLMWorkerConfig
from protocol.config_flags import args_from_config, config_from_args, specs

COMMAND = {FrontendConfig: "frontend", LLMWorkerConfig: "llm-worker", EncoderConfig: "encoder"}
# Hand-written flags each command needs besides the config's own.
EXTRA = {"frontend": [], "llm-worker": ["--input-addr", "tcp://127.0.0.1:1"],
         "encoder": ["--input-addr", "tcp://127.0.0.1:1"]}
# Non-default values that __post_init__ accepts, where one made from the type would not.
_VALID = {
    "gpu_memory_utilization": 0.5, "device": "cpu", "executor": "mp", "max_model_len": 64,
    "host": "0.0.0.0", "engine_addr": "tcp://127.0.0.1:5", "reply_addr": "tcp://127.0.0.1:6",
    "encoder_addrs": ("tcp://127.0.0.1:7", "tcp://127.0.0.1:8"), "response_role": "user",
    "encoder_registry": "tcp://127.0.0.1:9", "join": "tcp://127.0.0.1:9",
    "allowed_media_domains": ("example.com", "cdn.example.org"),
    "limit_mm_per_prompt": {"image": 2, "video": 0},
    "media_io_kwargs": {"video": {"num_frames": 4}}, "mm_processor_kwargs": {"max_pixels": 1000},
}


def _changed(spec, model: str, tmp) -> object:
    """A value of ``spec``'s field other than its default."""
    if spec.name in ("model", "tokenizer"):
        return model
    if spec.name == "chat_template":
        (tmp / "t.jinja").write_text("{{ messages }}")
        return str(tmp / "t.jinja")
    if spec.name == "allowed_local_media_path":
        return str(tmp)
    if spec.name in _VALID:
        return _VALID[spec.name]
    d = spec.default
    if spec.kind == "bool":
        return not d
    if spec.meta.get("choices"):
        return next(c for c in spec.meta["choices"] if c != d)
    if spec.kind == "list":
        return ("a", "b")
    field_type = spec.type if spec.kind == "scalar" else None
    if "unit" in spec.meta:
        return d * 2
    if field_type is int:
        return 3 if d is None else (d or 1) * 2
    if field_type is float:
        return 3.0 if d is None else (d or 1.0) * 2
    raise AssertionError(f"{spec.name}: add a valid non-default value to _VALID")


@pytest.fixture
def changed(tiny_llava, tmp_path):
    """Every config with every field off its default (a TP=2 engine, CUDA graphs off)."""
    return {cls: cls(**{s.name: _changed(s, tiny_llava, tmp_path) for s in specs(cls)})
            for cls in COMMAND}


def _sub(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("cls", list(COMMAND))
def test_every_field_is_a_flag_of_its_command_and_of_serve(cls):
    role, serve = _sub(COMMAND[cls])._option_string_actions, _sub("serve")._option_string_actions
    flags = {s.name: s for s in specs(cls)}
    for f in dataclasses.fields(cls):
        s = flags[f.name]
        assert role[s.flag].dest == s.dest, f.name
        if f.name not in SET_BY_SERVE[cls]:
            assert serve[s.flag].dest == s.dest, f"{f.name} is no flag of mmserve serve"


@pytest.mark.parametrize("cls", list(COMMAND))
def test_config_argv_config_is_the_identity(cls, changed):
    cfg = changed[cls]
    argv = args_from_config(cfg)
    # Every field is off its default, so every field is on the command line.
    assert len([a for a in argv if a.startswith("--")]) == len(dataclasses.fields(cls))
    for want in (cfg, cls(model=cfg.model)):  # and one with every default
        ns = build_parser().parse_args([COMMAND[cls], *args_from_config(want),
                                        *EXTRA[COMMAND[cls]]])
        assert config_from_args(cls, ns) == want


def test_serve_hands_every_role_its_flags(changed):
    model = changed[LLMWorkerConfig].model
    argv = ["serve", model]
    for cls, cfg in changed.items():
        argv += args_from_config(cfg, exclude=SET_BY_SERVE[cls])
    ns = build_parser().parse_args(argv)
    for cls, cfg in changed.items():
        own = {name: getattr(cfg, name) for name in SET_BY_SERVE[cls]}
        assert config_from_args(cls, ns, **own) == cfg


@pytest.mark.parametrize("cls", list(COMMAND))
def test_an_unparsable_value_is_exit_2_naming_the_flag(cls, tiny_llava, capsys):
    for s in specs(cls):
        if s.kind in ("bool", "list") or (s.type is str and not s.meta.get("choices")):
            continue  # any word is a value
        for command in (COMMAND[cls], "serve"):
            if command == "serve" and s.name in SET_BY_SERVE[cls]:
                continue
            head = ["serve", tiny_llava] if command == "serve" else [
                command, "--model", tiny_llava, *EXTRA[command]]
            with pytest.raises(SystemExit) as e:
                build_parser().parse_args([*head, s.flag, "{not-a-value"])
            assert e.value.code == 2 and s.flag in capsys.readouterr().err, (command, s.flag)


@pytest.mark.parametrize("argv, flag", [
    (["llm-worker", "--input-addr", "tcp://127.0.0.1:1", "--max-num-seqs", "0"], "--max-num-seqs"),
    (["serve", "--block-size", "12"], "--block-size"),
    (["serve", "-tp", "3"], "--tensor-parallel-size"),
    (["serve", "--max-body-mb", "0.0001"], "--max-body-mb"),
    (["frontend", "--engine-addr", "tcp://h:1", "--limit-mm-per-prompt", '{"smell": 1}'],
     "--limit-mm-per-prompt"),
    (["encoder", "--input-addr", "tcp://127.0.0.1:1", "--encoder-decode-threads", "0"],
     "--encoder-decode-threads"),
    (["encoder", "--join", "http://x"], "--join"),
])
def test_a_refused_value_is_exit_2_naming_the_flag(tiny_llava, capsys, argv, flag):
    model = [tiny_llava] if argv[0] == "serve" else ["--model", tiny_llava]
    assert main([argv[0], *model, *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag}: " in err and "Traceback" not in err, err


def test_llm_takes_every_engine_field_and_refuses_others(tiny_llama):
    from frontend import LLM
    from frontend.offline.llm import engine_config

    fields = {f.name for f in dataclasses.fields(LLMWorkerConfig)} - {"model"}
    cfg = engine_config(tiny_llama, {"embedding_cache_gb": 0.5, "attention_backend": "torch",
                                     "ray_placement": "SPREAD"})
    assert (cfg.embedding_cache_gb, cfg.attention_backend, cfg.ray_placement) == (
        0.5, "torch", "SPREAD")
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(tiny_llama, max_num_seq=4)
    assert fields >= {"tensor_parallel_size", "gpu_memory_utilization", "enforce_eager"}
