"""protocol/timeline.py: one parseable JSON line per mark when on, nothing at all when off."""

from __future__ import annotations

import os
import threading

import pytest

from frontend import env
from protocol import timeline


@pytest.fixture(autouse=True)
def _off_afterwards():
    yield
    timeline.init("test", None)


def test_marks_are_lines_of_json(tmp_path):
    timeline.init("test", str(tmp_path))
    assert timeline.enabled()
    timeline.mark("http_entered", "chatcmpl-1")
    timeline.mark("encode_sent", "chatcmpl-1|blake3:ab", t_ns=5)
    path = tmp_path / f"test-{os.getpid()}.jsonl"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    events = timeline.load(tmp_path)
    assert [e["event"] for e in events] == ["encode_sent", "http_entered"]  # time order
    assert events[0] == {"t": 5, "pid": os.getpid(), "role": "test", "event": "encode_sent",
                         "key": "chatcmpl-1|blake3:ab"}
    assert events[1]["t"] > 5 and events[1]["key"] == "chatcmpl-1"


def test_threads_write_whole_lines(tmp_path):
    timeline.init("test", str(tmp_path))

    def work(i: int) -> None:
        for j in range(200):
            timeline.mark("e", f"{i}-{j}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / f"test-{os.getpid()}.jsonl").read_bytes().splitlines()
    assert len(lines) == len(timeline.load(tmp_path)) == 1600  # every line parses
    keys = [e["key"] for e in timeline.load(tmp_path)]
    for i in range(8):  # each thread's events keep their order
        mine = [k for k in keys if k.startswith(f"{i}-")]
        assert mine == [f"{i}-{j}" for j in range(200)]


def test_off_writes_nothing(tmp_path):
    timeline.init("test", str(tmp_path))  # on, but nothing marked: no file yet
    timeline.init("test", None)
    assert not timeline.enabled()
    timeline.mark("http_entered", "chatcmpl-1")
    assert list(tmp_path.iterdir()) == []


def test_env_names_the_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MMSERVE_TIMELINE", raising=False)
    assert env.timeline_dir() is None
    monkeypatch.setenv("MMSERVE_TIMELINE", str(tmp_path))
    assert env.timeline_dir() == str(tmp_path)
