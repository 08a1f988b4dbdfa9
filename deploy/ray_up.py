"""deploy/ on Ray: every role of a topology as a detached, named Ray actor (namespace "mmserve").

    python deploy/ray_up.py up|down|status RUN_DIR
    python deploy/ray_up.py scale RUN_DIR +N|-N [TIMEOUT_S]

up.sh, scale.sh and down.sh run this driver; it reads what they chose from RUN_DIR/topology.
Each role actor (`Role`) runs the real `mmserve ROLE ...` process as its child, restarts it when
it exits, and takes it down with itself (`--exit-with-parent`); Ray restarts a dead actor
(`max_restarts`), which starts the child again. The encoder registry is the named table actor of
protocol/ray_registry.py. Frontends and the engine are pinned to the node this driver runs on
(the frontends bind its HTTP port); encoders and the engine's TP workers (`--executor ray`, a
placement group) go wherever Ray finds their GPU. ZeroMQ stays the data path: Ray places,
starts, restarts and discovers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from protocol.ray_registry import NAMESPACE, create_table, remove  # noqa: E402

MAX_RESTARTS = 5  # Ray brings a dead role actor back this often; its child restarts on its own
STOP_GRACE_S = 10.0


class Role:
    """One role as an actor: `python -m frontend.cli ARGV` as a child process, kept running.

    ``{ip}`` and ``{port}`` in ARGV become this node's address (loopback on --local) and a
    fresh free port at each start, so an encoder restarted on another node registers there.
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: str, local: bool):
        self.name, self.argv, self.log, self.local = name, argv, log, local
        # The child is a Ray driver of its own (the Ray registry, the ray executor), not a
        # part of this actor's job.
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_JOB_ID"} | env
        self.stopping, self.restarts, self.proc = False, 0, None
        self.started = 0.0
        self.lock = threading.Lock()  # stop() never races a restart
        self._start()
        threading.Thread(target=self._watch, name="role-watch", daemon=True).start()

    def _start(self) -> None:
        ip = "127.0.0.1" if self.local else ray.util.get_node_ip_address()
        argv = [a.replace("{ip}", ip).replace("{port}", str(_free_port(ip))) for a in self.argv]
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "frontend.cli", *argv, "--exit-with-parent"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)  # its own group: stop() reaches its children too
        self.started = time.monotonic()

    def _watch(self) -> None:
        while True:
            code = self.proc.wait()
            if self.stopping:
                return
            self.restarts += 1
            # Back off when it dies right after starting (a bad flag would otherwise spin).
            time.sleep(min(30.0, 2.0 ** min(self.restarts, 5)) if
                       time.monotonic() - self.started < 30 else 0.5)
            with self.lock:
                if self.stopping:
                    return
                with open(self.log, "a") as out:
                    out.write(f"\n[{self.name}] exited with {code}; restart {self.restarts}\n")
                self._start()

    def info(self) -> dict:
        return {"name": self.name, "pid": self.proc.pid, "node_ip": ray.util.get_node_ip_address(),
                "restarts": self.restarts, "running": self.proc.poll() is None, "log": self.log}

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM the child's group (an encoder drains first), SIGKILL after ``grace_s``."""
        with self.lock:
            self.stopping = True
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                return self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        return None


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def topology(run_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (run_dir / "topology").read_text().splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            out[key] = value  # the last one wins (scale.sh appends)
    return out


class Deployment:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.t = topology(run_dir)
        ray.init(address=self.t["ray_address"], namespace=NAMESPACE, log_to_driver=False,
                 logging_level="WARNING")
        self.prefix = self.t["name"]
        self.local = self.t["local"] == "1"
        self.gpu = self.t["gpu"] == "1"
        self.here = ray.get_runtime_context().get_node_id()
        ip = "127.0.0.1" if self.local else ray.util.get_node_ip_address()
        self.engine_addr = self.t.get("engine") or f"tcp://{ip}:{_free_port(ip)}"
        self.registry = f"ray:{self.prefix}-registry"

    def _env(self) -> dict[str, str]:
        passed = {k: v for k, v in os.environ.items() if k.startswith(("MMSERVE_", "RAY_AUTH_"))}
        return passed | {
            "MMSERVE_DEPLOY_RUN": str(self.run_dir),  # down.sh finds leftovers by this tag
            "PYTHONPATH": str(REPO),
            "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        }

    def _role(self, role: str, argv: list[str], *, gpus: int = 0, pin: bool = False):
        name = f"{self.prefix}-{role}"
        opts: dict = dict(name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
                          num_gpus=gpus, max_restarts=MAX_RESTARTS)
        if pin:  # the node this driver runs on: the printed URL's host
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.here, soft=False)
        log = str(self.run_dir / "logs" / f"{role}.log")
        actor = ray.remote(Role).options(**opts).remote(name, argv, self._env(), log, self.local)
        with open(self.run_dir / "actors", "a") as f:
            f.write(name + "\n")
        return actor

    def actors(self) -> list[str]:
        path = self.run_dir / "actors"
        return path.read_text().split() if path.exists() else []

    def encoder(self, i: int):
        t = self.t
        return self._role(f"encoder-{i}", [
            "encoder", "--model", t["model"], "--input-addr", "tcp://{ip}:{port}",
            "--join", self.registry, "--encoder-device", t["device"]], gpus=int(self.gpu))

    def up(self) -> None:
        t, tp = self.t, int(self.t["tp"])
        taken = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == NAMESPACE and a["name"].startswith(self.prefix + "-")
                 and a["name"] != self.registry.removeprefix("ray:")]
        if taken:
            sys.exit(f"a topology named {self.prefix!r} runs on this cluster already ({taken[0]}"
                     ", ...): deploy/down.sh its run dir, or up.sh --name another")
        create_table(self.registry, NodeAffinitySchedulingStrategy(self.here, soft=False))
        with open(self.run_dir / "topology", "a") as f:
            f.write(f"engine={self.engine_addr}\nregistry={self.registry}\n")
        # TP > 1: the workers are Ray actors of a placement group, one GPU each; the engine
        # core itself needs a GPU only when it runs the model in-process (TP = 1).
        executor = ["--executor", "ray"] if tp > 1 else []
        self._role("engine", ["llm-worker", "--model", t["model"], "--input-addr", self.engine_addr,
                              "--tensor-parallel-size", str(tp), "--device", t["device"],
                              *executor], gpus=int(self.gpu and tp == 1), pin=True)
        for i in range(int(t["encoders"])):
            self.encoder(i)
        pool = ["--encoder-registry", self.registry] if int(t["encoders"]) else []
        for i in range(int(t["frontends"])):
            self._role(f"frontend-{i}", [
                "frontend", "--model", t["model"], "--engine-addr", self.engine_addr, *pool,
                "--host", t["host"], "--port", t["port"], "--reuse-port",
                "--reply-addr", "tcp://{ip}:{port}"], pin=True)
        self.wait_ready(int(t["encoders"]), self.actors())
        dashboard = ray.get_runtime_context().dashboard_url if t["dashboard"] == "1" else ""
        with open(self.run_dir / "topology", "a") as f:
            f.write(f"dashboard={dashboard}\n")
        print(f"mmserve up: {t['url']}/v1  (model {t['model']}; {t['frontends']} frontends, "
              f"{t['encoders']} encoders, TP={tp}; Ray actors in namespace {NAMESPACE})")
        print(f"ray cluster: {t['ray_address']}   dashboard: "
              + (f"http://{dashboard}" if dashboard else
                 f"off ({t['dashboard_why'] if t['dashboard'] == '0' else 'none on the cluster'})")
              + f"   run dir: {self.run_dir}")

    def wait_ready(self, encoders: int, names: list[str]) -> None:
        """/health is 200 with ``encoders`` routable on 4 x frontends fresh connections in a
        row; fails early when the process of a role of ``names`` exited (its actor restarts
        it, but a first start that fails will fail again)."""
        deadline = time.monotonic() + float(self.t["timeout"])
        handles = [ray.get_actor(n, namespace=NAMESPACE) for n in names]
        in_row, want = 0, 4 * int(self.t["frontends"])
        while in_row < want:
            try:
                infos = ray.get([h.info.remote() for h in handles], timeout=5)
            except ray.exceptions.GetTimeoutError:  # an actor not placed yet (resources)
                infos, in_row = [], 0
            for info in infos:
                if info["restarts"]:
                    sys.exit(f"{info['name']} exited; see {info['log']}")
            if time.monotonic() > deadline:
                sys.exit(f"not ready after {self.t['timeout']} s" +
                         ("" if infos else ": a role is not placed yet, see `ray status`"))
            in_row = in_row + 1 if _ready(self.t["url"], encoders) else 0
            time.sleep(0.05 if in_row else 0.5)

    def scale(self, delta: int) -> None:
        encoders = [n for n in self.actors() if n.startswith(f"{self.prefix}-encoder-")]
        if delta > 0:
            start = int(self.t["next_encoder"])
            for i in range(start, start + delta):
                self.encoder(i)
            with open(self.run_dir / "topology", "a") as f:
                f.write(f"next_encoder={start + delta}\n")
            total = len(encoders) + delta
            self.wait_ready(total, self.actors()[-delta:])
        else:
            if len(encoders) <= -delta:
                print(f"scale.sh: at least one encoder must stay (running: {len(encoders)})",
                      file=sys.stderr)
                sys.exit(2)
            self.stop(encoders[delta:], grace_s=60.0)  # each drains the items it holds
            total = len(encoders) + delta
        print(f"mmserve encoders: {total}")

    def stop(self, names: list[str], grace_s: float = STOP_GRACE_S) -> None:
        """Stop the children of ``names`` at once, then kill the actors for good."""
        handles = {}
        for n in names:
            try:
                handles[n] = ray.get_actor(n, namespace=NAMESPACE)
            except ValueError:  # gone already
                pass
        calls = [h.stop.remote(grace_s) for h in handles.values()]
        try:
            ray.get(calls, timeout=grace_s + 15)
        except (ray.exceptions.RayError, TimeoutError) as e:
            print(f"ray_up: stopping {names}: {type(e).__name__}", file=sys.stderr)
        for h in handles.values():
            ray.kill(h, no_restart=True)
        kept = [n for n in self.actors() if n not in names]
        (self.run_dir / "actors").write_text("".join(n + "\n" for n in kept))

    def down(self) -> None:
        # Every actor of this topology, also one whose name the actors file lost.
        names = set(self.actors()) | {
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE and a["name"].startswith(self.prefix + "-")
            and a["name"] != self.registry.removeprefix("ray:")}
        for group in ("frontend-", "encoder-", "engine"):
            self.stop(sorted(n for n in names if n.startswith(f"{self.prefix}-{group}")))
        try:
            remove(self.registry.removeprefix("ray:"))  # last: the encoders said goodbye to it
        except ValueError:  # gone already
            pass

    def status(self) -> None:
        for n in self.actors():
            info = ray.get(ray.get_actor(n, namespace=NAMESPACE).info.remote(), timeout=10)
            print(json.dumps(info))
        print(json.dumps({"name": self.registry, "role": "encoder registry"}))


def _ready(url: str, encoders: int) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            enc = json.loads(r.read()).get("encoders") or {"live": 0}
            return r.status == 200 and enc["live"] >= encoders
    except (OSError, ValueError):
        return False


def main(argv: list[str]) -> None:
    command, run_dir = argv[0], Path(argv[1]).resolve()
    d = Deployment(run_dir)
    if command == "up":
        d.up()
    elif command == "scale":
        if len(argv) > 3:  # scale.sh --timeout
            d.t["timeout"] = argv[3]
        d.scale(int(argv[2]))
    elif command == "down":
        d.down()
    elif command == "status":
        d.status()
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])
