"""CUDA graphs as a connector sees them: which forwards run the per-layer hooks.

``GraphCaptures(config)`` (``None``: graphs off) tracks which batch sizes have a graph.
``runs_layer_hooks(is_generation_only, batch_size) -> bool``, asked once per forward (replays are
counted in ``num_replays``):
- a batch with any context request, or larger than the graph sizes allow, runs eagerly: hooks fire;
- a generation-only batch whose graph key (its size; with ``enable_padding`` the next graph size
  up) was never seen is captured: hooks fire, this once;
- every later batch with that key is a replay: no Python runs inside the model, so
  ``wait_for_layer_load`` / ``save_kv_layer`` do not fire.

The forward-pass callable and ``wait_for_save`` run after the model either way; the executor
always calls them.

Source: ``model_engine`` forward (index id 69521225249): ``cuda_graph_runner.capture(key, ...)``
when ``needs_capture``, then ``replay(key, inputs)``, then ``forward_pass_callable()``; graphs are
for "batches that consist of decoding requests *only*" (``llm_args.py`` ``cuda_graph_config``).
TensorRT-LLM also captures during warm-up, before any request, with dummy requests [U]; here
capture happens on first use, so the first real batch of a size is the one whose hooks fire.
The reference model still runs eagerly every time (no real graph is captured); only what the
connector can observe is imitated.
"""

from __future__ import annotations

import bisect

from kvbm_trtllm.trtllm_api import CudaGraphConfigLike

__all__ = ["GraphCaptures"]


class GraphCaptures:
    def __init__(self, config: CudaGraphConfigLike | None):
        self.config = config
        self.batch_sizes = config.resolved_batch_sizes() if config is not None else ()
        self.captured_keys: set[int] = set()
        self.num_replays = 0  # forwards that ran no layer hooks

    def graph_key(self, batch_size: int) -> int | None:
        """The graph a generation-only batch of this size would replay, or None (eager)."""
        if self.config is None:
            return None
        if not self.config.enable_padding:
            return batch_size if batch_size in self.batch_sizes else None
        i = bisect.bisect_left(self.batch_sizes, batch_size)
        return self.batch_sizes[i] if i < len(self.batch_sizes) else None

    def runs_layer_hooks(self, is_generation_only: bool, batch_size: int) -> bool:
        key = self.graph_key(batch_size) if is_generation_only else None
        if key is None:
            return True
        if key in self.captured_keys:
            self.num_replays += 1
            return False
        self.captured_keys.add(key)
        return True
