"""`mmserve` command line: every role's config is built from flags here, in one place.

    mmserve serve [MODEL]     frontend + engine core as child processes, one URL printed when ready
    mmserve frontend ...      the HTTP tier alone (for deploy/)
    mmserve llm-worker ...    one engine core alone (for deploy/)
    mmserve encoder ...       one encoder worker alone (for deploy/); --join ADDR enters a live pool
    mmserve registry ...      the encoder pool's registry alone (for deploy/)
"""

from __future__ import annotations

import argparse
import sys

from frontend import env
from protocol.procs import setup_logging


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step; longer prompts are prefilled in chunks")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV cache size in blocks (default: from memory)")
    g.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="CPU KV cache budget")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    g.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", action="store_true",
                   dest="no_prefix_caching")
    g.add_argument("--enable-prefix-caching", action="store_false", dest="no_prefix_caching",
                   help="on by default")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--executor", default="auto", choices=["auto", "uni", "mp", "ray"],
                   help="how the TP workers run: uni (in the engine process, TP=1), mp (one "
                        "process each), ray (one Ray actor each, in a placement group; needs "
                        "mmserve[ray]); auto: uni for TP=1, else mp")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: every decoder step and encoder batch launches its kernels "
                        "eagerly")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, default=0)


def _add_vllm_args(p: argparse.ArgumentParser) -> None:
    """vLLM flags that keep their meaning here, so vLLM command lines run unchanged; a value
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


def _add_frontend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("frontend")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", nargs="+", default=None)
    g.add_argument("--chat-template", default=None, help="Jinja chat template file")
    g.add_argument("--max-n", type=int, default=16, help="largest n (choices) a request may ask")
    g.add_argument("--max-logprobs", type=int, default=20)
    g.add_argument("--max-body-mb", type=float, default=32.0, help="larger bodies answer 413")
    g.add_argument("--chat-template-content-format", default="auto",
                   choices=["auto", "string", "openai"],
                   help="message content as one string or as a list of parts (auto: read the "
                        "template)")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests bring their own chat_template (run sandboxed, bounded)")
    g.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longest prompt in characters, checked before tokenization "
                        "(default: 32 per token of the context length)")
    g.add_argument("--tokenizer-workers", type=int, default=2,
                   help="threads that tokenize and render prompts (each its own tokenizer)")
    g.add_argument("--http-header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers")
    g.add_argument("--http-body-timeout", type=float, default=60.0,
                   help="seconds a client has to send a request's body")


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder-device", default="auto", help="device of the encoder worker(s)")
    g.add_argument("--encoder-store-gb", type=float, default=2.0,
                   help="embedding store of each encoder (LRU by bytes)")


def _add_metrics_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metrics")
    g.add_argument("--metrics-port", type=int, default=None,
                   help="serve this process's Prometheus metrics on this port (default: off)")
    g.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics server binds (0.0.0.0 for a remote Prometheus)")


def metrics_addr(args: argparse.Namespace) -> tuple[str, int] | None:
    if args.metrics_port is None:
        return None
    if not 0 < args.metrics_port < 65536:
        raise ValueError(f"--metrics-port must be in 1..65535, got {args.metrics_port}")
    return args.metrics_host, args.metrics_port


def _add_media_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("media")
    g.add_argument("--allowed-local-media-path", default=None,
                   help="file:// URLs may read only under this folder (default: none)")
    g.add_argument("--allowed-media-domains", nargs="+", default=None,
                   help="fetch media only from these hosts (also lifts the private-address ban "
                        "for them)")
    g.add_argument("--limit-mm-per-prompt", default=None,
                   help='JSON, e.g. \'{"image": 4}\'')
    g.add_argument("--media-io-kwargs", default=None,
                   help='JSON, e.g. \'{"image": {"rgba_background_color": [0, 0, 0]}}\'')
    g.add_argument("--mm-processor-kwargs", default=None,
                   help='JSON processor settings for every request (a request\'s own '
                        'mm_processor_kwargs apply over them), e.g. \'{"max_pixels": 1003520}\'')


def _json_arg(value: str | None, flag: str):
    import json

    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: not valid JSON ({e.msg})") from None


def encoder_config(args: argparse.Namespace):
    from encoder_worker.config import EncoderConfig

    return EncoderConfig(model=args.model, device=args.encoder_device,
                         store_bytes=int(args.encoder_store_gb * (1 << 30)),
                         cuda_graphs=not args.enforce_eager, join=getattr(args, "join", None),
                         drain_timeout_s=getattr(args, "drain_timeout", 30.0))


def engine_config(args: argparse.Namespace):
    from llm_worker.config import LLMWorkerConfig

    return LLMWorkerConfig(
        model=args.model,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size,
        executor=args.executor,
        enforce_eager=args.enforce_eager,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
    )


def frontend_config(args: argparse.Namespace):
    from frontend.config import FrontendConfig

    return FrontendConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        engine_addr=args.engine_addr,
        chat_template=args.chat_template,
        max_n=args.max_n,
        max_logprobs=args.max_logprobs,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        reply_addr=args.reply_addr,
        encoder_addrs=tuple(args.encoder_addrs or ()),
        encoder_registry=getattr(args, "encoder_registry", None),
        reuse_port=getattr(args, "reuse_port", False),
        chat_template_content_format=args.chat_template_content_format,
        trust_request_chat_template=args.trust_request_chat_template,
        max_prompt_chars=args.max_prompt_chars,
        tokenizer_workers=args.tokenizer_workers,
        http_header_timeout_s=args.http_header_timeout,
        http_body_timeout_s=args.http_body_timeout,
        **media_kwargs(args),
    )


def media_kwargs(args: argparse.Namespace) -> dict:
    out: dict = {}
    if args.allowed_local_media_path is not None:
        out["allowed_local_media_path"] = args.allowed_local_media_path
    if args.allowed_media_domains is not None:
        out["allowed_media_domains"] = tuple(args.allowed_media_domains)
    limit = _json_arg(args.limit_mm_per_prompt, "--limit-mm-per-prompt")
    if limit is not None:
        out["limit_mm_per_prompt"] = limit
    io = _json_arg(args.media_io_kwargs, "--media-io-kwargs")
    if io is not None:
        out["media_io_kwargs"] = io
    processor = _json_arg(args.mm_processor_kwargs, "--mm-processor-kwargs")
    if processor is not None:
        out["mm_processor_kwargs"] = processor
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model: frontend + engine core")
    serve.add_argument("model", nargs="?", default=None,
                       help="local HF checkpoint folder (default: the built-in model)")
    serve.add_argument("--encoders", type=int, default=None,
                       help="encoder workers to start (default: 1 for a multimodal model, else 0)")
    serve.add_argument("--num-frontends", type=int, default=1,
                       help="frontend processes, all on --port (SO_REUSEPORT)")
    serve.add_argument("--registry-addr", default=None,
                       help="where the encoder pool's registry listens, for `mmserve encoder "
                            "--join` (default: a free loopback port, printed when ready)")
    _add_frontend_args(serve)
    _add_media_args(serve)
    _add_engine_args(serve)
    _add_encoder_args(serve)
    _add_vllm_args(serve)
    fe = sub.add_parser("frontend", help="run the HTTP frontend alone")
    fe.add_argument("--model", required=True)
    fe.add_argument("--engine-addr", required=True, help="the engine core's input address")
    fe.add_argument("--reply-addr", default=None,
                    help="address engines push outputs to (default: a free loopback port)")
    fe.add_argument("--encoder-addrs", nargs="*", default=None,
                    help="input addresses of the encoder workers")
    fe.add_argument("--encoder-registry", default=None,
                    help="the encoder pool's registry: route to the encoders that join it")
    fe.add_argument("--reuse-port", action="store_true",
                    help="share --port with other frontends (SO_REUSEPORT)")
    _add_frontend_args(fe)
    _add_media_args(fe)
    _add_vllm_args(fe)
    eng = sub.add_parser("llm-worker", help="run one engine core alone")
    eng.add_argument("--model", required=True)
    eng.add_argument("--input-addr", required=True, help="address to bind, e.g. tcp://127.0.0.1:5555")
    _add_engine_args(eng)
    _add_vllm_args(eng)
    eng.add_argument("--embed-addr", default=None,
                     help="address of the embedding inbox (default: a free port on the input host)")
    _add_metrics_args(eng)
    enc = sub.add_parser("encoder", help="run one encoder worker alone")
    enc.add_argument("--model", required=True)
    enc.add_argument("--input-addr", default=None,
                     help="address to bind (required unless --join: then a free loopback port)")
    enc.add_argument("--join", default=None, metavar="ADDR",
                     help="join the encoder pool through its registry at ADDR (live)")
    enc.add_argument("--drain-timeout", type=float, default=30.0,
                     help="on SIGTERM, seconds to finish the items in hand before exiting")
    enc.add_argument("--enforce-eager", action="store_true",
                     help="no CUDA graphs: every tower batch launches its kernels eagerly")
    _add_encoder_args(enc)
    _add_metrics_args(enc)
    reg = sub.add_parser("registry", help="run the encoder pool's registry alone")
    reg.add_argument("--addr", required=True, help="address to bind, e.g. tcp://0.0.0.0:5600")
    reg.add_argument("--expire-s", type=float, default=2.0,
                     help="an encoder silent this long leaves the pool")
    for p in (fe, eng, enc, reg):
        p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.command, env.log_level())
    if getattr(args, "exit_with_parent", False):
        from protocol.procs import exit_with_parent

        exit_with_parent()
    try:
        # Every flag and the checkpoint itself (architecture, lengths) are checked here, before
        # any process starts or any weight loads: a mistake is one line and exit code 2.
        _check_vllm_args(args)
        if args.command == "serve":
            from frontend.launcher import prepare

            run = prepare(args)
        elif args.command == "frontend":
            from frontend.models import load_placeholders
            from frontend.openai.api_server import run_frontend

            config = frontend_config(args)
            # An unknown architecture or refused --mm-processor-kwargs stops here.
            load_placeholders(config.model, config.mm_processor_kwargs)
            run = lambda: run_frontend(config)  # noqa: E731
        elif args.command == "registry":
            from frontend.registry import run_registry

            if args.expire_s <= 0:
                raise ValueError("--expire-s must be > 0")
            run = lambda: run_registry(args.addr, args.expire_s)  # noqa: E731
        elif args.command == "encoder":
            from encoder_worker.server import run_encoder

            if args.input_addr is None:
                if args.join is None:
                    raise ValueError("--input-addr is required (or --join ADDR)")
                from protocol.addresses import tcp

                args.input_addr = tcp()
            enc = encoder_config(args)
            enc_metrics = metrics_addr(args)
            run = lambda: run_encoder(enc, args.input_addr, enc_metrics)  # noqa: E731
        else:
            from llm_worker.engine import run_engine_core

            eng = engine_config(args)
            slow = env.debug_slow_step_s()
            eng_metrics = metrics_addr(args)
            run = lambda: run_engine_core(eng, args.input_addr, args.embed_addr,  # noqa: E731
                                          debug_slow_step_s=slow, metrics_addr=eng_metrics)
    except ValueError as e:
        print(f"mmserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    return run() or 0


if __name__ == "__main__":
    sys.exit(main())
