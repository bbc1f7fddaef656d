"""Bounded text from peers (any process).

``clip(text, limit)``: at most ``limit`` characters (``MAX_TEXT`` by default), saying how many
were cut, so one peer's 900 KB string never becomes one log line or one stored field.
Clipping a clipped text changes nothing.
"""

from __future__ import annotations

__all__ = ["MAX_TEXT", "clip"]

MAX_TEXT = 2000
# Room for the "... (N more characters cut)" note, so clipping a clipped text changes nothing.
_NOTE_ROOM = 48


def clip(text: str, limit: int = MAX_TEXT) -> str:
    if len(text) <= limit + _NOTE_ROOM:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters cut)"
