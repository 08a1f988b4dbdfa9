"""The device ring's bookkeeping (no GPU needed): where slots go, when one may be reused, and
that the reader's guard check never calls an overwritten slot intact."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from encoder_worker.device_ring import ALIGN, RingSpace, remove_stale_guards
from llm_worker.device_inbox import intact


def test_slots_are_aligned_never_straddle_the_end_and_wrap():
    space = RingSpace(4096, min_age_s=0.0)
    assert space.reserve(1000, 0.0) == 0
    assert space.reserve(1000, 0.0) == 1024  # aligned up
    assert space.reserve(2100, 0.0) == 4096  # 2048 + 2304 would pass the end: starts again at 0
    assert space.reserve(4097, 0.0) is None  # larger than the ring


def test_a_young_slot_is_not_reused():
    space = RingSpace(4 * ALIGN, min_age_s=1.0)
    assert space.reserve(2 * ALIGN, 0.0) == 0
    assert space.reserve(2 * ALIGN, 0.5) == 2 * ALIGN
    assert space.reserve(2 * ALIGN, 0.9) is None  # would overwrite the slot written at 0.0
    assert space.reserve(2 * ALIGN, 1.2) == 4 * ALIGN  # that one is old enough now
    assert space.reserve(ALIGN, 1.3) is None  # the one of 0.5 is not
    assert space.reserve(ALIGN, 1.6) == 6 * ALIGN


@pytest.mark.parametrize("seed", range(5))
def test_guard_never_passes_an_overwritten_slot(seed):
    """The reader's check (`llm_worker.device_inbox.intact`), replayed against a map of which
    slot last wrote each byte."""
    rng = random.Random(seed)
    size = 16 * ALIGN
    space = RingSpace(size, min_age_s=0.0)
    owner = [None] * size
    slots = []  # (id, start, nbytes)
    reserved = 0
    passed_intact = failed = 0
    for i in range(400):
        n = rng.randrange(1, 5 * ALIGN)
        start = space.reserve(n, float(i))
        assert start is not None and start % ALIGN == 0 and start >= reserved - n
        reserved = start + n  # what DeviceRing.put writes to the guard before the copy
        off = start % size
        assert off + n <= size
        owner[off:off + n] = [i] * n
        slots.append((i, start, n))
        for sid, s, m in slots[-20:]:
            held = all(o == sid for o in owner[s % size:s % size + m])
            if intact(reserved, s, size):
                assert held, (sid, s, m, reserved)
                passed_intact += 1
            else:
                failed += 1
    assert passed_intact and failed  # both sides of the check ran


def test_guards_of_dead_encoders_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    names = [f"mmserve-ring-{dead}-7f00", f"mmserve-ring-{os.getpid()}-7f00", "other-file"]
    for n in names:
        (tmp_path / n).write_bytes(b"\0" * 8)
    assert remove_stale_guards(str(tmp_path)) == [names[0]]
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])
