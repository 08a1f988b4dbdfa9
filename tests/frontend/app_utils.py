"""The HTTP app against a real engine core, for frontend tests: the engine in a spawned process,
the app on its own event loop in a thread; tests talk to both over real sockets."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from frontend.config import FrontendConfig
from frontend.openai.api_server import build_app, start_site
from protocol.addresses import tcp


def _engine_main(model: str, addr: str, kwargs: dict) -> None:
    from llm_worker.config import LLMWorkerConfig
    from llm_worker.engine_proc import run_engine_core

    run_engine_core(LLMWorkerConfig(model=model, **kwargs), addr)


@contextmanager
def running_engine(model: str, **kwargs) -> Iterator[tuple[str, mp.Process]]:
    """An engine core serving ``model`` (LLMWorkerConfig ``kwargs``): (its address, process)."""
    addr = tcp()
    engine = mp.get_context("spawn").Process(target=_engine_main, args=(model, addr, kwargs),
                                             daemon=True)
    engine.start()
    try:
        yield addr, engine
    finally:
        engine.terminate()
        engine.join(10)
        if engine.is_alive():
            engine.kill()
            engine.join()


class AppServer:
    """The app on its own event loop in a thread."""

    def __init__(self, config: FrontendConfig):
        self.url = f"http://{config.host}:{config.port}"
        self.loop = asyncio.new_event_loop()
        self.app = build_app(config)
        self.runner = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = self._call(start_site(self.app, config.host, config.port))

    def _call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_healthy(self, engine: mp.Process, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert engine.is_alive(), "engine process died during startup"
            assert time.monotonic() < deadline, "engine never became healthy"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.runner is not None:
            self._call(self.runner.cleanup())
        self._call(_cancel_the_rest())  # e.g. handlers of clients a test left hanging
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _cancel_the_rest() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
