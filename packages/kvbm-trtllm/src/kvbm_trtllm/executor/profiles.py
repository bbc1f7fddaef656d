"""TensorRT-LLM versions the reference executor can imitate, chosen by one option.

``Executor(..., trtllm_version="main")`` picks a ``TrtllmProfile`` from ``PROFILES``; the
profile says what differs between versions as a connector sees it. Everything else (call order,
overlap scheduler, CUDA graphs, errors) is the same in all three and described in
``executor.py``.

- ``"1.2"``: ``RequestData`` has five fields only (``RequestData12``: request_id, new_tokens,
  new_block_ids, computed_position, num_scheduled_tokens), as the 1.2-era
  ``_torch/pyexecutor/kv_cache_connector.py`` (reference §3). No load-error API.
- ``"main"`` (the default): newest main with the V1 KV cache manager. ``RequestData`` adds
  ``block_hashes`` (cumulative chain of beam 0), ``priorities`` (None: no retention config),
  ``cache_salt`` and ``new_block_ids_by_layer_group`` (one group), as
  ``_torch/pyexecutor/connectors/kv_cache_connector.py``@035ab91c. No load-error API: neither
  that file nor ``py_executor.py``@00043967 has ``get_block_ids_with_load_errors``.
- ``"main+load-errors"``: main plus the closed PR #15425 ("Feature/kv connector handshake",
  2026-06-16; copies live in forks only): after each iteration the manager's
  ``handle_load_errors`` asks ``worker.get_block_ids_with_load_errors()`` and every active
  request holding a failed block is failed with "KV cache load failure" (not recomputed). Off
  unless asked for: no TensorRT-LLM release has it.

- ``"v2"``: TensorRT-LLM 1.4 with KVCacheManagerV2 (the default since v1.4.0rc1, PR #17495;
  connector support PRs #18700 / #18762). What changes for a connector (``v2.py`` has the
  details): ``register_kv_cache_layout(KvCacheLayout)`` instead of ``register_kv_caches``,
  one page space per layer group (a full-attention and a sliding-window group when the model
  has windowed layers), the ``*_by_layer_group`` callbacks with ``-1`` for pages a sliding
  window left, ``block_hashes=[]`` and ``priorities=None`` in ``RequestData``, blocks
  allocated per context chunk (``update_state_after_alloc`` sees the first chunk's; the rest
  arrive as ``new_block_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrtllmProfile", "PROFILES", "DEFAULT_TRTLLM_VERSION", "get_profile"]


@dataclass(frozen=True)
class TrtllmProfile:
    name: str
    has_main_request_data: bool  # block_hashes, priorities, cache_salt, by-layer-group ids
    has_load_error_api: bool  # PR #15425: get_block_ids_with_load_errors / handle_load_errors
    source: str  # the TensorRT-LLM files this profile follows
    is_kv_cache_manager_v2: bool = False  # layouts, layer groups, per-chunk allocation


PROFILES: dict[str, TrtllmProfile] = {
    "1.2": TrtllmProfile(
        name="1.2",
        has_main_request_data=False,
        has_load_error_api=False,
        source="_torch/pyexecutor/kv_cache_connector.py, py_executor.py (1.2-era, index id 3542389387)",
    ),
    "main": TrtllmProfile(
        name="main",
        has_main_request_data=True,
        has_load_error_api=False,
        source="_torch/pyexecutor/connectors/kv_cache_connector.py@035ab91c, py_executor.py@00043967",
    ),
    "main+load-errors": TrtllmProfile(
        name="main+load-errors",
        has_main_request_data=True,
        has_load_error_api=True,
        source="main + closed PR #15425 (tests/unittest/_torch/test_connector.py in forks)",
    ),
    "v2": TrtllmProfile(
        name="v2",
        has_main_request_data=True,
        has_load_error_api=False,
        source=(
            "connectors/kv_cache_connector.py@035ab91c, connectors/kv_cache_layout.py@0972960b, "
            "docs/source/features/kv-cache-connector.md@0972960b"
        ),
        is_kv_cache_manager_v2=True,
    ),
}

DEFAULT_TRTLLM_VERSION = "main"


def get_profile(trtllm_version: str) -> TrtllmProfile:
    profile = PROFILES.get(trtllm_version)
    if profile is None:
        raise ValueError(
            f"trtllm_version {trtllm_version!r} is not one of {sorted(PROFILES)}"
        )
    return profile
