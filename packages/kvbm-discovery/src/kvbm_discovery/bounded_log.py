"""Bounded, rate-limited logging of what peers send (any process).

``clip(text, limit)`` (from :mod:`kvbm_core.bounded_text`): at most ``limit`` characters,
saying how many were cut, so one peer's 900 KB string never becomes one log line.
``RateLimitedLog(logger, every_secs)``: ``warning(key, ...)`` logs the first occurrence of a
key and then at most once per ``every_secs``, with the number suppressed meanwhile, so a flood
of bad messages cannot flood the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from kvbm_core.bounded_text import MAX_TEXT, clip

__all__ = ["MAX_TEXT", "clip", "RateLimitedLog"]

_MAX_KEYS = 256  # keys may come from what peers send: remember a bounded number


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, every_secs: float = 10.0) -> None:
        self.logger = logger
        self.every_secs = every_secs
        self._lock = threading.Lock()
        self._last: OrderedDict[str, float] = OrderedDict()
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every_secs:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            self._last.move_to_end(key)
            if len(self._last) > _MAX_KEYS:
                self._suppressed.pop(self._last.popitem(last=False)[0], None)
            suppressed = self._suppressed.pop(key, 0)
        text = message % args if args else message
        if suppressed:
            text += f" ({suppressed} more like it in the last {self.every_secs:g}s not logged)"
        self.logger.warning("%s", clip(text))
