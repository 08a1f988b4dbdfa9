"""The encoder registry as a named Ray actor (protocol/ray_registry.py): the same membership
behaviour as the ZeroMQ service, against a local Ray instance on CPU."""

from __future__ import annotations

import uuid

import pytest
from fake_encoder import FakeEncoder, until
from test_encoder_registry import run_pool

from frontend.media.encoder_pool import EncoderPool
from protocol.registry import EncoderEntry

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, namespace="mmserve")
    yield
    ray.shutdown()


def test_members_join_leave_and_expire_through_the_actor(local_ray):
    from protocol.ray_registry import RayRegistry, remove

    name = f"ray:test-encoders-{uuid.uuid4().hex[:6]}"
    stays, leaves, dies = FakeEncoder(), FakeEncoder(), FakeEncoder()
    registry = RayRegistry(name, expire_s=1.5)  # > the watch poll, so a beat is seen
    other = RayRegistry(name)  # another process's handle finds the same actor by name

    async def body(pool: EncoderPool) -> None:
        await until(lambda: pool.live() == [stays.addr])
        gone, silent = EncoderEntry(leaves.id, leaves.addr), EncoderEntry(dies.id, dies.addr)
        other.register(gone)
        other.register(silent)
        await until(lambda: len(pool.live()) == 3, timeout=5)
        other.leave(gone)
        await until(lambda: leaves.addr not in pool.live(), timeout=5)
        # ``silent`` never beats again: it expires (it never said goodbye).
        await until(lambda: pool.live() == [stays.addr], timeout=5)

    try:
        run_pool(registry, [stays.addr], body)
    finally:
        for enc in (stays, leaves, dies):
            enc.kill()
        remove(name.removeprefix("ray:"))
