"""Issue 8, acceptance 3, through real processes: `mmserve serve` whose engine's first step takes
30 s (MMSERVE_DEBUG_SLOW_STEP_S, standing in for a first compile). /health stays 200 the whole
time and says "busy"; a request sent meanwhile waits and succeeds, and so does the one in the
step. (Engine death -> /health "dead": test_server.py's SIGKILL test.)"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from server_utils import Server

pytestmark = pytest.mark.slow

SLOW_S = 30.0


@pytest.fixture(scope="module")
def server(tiny_llama):
    srv = Server(tiny_llama, env={"MMSERVE_DEBUG_SLOW_STEP_S": str(SLOW_S)})
    yield srv
    srv.stop()


def test_a_30s_step_is_busy_not_dead(server):
    body = {"model": server.proc.args[4], "prompt": "Hello", "max_tokens": 4, "ignore_eos": True}

    async def complete(s: aiohttp.ClientSession) -> tuple[int, dict, float]:
        async with s.post(server.base + "/v1/completions", json=body) as r:
            return r.status, await r.json(), time.monotonic()

    async def busy_gauge(s: aiohttp.ClientSession) -> float:
        async with s.get(server.base + "/metrics") as r:
            lines = (await r.text()).splitlines()
        return float(next(ln for ln in lines if ln.startswith("mmserve_engine_busy ")).split()[1])

    async def scenario():
        health: list[tuple[float, int, dict]] = []
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            a = asyncio.create_task(complete(s))
            b = None
            while not a.done():  # every ~0.25 s for the whole slow step
                async with s.get(server.base + "/health") as r:
                    health.append((time.monotonic() - t0, r.status, await r.json()))
                if b is None and health[-1][2]["status"] == "busy":
                    b = asyncio.create_task(complete(s))  # sent during the slow step
                    busy_metric = await busy_gauge(s)
                await asyncio.sleep(0.25)
            assert b is not None, health[-5:]
            a_result, b_result = await a, await b
            # The hook slowed the first step only: the next request is quick, the gauge back to 0.
            started = time.monotonic()
            again = await complete(s)
            return (t0, a_result, b_result, busy_metric, health, again,
                    again[2] - started, await busy_gauge(s))

    (t0, (a_status, a_body, a_done), (b_status, b_body, b_done), busy_metric, health,
     again, again_s, idle_metric) = asyncio.run(scenario())
    assert a_status == 200 and a_body["usage"]["completion_tokens"] == 4, a_body
    assert b_status == 200 and b_body["usage"]["completion_tokens"] == 4, b_body
    assert a_done - t0 >= SLOW_S and b_done - t0 >= SLOW_S  # B waited out the step, unharmed
    assert [h for h in health if h[1] != 200] == []
    busy = [h for h in health if h[2]["status"] == "busy"]
    assert len(health) > SLOW_S / 0.5 and len(busy) > 0.8 * len(health), (len(health), len(busy))
    assert all(h[2]["engine"]["state"] == h[2]["status"] for h in health)
    # How long the step has run is reported, and grows with it (up to a beat's jitter).
    running = [h[2]["engine"]["step_running_s"] for h in busy]
    assert running[0] > 1 and running[-1] > SLOW_S - 2, running
    assert all(b > a - 0.2 for a, b in zip(running, running[1:])), running
    assert busy_metric == 1 and idle_metric == 0
    assert again[0] == 200 and again_s < 10
