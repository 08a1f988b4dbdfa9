"""The encoder registry (protocol/registry.py, frontend/registry.py) and the pool's membership
(frontend/media/encoder_pool.py) against fake encoders: real sockets, no model."""

from __future__ import annotations

import asyncio
import time

import pytest
from fake_encoder import FakeEncoder, until

from frontend.engine_client import EngineClient
from frontend.media.encoder_pool import EncoderPool, rendezvous
from frontend.registry import RegistryService
from protocol.addresses import tcp
from protocol.messages import EncodeRequest
from protocol.registry import EncoderEntry, EncoderRegistry, RegistryTable, ZmqRegistry


def test_table_joins_leaves_and_expires():
    table = RegistryTable(expire_s=1.0)
    a, b = EncoderEntry("enc-a", "tcp://h:1"), EncoderEntry("enc-b", "tcp://h:2")
    assert table.beat(a, 0.0) and table.beat(b, 0.0)
    assert not table.beat(a, 0.5)  # a heartbeat changes nothing
    v = table.version
    # A restarted process at a's address is a change; the old one's late goodbye is not.
    assert table.beat(EncoderEntry("enc-a2", "tcp://h:1"), 0.6) and table.version == v + 1
    assert not table.leave(a)
    assert table.leave(b)
    assert [e.addr for e in table.view(0.7).encoders] == ["tcp://h:1"]
    assert table.expire(1.7) and table.view(1.7).encoders == []
    # Views are incomplete for one expiry period after the start (beats may be on their way).
    fresh = RegistryTable(expire_s=60.0)
    assert not fresh.view(time.monotonic()).complete


def request(key: str, reply_to: str) -> EncodeRequest:
    return EncodeRequest(key, "image", b"x", {}, ["tcp://127.0.0.1:1"], reply_to, f"r-{key}")


@pytest.fixture
def registry():
    service = RegistryService(tcp(), expire_s=0.5).start()
    service.table.started -= 1.0  # past its warm-up: views are complete
    yield service
    service.stop()


def with_pool(registry: RegistryService, static: list[str], body) -> None:
    run_pool(ZmqRegistry(registry.addr), static, body)


def run_pool(registry: EncoderRegistry, static: list[str], body) -> None:
    """``await body(pool)`` with a pool of the ``static`` encoders watching ``registry``."""
    async def run() -> None:
        client = EngineClient(tcp())  # no engine: only its inbox is used
        pool = EncoderPool(client.ctx, static, client.reply_to, client.frontend_id, registry)
        client.other_messages = pool.on_message
        await pool.start()
        await client.start()
        try:
            await body(pool)
        finally:
            pool.close()
            await client.close()

    asyncio.run(run())


def test_join_moves_only_the_keys_the_new_encoder_wins(registry):
    first, joined = FakeEncoder(), FakeEncoder()
    keys = [f"uuid:k{i}" for i in range(300)]

    async def body(pool: EncoderPool) -> None:
        await until(lambda: pool.live() == [first.addr])
        before = {k: rendezvous(k, pool.live()) for k in keys}
        announce = ZmqRegistry(registry.addr)
        announce.register(EncoderEntry(joined.id, joined.addr))
        took = await until(lambda: len(pool.live()) == 2)
        assert took < 1.0, took  # a pushed view and one Hello/beat round trip
        after = {k: rendezvous(k, pool.live()) for k in keys}
        moved = {k for k in keys if before[k] != after[k]}
        assert moved == {k for k in keys if after[k] == joined.addr}
        assert 0.3 < len(moved) / len(keys) < 0.7  # about half, and nothing among the others
        await asyncio.gather(*(pool.encode(request(k, pool.reply_to)) for k in keys[:40]))
        assert set(joined.keys) == moved & set(keys[:40]) and joined.keys
        announce.close()

    try:
        with_pool(registry, [first.addr], body)
    finally:
        first.kill()
        joined.kill()


def test_a_leaving_encoder_finishes_its_items_and_takes_no_new_ones(registry):
    stays, leaves = FakeEncoder(), FakeEncoder(delay_s=1.0)

    async def body(pool: EncoderPool) -> None:
        entry = EncoderEntry(leaves.id, leaves.addr)
        announce = ZmqRegistry(registry.addr)
        announce.register(entry)
        await until(lambda: len(pool.live()) == 2)
        key = next(f"uuid:{i}" for i in range(99) if rendezvous(f"uuid:{i}", pool.live())
                   == leaves.addr)
        slow = asyncio.create_task(pool.encode(request(key, pool.reply_to)))
        await until(lambda: leaves.keys == [key])
        announce.leave(entry)
        await until(lambda: pool.live() == [stays.addr])
        again = await pool.encode(EncodeRequest(key, "image", b"x", {}, [], pool.reply_to, "r2"))
        assert again.status == 200 and stays.keys == [key]  # the new one went to the stayer
        assert (await slow).status == 200 and leaves.keys == [key]  # answered where it was
        leaves.kill()
        await until(lambda: leaves.addr not in pool.encoders)  # forgotten once its link drops
        announce.close()

    try:
        with_pool(registry, [stays.addr], body)
    finally:
        stays.kill()
        leaves.kill()


def test_a_killed_member_loses_its_items_to_the_others_at_once(registry):
    stays, dies = FakeEncoder(), FakeEncoder(delay_s=30.0)  # it never answers

    async def body(pool: EncoderPool) -> None:
        announce = ZmqRegistry(registry.addr)
        announce.register(EncoderEntry(dies.id, dies.addr))
        await until(lambda: len(pool.live()) == 2)
        keys = [f"uuid:{i}" for i in range(99)
                if rendezvous(f"uuid:{i}", pool.live()) == dies.addr][:5]
        tasks = [asyncio.create_task(pool.encode(request(k, pool.reply_to))) for k in keys]
        await until(lambda: len(dies.keys) == 5)
        t0 = time.monotonic()
        dies.kill()
        done = await asyncio.wait_for(asyncio.gather(*tasks), 3.0)
        assert [d.status for d in done] == [200] * 5 and sorted(stays.keys) == sorted(keys)
        assert time.monotonic() - t0 < 1.0  # the link drop, not the registry's expiry
        await until(lambda: dies.addr not in pool.encoders)  # then the registry drops it
        announce.close()

    try:
        with_pool(registry, [stays.addr], body)
    finally:
        stays.kill()
        dies.kill()


def test_lookup_asks_the_owner_and_times_out_cleanly(registry):
    geometry = {"num_tokens": 9, "grid_thw": [1, 6, 6]}
    holder = FakeEncoder(held={"uuid:seen": geometry})

    async def body(pool: EncoderPool) -> None:
        await until(lambda: pool.live() == [holder.addr])
        assert await pool.lookup("uuid:seen") == geometry
        assert await pool.lookup("uuid:never") is None
        holder.kill()
        await until(lambda: not pool.live())
        assert await pool.lookup("uuid:seen") is None  # nobody to ask: no wait at all

    try:
        with_pool(registry, [holder.addr], body)
    finally:
        holder.kill()


def test_a_uuid_alone_is_found_where_it_was_encoded_after_the_pool_changed(registry):
    """A pool change moves keys, not stores: a uuid named alone whose owner is now a newcomer is
    served by the encoder that holds it; one that nobody holds is still the owner's 400."""
    from frontend.errors import RequestError

    geometry = {"num_tokens": 4}
    first, joined = FakeEncoder(held={}), FakeEncoder()
    keys = [f"uuid:k{i}" for i in range(40)]
    key = next(k for k in keys if rendezvous(k, [first.addr, joined.addr]) == joined.addr)
    first.held[key] = geometry

    async def body(pool: EncoderPool) -> None:
        await until(lambda: sorted(pool.live()) == sorted([first.addr, joined.addr]))
        alone = EncodeRequest(key, "image", None, {}, ["tcp://127.0.0.1:1"], pool.reply_to,
                              "r-alone")
        assert (await pool.encode(alone)).status == 200
        assert joined.keys == [key] and first.keys == [key]  # asked its owner, served by first
        assert await pool.lookup(key) == geometry  # the geometry lookup looks past the owner too
        nobody = next(k for k in keys if k != key and
                      rendezvous(k, [first.addr, joined.addr]) == joined.addr)
        with pytest.raises(RequestError, match="not in this store"):
            await pool.encode(EncodeRequest(nobody, "image", None, {}, ["tcp://127.0.0.1:1"],
                                            pool.reply_to, "r-nobody"))
        assert nobody not in first.keys  # looked up there, never sent
        with_data = EncodeRequest(nobody, "image", b"x", {}, ["tcp://127.0.0.1:1"],
                                  pool.reply_to, "r-data")
        assert (await pool.encode(with_data)).status == 200  # data: its owner encodes it

    try:
        with_pool(registry, [first.addr, joined.addr], body)
    finally:
        first.kill()
        joined.kill()
