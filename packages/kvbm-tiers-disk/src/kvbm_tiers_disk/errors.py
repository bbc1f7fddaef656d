"""The one exception block I/O on the disk tier raises (worker process, any thread)."""

from __future__ import annotations

__all__ = ["DiskBlockError"]


class DiskBlockError(Exception):
    """A block could not be written or read. ``is_corrupt``: its bytes on disk are unusable."""

    def __init__(self, message: str, *, is_corrupt: bool = False, errno: int | None = None):
        super().__init__(message)
        self.is_corrupt = is_corrupt
        self.errno = errno
