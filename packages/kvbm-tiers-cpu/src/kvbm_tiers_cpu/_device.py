"""One code path for CUDA and plain CPU tensors: streams, events and index uploads.

On CUDA, work goes to side streams and completes asynchronously; ``Event.query()`` says when.
Without CUDA there are no streams: every copy runs inline and its event is born complete, so
the handlers above run unchanged (that is what CI exercises).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["Lane", "DoneEvent", "upload_ids"]


class DoneEvent:
    """An event that completed when it was made (the CPU path runs copies inline)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class Lane:
    """A stream on ``device`` (CUDA), or the caller's thread (CPU)."""

    def __init__(self, device: torch.device, priority: int = 0) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device, priority=priority) if self.is_cuda else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            yield

    def record(self) -> Any:
        if self.stream is None:
            return DoneEvent()
        return self.stream.record_event()

    def wait(self, fence: Any) -> None:
        """Order later work on this lane after ``fence`` (an event or a stream) on the GPU."""
        if self.stream is None or fence is None or isinstance(fence, DoneEvent):
            return
        if isinstance(fence, torch.cuda.Event):
            self.stream.wait_event(fence)
        elif isinstance(fence, torch.cuda.Stream):
            self.stream.wait_stream(fence)
        else:
            raise TypeError(
                f"ready must be a torch.cuda.Event (recorded after the forward pass) or a "
                f"torch.cuda.Stream, got {type(fence).__name__}"
            )

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def upload_ids(ids: np.ndarray, lane: Lane) -> torch.Tensor:
    """``ids`` as an int64 tensor on the lane's device, copied on the lane without a host sync.

    A pageable host-to-device copy would make the driver wait for the stream first, so the
    ids travel through pinned memory (torch's caching host allocator keeps it until the copy ran).
    """
    host = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    if not lane.is_cuda:
        return host
    with lane.active():
        return host.pin_memory().to(lane.device, non_blocking=True)
