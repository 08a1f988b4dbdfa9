"""`mmserve serve`: start the engine core, the encoders and the frontends as child processes,
supervise them.

The parent prints one line with the URL once /health says every role is ready, and on
Ctrl-C/SIGTERM stops the children (SIGTERM, then SIGKILL after a grace period). Children also
watch their parent (`--exit-with-parent`), so even a SIGKILLed parent leaves no orphans.
A dead child is restarted (the frontend answers 503 meanwhile); a crash loop ends the server,
and so does a frontend that exits before the server was ready (a port in use, a bad flag).
With a multimodal model the parent also runs the encoder pool's registry on a thread, so
`mmserve encoder --join ADDR` adds encoders while serving. Several frontends share one port
through SO_REUSEPORT; each has its own reply address, so the engine's outputs for a request go
to the frontend that sent it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import NamedTuple

from encoder_worker.config import EncoderConfig
from frontend.config import FrontendConfig
from llm_worker.config import LLMWorkerConfig
from protocol.addresses import tcp
from protocol.config_flags import args_from_config, config_from_args

log = logging.getLogger("mmserve")

MAX_RESTARTS = 3  # within RESTART_WINDOW_S; more means a crash loop, not a transient failure
RESTART_WINDOW_S = 60.0


class Child:
    def __init__(self, name: str, argv: list[str]):
        self.name, self.argv = name, argv
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "frontend.cli", *self.argv, "--exit-with-parent"]
        # A new session: a Ctrl-C in the terminal reaches only the parent, which stops children
        # in order (they still die with the parent through --exit-with-parent).
        self.proc = subprocess.Popen(cmd, start_new_session=True, env=child_env())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 5.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def child_env() -> dict[str, str]:
    """The children share this host's cores, so OpenMP threads sleep instead of spinning at
    their barriers (unless the user chose otherwise): with spinning, a CPU engine whose core is
    taken by a restarting encoder fell from 53 to 5 requests/s; passive, it held 53 (2 cores,
    demo model, bench/encoder_kill.py)."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


class ServeConfigs(NamedTuple):
    """What `serve` checked before any child starts; each child's argv is generated from its
    config (protocol/config_flags.args_from_config), so every flag reaches its role."""
    frontend: FrontendConfig
    engine: LLMWorkerConfig
    encoder: EncoderConfig | None  # None: no encoders to start
    num_encoders: int


def prepare(args: argparse.Namespace) -> Callable[[], int]:
    """Check everything ``serve`` needs (flags, checkpoint, architecture) before any child
    starts; ValueError with one line if something is wrong. Returns the supervisor to run."""
    from frontend.models import load_placeholders

    if args.model is None:
        from frontend.random_model import DEFAULT_RANDOM_MODEL, default_model

        path, name = default_model()
        args.model = str(path)
        args.served_model_name = args.served_model_name or [name]
        if name == DEFAULT_RANDOM_MODEL:
            log.warning("no MODEL given and no demo checkpoint here: serving a placeholder "
                        "model with RANDOM weights (arbitrary text) from %s", args.model)
        else:
            log.info("no MODEL given: serving the built-in demo model %s from %s", name,
                     args.model)
    engine = config_from_args(LLMWorkerConfig, args)
    if args.num_frontends < 1:
        raise ValueError(f"--num-frontends must be >= 1, got {args.num_frontends}")
    if args.registry_addr is not None and not is_multimodal(args.model):
        raise ValueError(f"--registry-addr: {args.model} has no vision/audio tower, so no "
                         "encoder pool")
    # The engine address is the launcher's, picked when the children start.
    frontend = config_from_args(FrontendConfig, args, engine_addr="tcp://127.0.0.1:1")
    # The frontend's slice of the architecture, which also checks --mm-processor-kwargs.
    load_placeholders(args.model, frontend.mm_processor_kwargs)
    num_encoders = args.encoders if args.encoders is not None else int(is_multimodal(args.model))
    encoder = config_from_args(EncoderConfig, args) if num_encoders else None
    configs = ServeConfigs(frontend, engine, encoder, num_encoders)
    return lambda: serve(args, configs)


def serve(args: argparse.Namespace, configs: ServeConfigs) -> int:
    """Start and supervise the children of ``mmserve serve`` (after ``prepare``)."""
    engine_addr = tcp()
    engine_argv = ["llm-worker", "--input-addr", engine_addr, *args_from_config(configs.engine)]
    registry = None
    encoder_addrs: list[str] = []
    encoders: list[Child] = []
    if configs.encoder is not None or args.registry_addr:
        from frontend.registry import RegistryService

        registry = RegistryService(args.registry_addr or tcp()).start()
    if configs.encoder is not None:
        encoder_addrs = [tcp() for _ in range(configs.num_encoders)]
        encoder_argv = args_from_config(configs.encoder)
        encoders = [Child(f"encoder-{i}", ["encoder", "--input-addr", addr, *encoder_argv])
                    for i, addr in enumerate(encoder_addrs)]
    frontend = dataclasses.replace(
        configs.frontend, engine_addr=engine_addr, encoder_addrs=tuple(encoder_addrs),
        encoder_registry=registry.addr if registry else None,
        reuse_port=args.num_frontends > 1)
    frontend_argv = ["frontend", *args_from_config(frontend)]
    engine = Child("engine", engine_argv)
    frontends = [Child(f"frontend-{i}", frontend_argv) for i in range(args.num_frontends)]
    workers = [engine, *encoders, *frontends]

    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    url = f"http://{args.host}:{args.port}"
    restarts: dict[str, list[float]] = {w.name: [] for w in workers}
    announced = False
    healthy_in_row = 0  # with N frontends on one port, each answer comes from any of them
    for child in workers:
        child.start()
    try:
        while not stopping:
            for f in frontends:
                if not announced and not f.alive():
                    log.error("%s exited (code %s)", f.name, f.proc.returncode)
                    return 1
            for w in workers:
                if w.alive():
                    continue
                now = time.monotonic()
                recent = [t for t in restarts[w.name] if now - t < RESTART_WINDOW_S] + [now]
                restarts[w.name] = recent
                if len(recent) > MAX_RESTARTS:
                    log.error("%s keeps exiting (code %s): giving up", w.name, w.proc.returncode)
                    return 1
                log.error("%s exited (code %s): restarting", w.name, w.proc.returncode)
                w.start()
            if not announced:
                healthy_in_row = healthy_in_row + 1 if _healthy(url) else 0
                if healthy_in_row >= 4 * len(frontends) - 3:  # 1 for one frontend
                    extra = f"; encoder registry {registry.addr}" if registry else ""
                    print(f"mmserve ready: {url}  (model {args.model}{extra})", flush=True)
                    announced = True
                    continue
                time.sleep(0.05)
                continue
            time.sleep(0.2)
        return 0
    finally:
        for f in frontends:  # first: no new requests while the workers stop
            f.stop()
        for w in (engine, *encoders):
            w.stop()
        if registry is not None:
            registry.stop()


def is_multimodal(model: str) -> bool:
    """Whether the checkpoint has a tower this build can run (then it needs encoder workers)."""
    import json
    from pathlib import Path

    from encoder_worker.models import ENCODER_REGISTRY

    archs = json.loads((Path(model) / "config.json").read_text()).get("architectures") or []
    return any(a in ENCODER_REGISTRY for a in archs)
