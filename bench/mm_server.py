"""Start and stop a real `mmserve serve` for the serving benchmarks, whatever happens.

`served` is the whole life in one `with`: launch, wait for /health, yield the base URL, and on
every exit take the tree down and keep the log's startup and error lines in the report. The
launcher runs in its own session with output to a log; its roles run in sessions of their
own, so stopping takes the launcher down first (it stops its roles in order) and then SIGKILLs
whatever is left of the tree, found by pid. If the benchmark itself is SIGKILLed, the launcher
gets SIGTERM through PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _die_with_parent() -> None:
    """In the server's child before exec: SIGTERM it when this process dies (even by SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def launch(model: str, argv: list[str], log_path: Path, extra_env: dict[str, str] | None = None
           ) -> tuple[subprocess.Popen, str]:
    """`mmserve serve` in its own session, output to `log_path`, with `extra_env` over this
    process's; (proc, base url). The children find the repo (and wheels on PYTHONPATH) through
    the env, which they inherit."""
    from protocol.addresses import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, MMSERVE_LOG_LEVEL=os.environ.get("MMSERVE_LOG_LEVEL", "INFO"),
               PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO) + (os.pathsep + path if path else ""))
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "frontend.cli", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), *argv]
    print("server:", shlex.join(cmd), flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
    return proc, base


def wait_healthy(proc: subprocess.Popen, base: str, deadline: float) -> float:
    """Seconds until /health answers 200 (model load and warm-up included)."""
    t0 = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=1.0) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"mmserve serve exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"mmserve serve not healthy after {time.monotonic() - t0:.0f} s")
        time.sleep(0.25)


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc; the roles run in sessions of their own)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        out += kids
        frontier = kids
    return out


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the launcher (it stops its roles in order), then SIGKILL whatever is left of the
    tree, by pid."""
    tree = descendants(proc.pid)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 3.0  # roles also exit on their own once the launcher is gone
    for pid in tree:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


LOG_WORDS = ("ready", "warm-up", "captured", "KV cache", "ERROR", "Error")


@contextlib.contextmanager
def served(model: str, argv: list[str], log_path: Path, ready_deadline: float, report: dict,
           extra_env: dict[str, str] | None = None):
    """`mmserve serve` on `model` (`extra_env` over this process's environment), healthy, for
    the `with` block: yields its base URL. Fills report["server"] (a dict) with ready_s and, on
    every exit, the log's startup and error lines; an exception also lands in report["error"]
    (and the log's tail on stderr) before it goes on. The server's process tree is always taken
    down."""
    proc = None
    try:
        proc, base = launch(model, argv, log_path, extra_env)
        ready_s = wait_healthy(proc, base, ready_deadline)
        report["server"]["ready_s"] = round(ready_s, 1)
        print(f"server healthy after {ready_s:.1f} s", flush=True)
        yield base
    except BaseException as e:
        report["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        if proc is not None:
            stop(proc)
        log = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
        report["server"]["log_lines"] = [ln[-300:] for ln in log
                                         if any(w in ln for w in LOG_WORDS)][:40]
        if "error" in report:
            print("server log tail:\n" + "\n".join(log[-30:]), file=sys.stderr)
