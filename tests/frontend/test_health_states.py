"""What /health reports, derived from what the frontend has heard: the engine client's
starting / ready / busy / dead, and the encoder pool's starting / ready / dead. No processes:
the messages are fed to the client's handlers directly, and time is moved by hand."""

from __future__ import annotations

import asyncio
import time

from frontend.engine_client import BUSY_AFTER_S, EngineClient
from frontend.media.encoder_pool import EncoderPool
from protocol.addresses import tcp
from protocol.messages import EncoderHeartbeat, EncoderStats, EngineStats, Heartbeat, Ready


def test_engine_states_from_beats():
    async def run() -> None:
        client = EngineClient(tcp())
        try:
            assert client.health() == ("starting", None, None) and not client.healthy
            client.ready = Ready("e", "m", 64, 100)
            client.last_beat = client.beat_at = time.monotonic()
            assert client.health().state == "ready" and client.healthy

            # A beat that reports a step in flight: short is still "ready", long is "busy", and
            # the running time keeps growing from the beat's value between beats.
            client.step_running_s = BUSY_AFTER_S / 2
            assert client.health().state == "ready"
            client.step_running_s = 12.0
            client.beat_at -= 0.5
            h = client.health()
            assert h.state == "busy" and h.ok and 12.5 <= h.step_running_s < 13, h

            # Silence is death, whatever the last beat said.
            client.last_beat -= client.dead_after
            h = client.health()
            assert h.state == "dead" and not h.ok and h.silent_s >= client.dead_after, h
        finally:
            await client.close()

    asyncio.run(run())


def test_heartbeat_and_ready_update_the_step_in_flight():
    """Through the receive loop's own handling of the messages (sent over a real socket)."""
    from protocol.sockets import AsyncSender

    async def run() -> None:
        client = EngineClient(tcp())
        await client.start()
        to_client = AsyncSender(client.ctx, client.reply_to, bind=False)
        try:
            await to_client.send(Ready("e", "m", 64, 100))
            await to_client.send(Heartbeat("e", time.time(), EngineStats(num_steps=3), 5.0))
            deadline = time.monotonic() + 5
            while client.health().state != "busy":
                assert time.monotonic() < deadline, client.health()
                await asyncio.sleep(0.01)
            assert client.stats.num_steps == 3
            await to_client.send(Heartbeat("e", time.time(), EngineStats(num_steps=4)))
            while client.health().state != "ready":
                assert time.monotonic() < deadline, client.health()
                await asyncio.sleep(0.01)
            assert client.health().step_running_s is None
        finally:
            to_client.close()
            await client.close()

    asyncio.run(run())


def test_encoder_pool_states():
    async def run() -> None:
        client = EngineClient(tcp())
        addr = tcp()
        pool = EncoderPool(client.ctx, [addr], client.reply_to, client.frontend_id)
        try:
            assert pool.state == "starting" and not pool.healthy  # none was ever live
            pool.encoders[addr].connected = True
            pool.on_message(EncoderHeartbeat("enc", time.time(), EncoderStats(), addr))
            assert pool.state == "ready" and pool.healthy
            pool._ever_live = True  # what the pool's liveness loop records
            pool.encoders[addr].connected = False
            pool._none_live_since = time.monotonic()
            assert pool.state == "ready"  # lost just now: within the grace
            pool._none_live_since -= pool.grace_s + 0.1
            assert pool.state == "dead" and not pool.healthy
        finally:
            pool.close()
            await client.close()

    asyncio.run(run())
