"""Issue 10, acceptance 2 on Ray: `deploy/up.sh --local --ray` with 2 frontends, 2 encoders and a
TP=2 engine (`--executor ray`) on a Ray head of its own (CPU) serves the official openai client
(text and images); every role is a named actor Ray lists; `scale.sh encoders +1` adds an actor
whose encoder the frontends route to; a killed role (its process, or its actor) comes back;
`down.sh` leaves no process (no mmserve role, no raylet / gcs_server of the head) and frees the
port."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from cluster_utils import kill_all, mentioning, tagged, wait_encoders
from llava_utils import image, png
from server_utils import alive, get

from protocol.addresses import free_port

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROLES = {"engine", "encoder-0", "encoder-1", "frontend-0", "frontend-1"}


def script(name: str, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, MMSERVE_LOG_LEVEL="WARNING")
    return subprocess.run([str(DEPLOY / name), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def topology(run_dir: Path) -> dict[str, str]:
    out = {}
    for line in (run_dir / "topology").read_text().splitlines():
        key, _, value = line.partition("=")
        out[key] = value
    return out


def ray_env(run_dir: Path) -> dict[str, str]:
    t = topology(run_dir)
    return dict(os.environ, RAY_AUTH_MODE=t["ray_auth_mode"],
                RAY_AUTH_TOKEN_PATH=t["ray_auth_token_path"])


def named_actors(run_dir: Path) -> dict[str, str]:
    """Name -> state of the live actors in the "mmserve" namespace, as Ray's GCS has them."""
    code = ("import json, ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "from ray.util.state import list_actors\n"
            "try: a = {x.name: x.state for x in list_actors(filters=[('state', '=', 'ALIVE')])}\n"
            "except Exception: a = {x['name']: 'ALIVE' for x in "
            "ray.util.list_named_actors(all_namespaces=True) if x['namespace'] == 'mmserve'}\n"
            "print(json.dumps(a))")
    out = subprocess.run([sys.executable, "-c", code, topology(run_dir)["ray_address"]],
                         env=ray_env(run_dir), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return {k: v for k, v in json.loads(out.stdout.splitlines()[-1]).items() if k}


def roles(run_dir: Path) -> dict[str, dict]:
    """deploy/ray_up.py status: each role actor's process (pid, restarts)."""
    out = subprocess.run([sys.executable, str(DEPLOY / "ray_up.py"), "status", str(run_dir)],
                         env=ray_env(run_dir), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    infos = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {i["name"].removeprefix("mmserve-"): i for i in infos if "pid" in i}


@pytest.fixture(scope="module")
def deployed(tiny_llava, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ray_run").resolve()
    port = free_port()
    try:
        up = script("up.sh", "--local", "--ray", "--model", tiny_llava, "--frontends", "2",
                    "--encoders", "2", "--tp", "2", "--port", str(port), "--no-dashboard",
                    "--run-dir", str(run_dir))
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://127.0.0.1:{port}/v1" in up.stdout
        assert "dashboard: off" in up.stdout
        yield port, run_dir
    finally:
        # down.sh, then whatever of this run is left: by the run's tag and the head's own
        # session dir (the targeted `ray stop --force`: other Ray instances here stay up).
        script("down.sh", "--run-dir", str(run_dir))
        temp = topology(run_dir).get("ray_temp") if (run_dir / "topology").exists() else None
        kill_all(tagged(str(run_dir)) + (mentioning(temp) if temp else []))


def test_up_serves_openai_and_ray_lists_the_roles(deployed):
    port, run_dir = deployed
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    model = c.models.list().data[0].id
    text = c.chat.completions.create(model=model, max_tokens=4,
                                     messages=[{"role": "user", "content": "Hello"}])
    assert text.choices[0].finish_reason in ("length", "stop")
    url = "data:image/png;base64," + base64.b64encode(png(image(5))).decode()
    pic = c.chat.completions.create(model=model, max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]}])
    assert pic.usage.prompt_tokens > text.usage.prompt_tokens  # the image's placeholder run

    actors = named_actors(run_dir)
    assert {f"mmserve-{r}" for r in ROLES} | {"mmserve-registry"} <= set(actors), actors
    assert set(roles(run_dir)) == ROLES
    assert all(i["running"] and i["restarts"] == 0 for i in roles(run_dir).values())
    # The TP workers are Ray actors too: the placement group holds the head's 2 CPU slots.
    status = subprocess.run([sys.executable, "-c", "from ray.scripts.scripts import main; main()",
                             "status", "--address", topology(run_dir)["ray_address"]],
                            env=ray_env(run_dir), capture_output=True, text=True, timeout=120)
    assert "2.0/2.0 CPU (2.0 used of 2.0 reserved in placement groups)" in status.stdout, \
        status.stdout + status.stderr


def test_scale_adds_an_encoder_actor_the_frontends_route_to(deployed):
    port, run_dir = deployed
    base = f"http://127.0.0.1:{port}"
    up = script("scale.sh", "encoders", "+1", "--run-dir", str(run_dir))
    assert up.returncode == 0 and "mmserve encoders: 3" in up.stdout, up.stderr
    assert "mmserve-encoder-2" in named_actors(run_dir)
    wait_encoders(base, 3, 10, total=3)
    _, metrics = get(base + "/metrics", 5)
    assert b"\nmmserve:encoders_live" in metrics
    live = [line for line in metrics.decode().splitlines() if line.startswith("mmserve:encoders_live")]
    assert live and float(live[0].split()[-1]) == 3.0, live
    down = script("scale.sh", "encoders", "-1", "--run-dir", str(run_dir))
    assert down.returncode == 0 and "mmserve encoders: 2" in down.stdout, down.stderr
    wait_encoders(base, 2, 10, total=2)
    assert "mmserve-encoder-2" not in named_actors(run_dir)
    refused = script("scale.sh", "encoders", "-2", "--run-dir", str(run_dir))
    assert refused.returncode == 2 and "at least one encoder" in refused.stderr


def restarted(run_dir: Path, role: str, pid: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (now := roles(run_dir)[role])["pid"] == pid or not now["running"]:
        assert time.monotonic() < deadline, now
        time.sleep(0.5)
    return now


def test_a_killed_role_comes_back(deployed):
    port, run_dir = deployed
    # Its process dies: the role actor starts it again.
    before = roles(run_dir)["encoder-0"]
    os.kill(before["pid"], signal.SIGKILL)
    assert restarted(run_dir, "encoder-0", before["pid"])["restarts"] == 1
    wait_encoders(f"http://127.0.0.1:{port}", 2, 120)
    # The actor itself dies: Ray restarts it (max_restarts), and it starts a new process; the
    # old one exits with its parent.
    before = roles(run_dir)["encoder-1"]
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "ray.kill(ray.get_actor('mmserve-encoder-1', namespace='mmserve'), no_restart=False)")
    subprocess.run([sys.executable, "-c", code, topology(run_dir)["ray_address"]],
                   env=ray_env(run_dir), check=True, capture_output=True, timeout=120)
    restarted(run_dir, "encoder-1", before["pid"])
    deadline = time.monotonic() + 10
    while alive(before["pid"]):
        assert time.monotonic() < deadline, "the old encoder outlived its actor"
        time.sleep(0.2)
    wait_encoders(f"http://127.0.0.1:{port}", 2, 120)


def test_down_leaves_no_process_and_frees_the_port(deployed):
    port, run_dir = deployed
    temp = topology(run_dir)["ray_temp"]
    started = tagged(str(run_dir))
    assert any(b"raylet" in Path(f"/proc/{p}/cmdline").read_bytes() for p in started)
    down = script("down.sh", "--run-dir", str(run_dir))
    assert down.returncode == 0, down.stderr
    assert tagged(str(run_dir)) == []
    assert mentioning(temp) == []  # no gcs_server / raylet / worker of the head
    assert not os.path.exists(temp)
    with socket.socket() as s:  # nobody listens on the port any more (TIME_WAITs aside)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def ray_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from ray.scripts.scripts import main; main()",
                           *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def cluster(tmp_path):
    """A Ray head started by hand, as on a real cluster; its processes carry a tag of their own
    (the targeted `ray stop --force` at the end)."""
    head, temp = str(tmp_path / "head"), f"/tmp/mmray-test-{os.getpid()}"
    os.makedirs(head)
    (tmp_path / "token").write_text(os.urandom(32).hex())
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp_path / "token"))
    try:
        start = ray_cli("start", "--head", "--port", str(free_port()), "--num-cpus", "1",
                        "--num-gpus", "0", "--temp-dir", temp, "--disable-usage-stats",
                        "--include-dashboard", "false", "--dashboard-port", str(free_port()),
                        "--dashboard-agent-listen-port", str(free_port()),
                        "--object-store-memory", str(100 << 20),
                        env=dict(env, MMSERVE_DEPLOY_RUN=head))
        assert start.returncode == 0, start.stdout + start.stderr
        yield Path(temp, "ray_current_cluster").read_text().strip(), env, head
    finally:
        kill_all(tagged(head) + mentioning(temp))
        subprocess.run(["rm", "-rf", temp])


def test_up_joins_a_cluster_at_address_and_down_leaves_it_up(cluster, tiny_llava, tmp_path):
    address, env, head = cluster
    run_dir, port = (tmp_path / "run").resolve(), free_port()
    base = [str(DEPLOY / "up.sh"), "--ray", "--address", address, "--model", tiny_llava,
            "--frontends", "1", "--encoders", "1", "--port", str(port), "--run-dir", str(run_dir)]
    env = dict(env, PYTHON=sys.executable, MMSERVE_LOG_LEVEL="WARNING")
    try:
        up = subprocess.run(base, env=env, capture_output=True, text=True, timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr
        t = topology(run_dir)
        assert t["started_head"] == "0" and t["ray_address"] == address
        assert not t["engine"].startswith("tcp://127.0.0.1")  # the node's IP: multi-node ready
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                          max_retries=0)
        url = "data:image/png;base64," + base64.b64encode(png(image(3))).decode()
        pic = c.chat.completions.create(
            model=c.models.list().data[0].id, max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}])
        assert pic.choices[0].finish_reason in ("length", "stop")
        again = subprocess.run(base, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and "already running" in again.stderr
    finally:
        down = subprocess.run([str(DEPLOY / "down.sh"), "--run-dir", str(run_dir)], env=env,
                              capture_output=True, text=True, timeout=400)
    assert down.returncode == 0, down.stderr
    assert tagged(str(run_dir)) == []  # every role process is gone...
    status = ray_cli("status", "--address", address, env=env)
    assert status.returncode == 0 and "Active:" in status.stdout  # ...the cluster stays up
    assert named_actors(run_dir) == {}  # and holds no actor of the topology


def test_a_failed_up_stops_what_it_started(tiny_llava, tmp_path):
    run_dir = tmp_path.resolve()
    try:
        up = script("up.sh", "--local", "--ray", "--model", tiny_llava, "--port", str(free_port()),
                    "--timeout", "1", "--run-dir", str(run_dir))
        assert up.returncode != 0 and "not ready after 1 s" in up.stderr, up.stderr
        assert "up.sh: failed; stopping what started" in up.stderr
        temp = topology(run_dir)["ray_temp"]
        assert tagged(str(run_dir)) == [] and mentioning(temp) == []
        assert not os.path.exists(temp)
    finally:
        script("down.sh", "--run-dir", str(run_dir))
        temp = topology(run_dir).get("ray_temp") if (run_dir / "topology").exists() else None
        kill_all(tagged(str(run_dir)) + (mentioning(temp) if temp else []))
