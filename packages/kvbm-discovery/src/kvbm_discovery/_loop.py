"""A daemon thread running its own asyncio loop, so synchronous engine code can use asyncio
clients (aetcd, nats-py) through blocking calls with timeouts."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class BackgroundLoop:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait up to ``timeout`` s; cancels it on timeout."""
        future = self.submit(coro)
        # The coroutine's own TimeoutError must stay distinct from ours (same class in 3.11).
        done, _ = concurrent.futures.wait([future], timeout)
        if not done:
            future.cancel()
            raise TimeoutError(f"no answer within {timeout:g}s")
        return future.result()

    def call_soon(self, func: Callable[..., Any], *args: Any) -> None:
        """Schedule a plain callback on the loop; never blocks the caller."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(func, *args)

    def stop(self, cleanup: Callable[[], Awaitable[Any]] | None = None, timeout: float = 5.0) -> None:
        """Run ``cleanup`` (if any), cancel leftover tasks, stop and join the thread; idempotent."""
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            with contextlib.suppress(Exception):  # shutting down regardless
                self.call(self._shutdown(cleanup), timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()

    async def _shutdown(self, cleanup: Callable[[], Awaitable[Any]] | None) -> None:
        if cleanup is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cleanup(), 3.0)
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks(self.loop) if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
