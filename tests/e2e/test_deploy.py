"""Issue 10, deploy/: `up.sh --local` with 2 frontends on one port, 2 encoders and a TP=2
engine serves the official openai client (text and images); `scale.sh` resizes the encoder pool
live; `down.sh` leaves no process behind (checked in /proc)."""

from __future__ import annotations

import base64
import http.client
import os
import socket
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from cluster_utils import wait_encoders
from llava_utils import image, png
from server_utils import alive

from protocol.addresses import free_port

pytestmark = pytest.mark.slow
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, MMSERVE_LOG_LEVEL="WARNING")
    return subprocess.run([str(DEPLOY / name), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def tagged(run_dir: Path) -> list[int]:
    """Processes carrying the run's tag (every one up.sh started, and their children)."""
    tag = f"MMSERVE_DEPLOY_RUN={run_dir}".encode()
    out = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and tag in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                out.append(int(entry))
        except OSError:
            continue
    return out


def sockets_on(port: int, pids: list[int]) -> dict[int, int]:
    """Per pid, its established TCP connections whose local port is ``port`` (/proc)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and f[3] == "01":  # ESTABLISHED
            inodes.add(f[9])
    counts = {}
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        links = [os.readlink(fds / fd) for fd in os.listdir(fds)]
        counts[pid] = sum(link == f"socket:[{i}]" for link in links for i in inodes)
    return counts


@pytest.fixture(scope="module")
def deployed(tiny_llava, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run").resolve()
    port = free_port()
    up = script("up.sh", "--local", "--model", tiny_llava, "--frontends", "2", "--encoders", "2",
                "--tp", "2", "--port", str(port), "--run-dir", str(run_dir))
    try:
        assert up.returncode == 0, up.stderr
        assert f"http://127.0.0.1:{port}/v1" in up.stdout
        yield port, run_dir
    finally:
        script("down.sh", "--run-dir", str(run_dir))


def test_up_serves_openai_text_and_images_through_both_frontends(deployed):
    port, run_dir = deployed
    # 2 frontends, 2 encoders, the registry, the engine and its 2 TP workers.
    assert len(tagged(run_dir)) == 8
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    model = c.models.list().data[0].id
    text = c.chat.completions.create(model=model, max_tokens=4,
                                     messages=[{"role": "user", "content": "Hello"}])
    assert text.choices[0].finish_reason in ("length", "stop")
    url = "data:image/png;base64," + base64.b64encode(png(image(5))).decode()
    pic = c.chat.completions.create(model=model, max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]}])
    assert pic.usage.prompt_tokens > text.usage.prompt_tokens  # the image's placeholder run
    # The kernel spreads connections over both frontends (SO_REUSEPORT): 16 kept-alive
    # connections all landing on one of two would happen 3 times in 100,000.
    fronts = [int(p.read_text()) for p in sorted((run_dir / "pids").glob("frontend-*"))]
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(16)]
    try:
        for conn in conns:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read()
        counts = sockets_on(port, fronts)
        assert sum(counts.values()) >= 16 and all(counts.values()), counts  # + openai's own
    finally:
        for conn in conns:
            conn.close()


def test_scale_changes_the_encoder_count_live(deployed):
    port, run_dir = deployed
    base = f"http://127.0.0.1:{port}"
    up = script("scale.sh", "encoders", "+1", "--run-dir", str(run_dir))
    assert up.returncode == 0 and "mmserve encoders: 3" in up.stdout, up.stderr
    wait_encoders(base, 3, 5, total=3)
    down = script("scale.sh", "encoders", "-1", "--run-dir", str(run_dir))
    assert down.returncode == 0 and "mmserve encoders: 2" in down.stdout, down.stderr
    wait_encoders(base, 2, 5, total=2)
    refused = script("scale.sh", "encoders", "-2", "--run-dir", str(run_dir))
    assert refused.returncode == 2 and "at least one encoder" in refused.stderr


def test_down_leaves_no_process(tiny_llava, tmp_path):
    port = free_port()
    up = script("up.sh", "--local", "--model", tiny_llava, "--frontends", "2", "--encoders", "1",
                "--port", str(port), "--run-dir", str(tmp_path))
    try:
        assert up.returncode == 0, up.stderr
        started = tagged(tmp_path.resolve())
        assert len(started) == 5  # registry, engine, encoder, 2 frontends
    finally:
        down = script("down.sh", "--run-dir", str(tmp_path))
    assert down.returncode == 0, down.stderr
    assert tagged(tmp_path.resolve()) == []
    assert not any(alive(pid) for pid in started)  # (a zombie left to init counts as gone)
    with socket.socket() as s:  # nobody listens on the port any more (TIME_WAITs aside)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
