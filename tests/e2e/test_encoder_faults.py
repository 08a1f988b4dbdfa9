"""Issue 7, faults: `mmserve serve LLAVA --encoders 2` with one encoder child SIGKILLed.

The frontend must notice at once (its socket monitor sees the TCP connection close), re-send
the dead encoder's items and route new ones to the survivor, keep most of its throughput, and
take the launcher's restarted encoder back. The heartbeat timeout is raised to 3 s here, so
anything that waited for it would show."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from llava_utils import image, png
from server_utils import Server, children_of, cmdline, metric

from frontend.media.encoder_pool import rendezvous
from protocol.hashing import uuid_key

pytestmark = pytest.mark.slow
HEARTBEAT_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def server(tiny_llava):
    srv = Server(tiny_llava, "--encoders", "2",
                 env={"MMSERVE_ENCODER_TIMEOUT": str(HEARTBEAT_TIMEOUT_S)})
    wait_live(srv, 2, 30)
    yield srv
    srv.stop()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def encoders(srv: Server) -> list[tuple[str, int]]:
    """(address, pid) of each encoder child, in the frontend's order (= the metrics' index)."""
    words = {p: cmdline(p).split() for p in children_of(srv.proc.pid)}
    front = next(w for w in words.values() if "frontend" in w)
    i = front.index("--encoder-addrs") + 1
    addrs = []
    while i < len(front) and not front[i].startswith("--"):
        addrs.append(front[i])
        i += 1
    pid = {w[w.index("--input-addr") + 1]: p for p, w in words.items() if "encoder" in w}
    return [(a, pid[a]) for a in addrs]


def live(srv: Server) -> float:
    try:
        return metric(srv.base, "mmserve_encoders_live")
    except KeyError:
        return -1


def wait_live(srv: Server, n: int, timeout: float) -> float:
    t0 = time.monotonic()
    while live(srv) != n:
        assert time.monotonic() - t0 < timeout, f"encoders_live never reached {n}"
        time.sleep(0.01)
    return time.monotonic() - t0


def encoded(srv: Server, i: int) -> float:
    time.sleep(0.6)  # encoder stats arrive with heartbeats (every 0.2 s)
    return metric(srv.base, f'mmserve_encoder_num_encoded{{encoder="{i}"}}')


def uuids_owned_by(addr: str, addrs: list[str], prefix: str, n: int) -> list[str]:
    """``n`` uuids whose keys rendezvous hashing gives to ``addr``."""
    out, i = [], 0
    while len(out) < n:
        u = f"{prefix}-{i}"
        if rendezvous(uuid_key(u), addrs) == addr:
            out.append(u)
        i += 1
    return out


def image_body(srv: Server, seed: int, uuid: str | None = None) -> dict:
    """A chat request about one image; every seed is a distinct image."""
    part = {"type": "image_url", "image_url": {"url": data_url(png(image(seed)))}}
    if uuid is not None:
        part["uuid"] = uuid
    return {"model": srv.proc.args[4], "max_tokens": 2, "messages": [{"role": "user", "content": [
        part, {"type": "text", "text": "?"}]}]}


async def ask(s: aiohttp.ClientSession, srv: Server, seed: int, uuid: str | None = None,
              ) -> tuple[int | str, float]:
    """(status or client error, seconds) of one image chat request."""
    body = image_body(srv, seed, uuid)
    t0 = time.monotonic()
    try:
        async with s.post(srv.base + "/v1/chat/completions", json=body) as r:
            await r.read()
            return r.status, time.monotonic() - t0
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return repr(e), time.monotonic() - t0


def test_sigkill_is_noticed_at_once_and_its_items_move(server):
    (victim, pid), (other, _) = encoders(server)[0], encoders(server)[1]
    addrs = [victim, other]
    mine = uuids_owned_by(victim, addrs, "kill-a", 8)  # keys the victim owned until it died

    async def run() -> tuple[float, list[tuple[int, float]], list[tuple[int, float]]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            inflight = [asyncio.create_task(ask(s, server, 1000 + i, u))
                        for i, u in enumerate(mine[:4])]
            await asyncio.sleep(0.05)
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            while live(server) != 1:  # polled over HTTP, so this is an upper bound
                assert time.monotonic() - t_kill < HEARTBEAT_TIMEOUT_S
                await asyncio.sleep(0.01)
            detect = time.monotonic() - t_kill
            after = await asyncio.gather(*(ask(s, server, 1100 + i, u)
                                           for i, u in enumerate(mine[4:])))
            return detect, await asyncio.gather(*inflight), list(after)

    detect, inflight, after = asyncio.run(run())
    assert detect < 0.5, detect
    assert [st for st, _ in inflight + after] == [200] * 8, (inflight, after)
    # Nothing waited for the 3 s heartbeat timeout: the monitor moved them.
    assert max(dt for _, dt in after) < HEARTBEAT_TIMEOUT_S - 0.5, after


def test_restarted_encoder_rejoins_and_takes_its_keys_back(server):
    wait_live(server, 2, 60)  # the launcher restarts it at the same address
    (victim, _), (other, _) = encoders(server)
    mine = uuids_owned_by(victim, [victim, other], "back", 4)
    before = encoded(server, 0)

    async def run() -> list[int]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            return [st for st, _ in await asyncio.gather(
                *(ask(s, server, 2000 + i, u) for i, u in enumerate(mine)))]

    assert asyncio.run(run()) == [200] * 4
    assert encoded(server, 0) - before == 4  # its keys went back to it, not to the survivor


def test_links_that_drop_without_death_fail_nothing(server):
    """Both encoders frozen past the 0.3 s link timeout: every link drops, nothing is live, and
    yet the requests in flight wait and succeed once the links come back."""
    wait_live(server, 2, 60)
    pids = [pid for _, pid in encoders(server)]

    async def run() -> tuple[float, list]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                reqs = [asyncio.create_task(ask(s, server, 3000 + i)) for i in range(6)]
                t0 = time.monotonic()
                while live(server) != 0:
                    assert time.monotonic() - t0 < 1.0, "the links never dropped"
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.3)
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            return await asyncio.gather(*reqs)

    assert [st for st, _ in asyncio.run(run())] == [200] * 6
    wait_live(server, 2, 5)


def kill_under_load(srv: Server, pid: int, first_seed: int, concurrency: int = 12,
                    steady_s: float = 5.0, window_s: float = 3.0) -> tuple[float, float, list]:
    """Closed-loop load of distinct images; SIGKILL ``pid`` after warm-up + ``steady_s``.
    Returns (requests/s over the steady window, requests/s in the window after the kill,
    the error bodies after the kill)."""
    bodies = [image_body(srv, first_seed + i) for i in range(4000)]  # not built under load
    done: list[tuple[float, int | str]] = []  # (finish time, 200 or the error)

    async def client(s: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set() and bodies:
            t0 = time.monotonic()
            try:
                async with s.post(srv.base + "/v1/chat/completions", json=bodies.pop()) as r:
                    text = await r.text()
                    done.append((time.monotonic(), 200 if r.status == 200 else text))
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                done.append((t0, repr(e)))

    async def run() -> float:
        stop = asyncio.Event()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            tasks = [asyncio.create_task(client(s, stop)) for _ in range(concurrency)]
            await asyncio.sleep(2.0 + steady_s)  # warm-up, then the steady window
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(window_s)
            stop.set()
            await asyncio.gather(*tasks)
        return t_kill

    t_kill = asyncio.run(run())

    def rate(t0: float, t1: float) -> float:
        return sum(1 for t, st in done if t0 <= t < t1 and st == 200) / (t1 - t0)

    return (rate(t_kill - steady_s, t_kill), rate(t_kill, t_kill + window_s),
            [st for t, st in done if t >= t_kill and st != 200])


def test_throughput_during_a_kill_stays_above_half(server):
    # Other jobs share these 2 cores and can halve any window: a second kill (of the other
    # encoder) gets one more chance. Waiting 3 s per item, as before, would fail both.
    ratios = []
    for attempt, victim in enumerate((1, 0)):
        wait_live(server, 2, 60)
        steady, during, failed = kill_under_load(server, encoders(server)[victim][1],
                                                 10_000 * (attempt + 1))
        assert not failed, failed  # nothing fails: items move, the engine's beats keep coming
        ratios.append((during / steady, steady, during))
        if during / steady >= 0.5:
            break
    assert max(ratios)[0] >= 0.5, ratios


def test_items_answered_by_a_dead_encoder_are_delivered_again(tiny_llava):
    """An encoder can answer EncodeDone and die before its embedding left its buffers (two
    connections): the pool re-sends what it answered for requests still running. The engine's
    first step is held 3 s, the item's encoder is SIGKILLed meanwhile: the survivor must get
    the item again, and the request succeeds."""
    srv = Server(tiny_llava, "--encoders", "2",
                 env={"MMSERVE_ENCODER_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
                      "MMSERVE_DEBUG_SLOW_STEP_S": "3"})
    try:
        wait_live(srv, 2, 30)
        (victim, pid), (other, _) = encoders(srv)
        u = uuids_owned_by(victim, [victim, other], "redeliver", 1)[0]
        requests_seen = 'mmserve_encoder_num_requests{encoder="1"}'

        async def run() -> tuple[int | str, float]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                req = asyncio.create_task(ask(s, srv, 4000, u))
                t0 = time.monotonic()
                while metric(srv.base, 'mmserve_encoder_num_encoded{encoder="0"}') < 1:
                    assert time.monotonic() - t0 < 10, "the victim never encoded the item"
                    await asyncio.sleep(0.05)
                before = metric(srv.base, requests_seen)
                os.kill(pid, signal.SIGKILL)  # the request now sits in the engine's slow step
                while metric(srv.base, requests_seen) <= before:
                    assert time.monotonic() - t0 < 10, "the item was never delivered again"
                    await asyncio.sleep(0.05)
                return await req

        status, _ = asyncio.run(run())
        assert status == 200
    finally:
        srv.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_engine_has_the_request_while_its_image_encodes(server):
    """The GenerateRequest goes out beside the EncodeRequest, not after EncodeDone: with every
    encoder frozen, the engine already holds the request (waiting for its embedding), and
    waits for it without spinning; once they thaw, it completes."""
    wait_live(server, 2, 60)
    pids = [pid for _, pid in encoders(server)]
    engine = next(p for p in children_of(server.proc.pid) if "llm-worker" in cmdline(p))
    spent = 0.0

    async def run() -> tuple[float, tuple[int | str, float]]:
        nonlocal spent
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                req = asyncio.create_task(ask(s, server, 5000))
                t0, waiting = time.monotonic(), 0.0
                while waiting < 1 and time.monotonic() - t0 < 2.0:  # inside the 3 s grace
                    await asyncio.sleep(0.05)
                    # Running once the text before the image is prefilled, else waiting.
                    waiting = (metric(server.base, "mmserve_num_running")
                               + metric(server.base, "mmserve_num_waiting"))
                cpu0 = cpu_seconds(engine)
                await asyncio.sleep(0.5)
                spent = cpu_seconds(engine) - cpu0
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            return waiting, await req

    waiting, (status, _) = asyncio.run(run())
    assert waiting >= 1 and status == 200
    assert spent < 0.2, f"the engine spun while its request waited: {spent:.2f} CPU s in 0.5 s"
    wait_live(server, 2, 5)
