"""`mmserve llm-worker`: one engine core alone (for deploy/ and `mmserve serve`'s child).

Its flags are LLMWorkerConfig's fields (protocol/config_flags.py), so a knob added there is a
flag here, on `mmserve serve`, and reaches the engine with no edit in this file.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from llm_worker.config import LLMWorkerConfig
from protocol.config_flags import add_config_args, config_from_args
from protocol.role_flags import add_exit_with_parent, add_metrics_args, metrics_addr


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("llm-worker", help="run one engine core alone")
    # Hand-written: where this process listens, not engine settings.
    p.add_argument("--input-addr", required=True, help="address to bind, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--embed-addr", default=None,
                   help="address of the embedding inbox (default: a free port on the input host)")
    add_config_args(p, LLMWorkerConfig, "engine")
    add_metrics_args(p)
    add_exit_with_parent(p)
    return p


def prepare(args: argparse.Namespace) -> Callable[[], object]:
    """Check the flags and the checkpoint (ValueError naming the flag); returns the server."""
    from frontend import env

    config = config_from_args(LLMWorkerConfig, args)
    slow = env.debug_slow_step_s()
    metrics = metrics_addr(args)

    def run() -> None:
        from llm_worker.engine_proc import run_engine_core

        run_engine_core(config, args.input_addr, args.embed_addr, debug_slow_step_s=slow,
                        metrics_addr=metrics)

    return run
