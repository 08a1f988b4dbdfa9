"""`mmserve` command line: one subcommand per role, each implemented beside its role.

    mmserve serve [MODEL]     frontend + encoders + engine core as child processes, one URL
                              printed when ready (frontend/launcher.py)
    mmserve frontend ...      the HTTP tier alone (for deploy/)
    mmserve llm-worker ...    one engine core alone (llm_worker/cli.py)
    mmserve encoder ...       one encoder worker alone (encoder_worker/cli.py); --join ADDR
                              enters a live pool
    mmserve registry ...      the encoder pool's registry alone (for deploy/)

Every role's settings are flags generated from its config dataclass (FrontendConfig,
EncoderConfig, LLMWorkerConfig; protocol/config_flags.py); `serve` takes all three.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from encoder_worker import cli as encoder_cli
from encoder_worker.config import EncoderConfig
from frontend import env
from frontend.config import FrontendConfig
from llm_worker import cli as llm_worker_cli
from llm_worker.config import LLMWorkerConfig
from protocol import timeline
from protocol.config_flags import add_config_args, config_from_args
from protocol.procs import setup_logging
from protocol.role_flags import add_exit_with_parent

# The fields `mmserve serve` sets on its children itself (the model, addresses, the pool);
# every other field of the three configs is a flag of `serve` (tests/frontend/test_config_flags.py).
SET_BY_SERVE: dict[type, tuple[str, ...]] = {
    FrontendConfig: ("model", "engine_addr", "reply_addr", "encoder_addrs", "encoder_registry",
                     "reuse_port"),
    LLMWorkerConfig: ("model",),
    EncoderConfig: ("model", "join"),
}


def _add_vllm_args(p: argparse.ArgumentParser) -> None:
    """vLLM flags with no config field here, so vLLM command lines run unchanged; a value
    mmserve can't honour stops with a clear error (frontend.offline.llm.check_vllm_options)."""
    g = p.add_argument_group("vLLM compatibility")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="accepted; checkpoint code is never run (architectures are built in)")
    g.add_argument("--runner", default="auto", help="auto or generate")
    g.add_argument("--revision", default=None, help=argparse.SUPPRESS)
    g.add_argument("--tokenizer-revision", default=None, help=argparse.SUPPRESS)
    g.add_argument("--quantization", "-q", default=None, help=argparse.SUPPRESS)
    g.add_argument("--kv-cache-dtype", default="auto", help=argparse.SUPPRESS)
    g.add_argument("--swap-space", type=float, default=4, help=argparse.SUPPRESS)
    g.add_argument("--disable-log-stats", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--disable-log-requests", action="store_true", help=argparse.SUPPRESS)


def _check_vllm_args(args: argparse.Namespace) -> None:
    from frontend.offline.llm import check_vllm_options

    if not hasattr(args, "runner"):
        return
    check_vllm_options(runner=args.runner, revision=args.revision,
                       tokenizer_revision=args.tokenizer_revision,
                       quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                       trust_remote_code=args.trust_remote_code)
    if args.swap_space < 0:
        raise ValueError(f"--swap-space must be >= 0, got {args.swap_space}")


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve a model: frontend + engine core")
    # Hand-written: the model is positional here (vLLM's spelling), and the topology of the
    # children is no role's config.
    serve.add_argument("model", nargs="?", default=None,
                       help="local HF checkpoint folder (default: the built-in model)")
    serve.add_argument("--encoders", type=int, default=None,
                       help="encoder workers to start (default: 1 for a multimodal model, else 0)")
    serve.add_argument("--num-frontends", type=int, default=1,
                       help="frontend processes, all on --port (SO_REUSEPORT)")
    serve.add_argument("--registry-addr", default=None,
                       help="where the encoder pool's registry listens, for `mmserve encoder "
                            "--join` (default: a free loopback port, printed when ready)")
    for cls, title in ((FrontendConfig, "frontend"), (LLMWorkerConfig, "engine"),
                       (EncoderConfig, "encoder")):
        add_config_args(serve, cls, title, exclude=SET_BY_SERVE[cls])
    _add_vllm_args(serve)


def _add_frontend_parser(sub: argparse._SubParsersAction) -> None:
    fe = sub.add_parser("frontend", help="run the HTTP frontend alone")
    add_config_args(fe, FrontendConfig, "frontend")
    _add_vllm_args(fe)
    add_exit_with_parent(fe)


def _prepare_frontend(args: argparse.Namespace) -> Callable[[], object]:
    from frontend.models import load_placeholders
    from frontend.openai.api_server import run_frontend

    if args.engine_addr is None:
        raise ValueError("--engine-addr is required (the engine core's input address)")
    config = config_from_args(FrontendConfig, args)
    # An unknown architecture or refused --mm-processor-kwargs stops here.
    load_placeholders(config.model, config.mm_processor_kwargs)
    return lambda: run_frontend(config)


def _add_registry_parser(sub: argparse._SubParsersAction) -> None:
    # Hand-written: the registry has no config dataclass (an address and one timeout).
    reg = sub.add_parser("registry", help="run the encoder pool's registry alone")
    reg.add_argument("--addr", required=True, help="address to bind, e.g. tcp://0.0.0.0:5600")
    reg.add_argument("--expire-s", type=float, default=2.0,
                     help="an encoder silent this long leaves the pool")
    add_exit_with_parent(reg)


def _prepare_registry(args: argparse.Namespace) -> Callable[[], object]:
    from frontend.registry import run_registry

    if args.expire_s <= 0:
        raise ValueError("--expire-s must be > 0")
    return lambda: run_registry(args.addr, args.expire_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(sub)
    _add_frontend_parser(sub)
    _add_vllm_args(llm_worker_cli.add_parser(sub))
    encoder_cli.add_parser(sub)
    _add_registry_parser(sub)
    return parser


def _prepare(args: argparse.Namespace) -> Callable[[], object]:
    if args.command == "serve":
        from frontend.launcher import prepare

        return prepare(args)
    prepare = {"frontend": _prepare_frontend, "llm-worker": llm_worker_cli.prepare,
               "encoder": encoder_cli.prepare, "registry": _prepare_registry}[args.command]
    return prepare(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.command, env.log_level())
    timeline.init(args.command, env.timeline_dir())
    if getattr(args, "exit_with_parent", False):
        from protocol.procs import exit_with_parent

        exit_with_parent()
    if isinstance(getattr(args, "model", None), str):
        # Roles read the checkpoint through AutoConfig; Ultravox's config is not in it.
        from protocol.models import register_config

        register_config(args.model)
    try:
        # Every flag and the checkpoint itself (architecture, lengths) are checked here, before
        # any process starts or any weight loads: a mistake is one line and exit code 2.
        _check_vllm_args(args)
        run = _prepare(args)
    except ValueError as e:
        print(f"mmserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    return run() or 0


if __name__ == "__main__":
    sys.exit(main())
