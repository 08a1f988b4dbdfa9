"""Hand-written flags that several role commands share and that are no config field: where a
process listens or reports, not how a role works (those are generated from the role's config
by protocol/config_flags.py)."""

from __future__ import annotations

import argparse


def add_metrics_args(p: argparse.ArgumentParser) -> None:
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


def add_exit_with_parent(p: argparse.ArgumentParser) -> None:
    # Set by `mmserve serve` and deploy/ on their children, never typed: hidden from --help.
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
