"""Keep what the disk tier stored when the process ends without ``close()``.

TensorRT-LLM never calls a connector's ``shutdown()``: an engine process simply exits, at the
end of the interpreter (``atexit`` runs) or on SIGTERM (a process manager stopping it; the
default action ends the process without ``atexit``). Each open disk tier's index
(:class:`~kvbm_tiers_disk.persistent_index.PersistentIndex`) is registered here and written
on either path, so blocks stored before the exit are found again.

Operations (worker process):
- ``register(flushable)``: flush it at exit (held weakly: a closed, collected tier is skipped).
- ``install_sigterm_handler()``: from the main thread, and only where SIGTERM still has its
  default action (an engine's own handler is left alone), flush on SIGTERM, then end the
  process with that signal as before. Elsewhere it does nothing (Python allows signal
  handlers only on the main thread): the index is still durable within the flush period.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref
from typing import Any, Protocol

log = logging.getLogger(__name__)

__all__ = ["register", "install_sigterm_handler", "flush_all"]


class _Flushable(Protocol):
    def flush_index(self) -> bool: ...


_open: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
_is_registered = False


def register(flushable: _Flushable) -> None:
    global _is_registered
    with _lock:
        _open.add(flushable)
        if not _is_registered:
            atexit.register(flush_all)
            _is_registered = True
    install_sigterm_handler()


def flush_all() -> None:
    for flushable in list(_open):
        try:
            flushable.flush_index()
        except Exception:  # an exit path must go on to the other tiers
            log.exception("kvbm disk tier: index flush at exit failed")


def _on_sigterm(signum: int, frame: Any) -> None:
    flush_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install_sigterm_handler() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):
        pass  # not the main interpreter, or signals unavailable here
