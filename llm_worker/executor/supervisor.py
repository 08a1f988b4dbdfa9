"""Bringing a failed TP group back, off the engine's busy loop.

When the group fails (`ExecutorError`) the engine has already answered its requests and the
group's workers are stopped. `GroupSupervisor.failed` then builds a fresh group from the same
config on a thread of its own: a model load takes seconds, and meanwhile the busy loop keeps
beating and answering (new requests get 503). The busy loop picks the new group up, its KV cache
allocated and warmed up, with `take()`. Attempts back off exponentially while groups keep
failing soon after they came up (or fail to start), so a crash loop costs a few starts a minute,
not a core.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from llm_worker.config import LLMWorkerConfig
from llm_worker.executor import Executor, make_executor

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 1.0  # the wait before restarting a group that failed soon after it came up
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # a group that served this long was healthy: its failure restarts at once


class GroupSupervisor:
    def __init__(self, config: LLMWorkerConfig, num_blocks: int):
        """``num_blocks``: the KV cache every new group must hold (the engine's block manager
        is sized to it, and the frontends were told it)."""
        self.config = config
        self.num_blocks = num_blocks
        self.restarts = 0  # groups brought back after a failure
        self.down_since: float | None = None  # monotonic time of the failure; None while up
        self._delay = 0.0  # the wait before the last attempt
        self._up_at = time.monotonic()
        self._ready: queue.Queue[Executor] = queue.Queue()
        self._closed = threading.Event()
        self._lock = threading.Lock()  # a group is queued or shut down, never lost to close()
        self._thread: threading.Thread | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, group: Executor) -> None:
        """``group`` failed: stop what is left of it and start bringing up a new one."""
        if self.down or self._closed.is_set():
            return
        now = time.monotonic()
        self.down_since = now
        stable = now - self._up_at >= STABLE_S
        self._delay = 0.0 if stable else min(BACKOFF_MAX_S, max(BACKOFF_BASE_S, 2 * self._delay))
        self._thread = threading.Thread(target=self._rebuild, args=(group,),
                                        name="tp-group-restart", daemon=True)
        self._thread.start()

    def take(self) -> Executor | None:
        """The new group once it is ready (its KV cache initialized), else None. Busy loop only."""
        try:
            group = self._ready.get_nowait()
        except queue.Empty:
            return None
        self.restarts += 1
        self.down_since = None
        self._up_at = time.monotonic()
        return group

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop restarting; a group that comes up after this is shut down at once."""
        with self._lock:
            self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        while (group := self.take()) is not None:
            group.shutdown()

    def _rebuild(self, old: Executor) -> None:
        old.shutdown()  # the survivors (the failure already stopped them) and the sockets
        delay = self._delay
        while not self._closed.wait(delay):
            log.warning("starting a new TP group (restart %d)", self.restarts + 1)
            try:
                group = self._start()
            except Exception:
                delay = min(BACKOFF_MAX_S, max(BACKOFF_BASE_S, 2 * delay))
                log.exception("the new TP group failed to start; next try in %.0f s", delay)
                continue
            self._delay = delay
            with self._lock:
                if not self._closed.is_set():
                    self._ready.put(group)
                    return
            group.shutdown()  # the engine stopped while this group loaded
            return

    def _start(self) -> Executor:
        group = make_executor(self.config)
        try:
            available = group.num_available_blocks()
            if available < self.num_blocks:  # the device lost memory to someone since the start
                raise RuntimeError(f"the new TP group holds {available} KV blocks, the engine "
                                   f"needs {self.num_blocks}")
            group.init_kv_cache(self.num_blocks)
        except BaseException:
            group.shutdown()
            raise
        return group
