"""`mmserve encoder`: one encoder worker alone (for deploy/ and `mmserve serve`'s children);
`--join ADDR` enters a live pool through its registry.

Its flags are EncoderConfig's fields (protocol/config_flags.py), so a knob added there is a flag
here and on `mmserve serve` with no edit in this file.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from encoder_worker.config import EncoderConfig
from protocol.config_flags import add_config_args, config_from_args
from protocol.role_flags import add_exit_with_parent, add_metrics_args, metrics_addr


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("encoder", help="run one encoder worker alone")
    # Hand-written: where this process listens, not encoder settings.
    p.add_argument("--input-addr", default=None,
                   help="address to bind (required unless --join: then a free loopback port)")
    add_config_args(p, EncoderConfig, "encoder")
    add_metrics_args(p)
    add_exit_with_parent(p)
    return p


def prepare(args: argparse.Namespace) -> Callable[[], object]:
    """Check the flags and the checkpoint (ValueError naming the flag); returns the server."""
    config = config_from_args(EncoderConfig, args)
    input_addr = args.input_addr
    if input_addr is None:
        if config.join is None:
            raise ValueError("--input-addr is required (or --join ADDR)")
        from protocol.addresses import tcp

        input_addr = tcp()
    metrics = metrics_addr(args)

    def run() -> None:
        from encoder_worker.server import run_encoder

        run_encoder(config, input_addr, metrics)

    return run
