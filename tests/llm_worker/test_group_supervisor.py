"""GroupSupervisor's timing and bookkeeping without processes: groups are fakes that record what
was done to them, and the backoff is scaled down to tens of milliseconds. The real restart of a
real group is in test_tp_faults.py and tests/e2e/test_tp_restart.py."""

from __future__ import annotations

import threading
import time

import pytest

from llm_worker.executor import supervisor as sup
from llm_worker.executor.supervisor import GroupSupervisor

BASE = 0.05


class FakeGroup:
    def __init__(self, blocks: int = 64):
        self.blocks, self.kv, self.stopped = blocks, None, False

    def num_available_blocks(self) -> int:
        return self.blocks

    def init_kv_cache(self, num_blocks: int) -> None:
        self.kv = num_blocks

    def shutdown(self) -> None:
        self.stopped = True


@pytest.fixture
def starts(monkeypatch):
    """What each make_executor call returns (a FakeGroup, or an exception to raise); the times
    of the calls are appended to ``starts.at``."""
    class Starts(list):
        at: list[float] = []

    plan = Starts()

    def make(config):
        plan.at.append(time.monotonic())
        item = plan.pop(0) if plan else FakeGroup()
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr(sup, "make_executor", make)
    monkeypatch.setattr(sup, "BACKOFF_BASE_S", BASE)
    monkeypatch.setattr(sup, "STABLE_S", 1.0)
    return plan


def _take(s: GroupSupervisor, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        group = s.take()
        if group is not None:
            return group
        time.sleep(0.005)
    return None


def test_failed_starts_back_off_and_the_new_group_gets_the_engines_kv_cache(starts):
    small = FakeGroup(blocks=10)  # fewer blocks than the engine is sized to: not usable
    starts += [RuntimeError("load failed"), small]
    s = GroupSupervisor(config=None, num_blocks=32)
    old = FakeGroup()
    failed_at = time.monotonic()
    s.failed(old)
    assert s.down and s.take() is None
    group = _take(s)
    assert group is not None and group.kv == 32 and not s.down and s.restarts == 1
    assert old.stopped and small.stopped and small.kv is None
    # Failed within STABLE_S of the start: BASE first, then doubling after each failed start.
    gaps = [b - a for a, b in zip([failed_at, *starts.at], starts.at)]
    assert len(gaps) == 3 and gaps[0] >= BASE and gaps[1] >= 2 * BASE and gaps[2] >= 4 * BASE
    s.close()


def test_a_crash_loop_doubles_the_wait_and_a_stable_group_restarts_at_once(starts):
    s = GroupSupervisor(config=None, num_blocks=8)
    s._up_at -= 1.0  # this group served STABLE_S: its failure restarts at once
    s.failed(FakeGroup())
    assert _take(s) is not None and s._delay == 0.0
    for want in (BASE, 2 * BASE, 4 * BASE):  # each new group dies right after it came up
        s.failed(FakeGroup())
        assert _take(s) is not None and s._delay == pytest.approx(want)
    assert s.restarts == 4
    s.close()


def test_close_cuts_the_wait_short_and_stops_a_group_that_comes_up_late(starts, monkeypatch):
    monkeypatch.setattr(sup, "BACKOFF_BASE_S", 10.0)
    s = GroupSupervisor(config=None, num_blocks=8)
    s.failed(FakeGroup())  # waits 10 s before its first try
    started = time.monotonic()
    s.close()
    assert time.monotonic() - started < 1 and not starts.at and not s._thread.is_alive()

    loading, release = threading.Event(), threading.Event()
    late = FakeGroup()

    def slow_make(config):
        loading.set()
        release.wait(5)
        return late

    monkeypatch.setattr(sup, "make_executor", slow_make)
    monkeypatch.setattr(sup, "BACKOFF_BASE_S", 0.0)
    s = GroupSupervisor(config=None, num_blocks=8)
    s.failed(FakeGroup())
    assert loading.wait(5)
    s.close(timeout_s=0.05)  # the engine stops while the new group loads
    release.set()
    s._thread.join(5)
    assert late.stopped and late.kv == 8 and s.take() is None
