"""Process hygiene shared by every role: die with the parent, log with the role's name."""

from __future__ import annotations

import logging
import os
import threading
import time


def exit_with_parent(poll_s: float = 0.5) -> None:
    """Exit this process when the process that started it dies (no orphans after a SIGKILL)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def setup_logging(role: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
