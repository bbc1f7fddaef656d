"""The request objects a connector receives, with TensorRT-LLM's attribute names and no others.

One ``LlmRequestState`` per request holds what TensorRT-LLM's C++ ``LlmRequest`` holds; two views
of it go to the connector, as in TensorRT-LLM:
- ``CppLlmRequest``: what ``get_num_new_matched_tokens`` gets. KC
  (``connectors/kv_cache_connector.py``@035ab91c): the request "arrives from C++, which casts it
  to the base-class ``LlmRequest`` rather than the ``_torch`` subclass, so only what
  ``nanobind/batch_manager/bindings.cpp`` binds is readable": ``request_id``, ``prompt_len``,
  ``context_current_position`` (``def_prop_rw``: writable), ``get_tokens(beam)``,
  ``get_num_tokens(beam)``, ``lora_task_id`` (int or None), ``cache_salt_id`` (int or None) and
  the property ``is_generation_only_request``. No ``py_*``, no ``lora_name``, no ``cache_salt``;
  like a nanobind object it takes no new attributes.
- ``PyLlmRequest``: what ``update_state_after_alloc`` and ``request_finished`` get, the Python
  subclass (``_torch/pyexecutor/llm_request.py``): all of the above plus ``py_request_id``,
  ``py_lora_path`` (str or None) and ``is_generation_only_request()`` as a METHOD, so
  ``getattr(req, "is_generation_only_request", False)`` is a bound method there (truthy).

Writing ``context_current_position`` through either view changes the one state.

Identity: ``lora_task_id(name)`` is crc32 of the adapter name (stable across processes; in
TensorRT-LLM the id is whatever the LoRA manager assigned, the point is an int, not a name);
``cache_salt_id(salt)`` is a stable 64-bit hash of the salt string, little-endian, as
``get_cache_salt_id`` in ``tensorrt_llm/inputs/utils.py`` (index id 51838793885) -- there with
blake3 ``digest(length=8)``, here blake2b with an 8-byte digest (blake3 is not a dependency), so
the ids differ from TensorRT-LLM's but are as stable.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field

__all__ = [
    "LlmRequestState",
    "CppLlmRequest",
    "PyLlmRequest",
    "lora_task_id",
    "cache_salt_id",
]


def lora_task_id(lora_name: str | None) -> int | None:
    return None if lora_name is None else zlib.crc32(lora_name.encode("utf-8"))


def cache_salt_id(cache_salt: str | None) -> int | None:
    if cache_salt is None:
        return None
    digest = hashlib.blake2b(cache_salt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class LlmRequestState:
    """What the C++ ``LlmRequest`` holds for one request (beam 0 only, beam width 1)."""

    request_id: int
    tokens: list[int]
    prompt_len: int
    context_current_position: int = 0
    lora_task_id: int | None = None
    lora_path: str | None = None
    cache_salt_id: int | None = None
    is_generation_only: bool = False
    views: tuple[CppLlmRequest, PyLlmRequest] | None = field(default=None, repr=False)

    @classmethod
    def new(
        cls,
        request_id: int,
        prompt: list[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> LlmRequestState:
        return cls(
            request_id=request_id,
            tokens=list(prompt),
            prompt_len=len(prompt),
            lora_task_id=lora_task_id(lora_name),
            # A path string for a LoRA request, as the LLM API's LoRARequest.path would give.
            lora_path=None if lora_name is None else f"loras/{lora_name}",
            cache_salt_id=cache_salt_id(cache_salt),
        )

    @property
    def cpp_view(self) -> CppLlmRequest:
        return self._views()[0]

    @property
    def py_view(self) -> PyLlmRequest:
        return self._views()[1]

    def _views(self) -> tuple[CppLlmRequest, PyLlmRequest]:
        if self.views is None:
            self.views = (CppLlmRequest(self), PyLlmRequest(self))
        return self.views


def _check_beam(beam: int) -> None:
    if beam != 0:
        raise ValueError(f"only beam 0 exists (beam width 1), got beam {beam}")


class CppLlmRequest:
    """The bound C++ base ``LlmRequest`` (``bindings.cpp``): read-only but for the position."""

    __slots__ = ("_state",)  # like a nanobind object: no attributes beyond the bound ones

    def __init__(self, state: LlmRequestState):
        self._state = state

    @property
    def request_id(self) -> int:
        return self._state.request_id

    @property
    def prompt_len(self) -> int:
        return self._state.prompt_len

    @property
    def context_current_position(self) -> int:
        return self._state.context_current_position

    @context_current_position.setter
    def context_current_position(self, position: int) -> None:
        self._state.context_current_position = int(position)

    @property
    def lora_task_id(self) -> int | None:
        return self._state.lora_task_id

    @property
    def cache_salt_id(self) -> int | None:
        return self._state.cache_salt_id

    @property
    def is_generation_only_request(self) -> bool:  # type: ignore[override]
        return self._state.is_generation_only

    def get_tokens(self, beam: int) -> list[int]:
        _check_beam(beam)
        return list(self._state.tokens)

    def get_num_tokens(self, beam: int) -> int:
        _check_beam(beam)
        return len(self._state.tokens)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(request_id={self.request_id}, prompt_len={self.prompt_len}, "
            f"context_current_position={self.context_current_position})"
        )


class PyLlmRequest(CppLlmRequest):
    """The ``_torch`` subclass: Python attributes on top of the bound ones."""

    # No __slots__: a Python subclass has a __dict__, as TensorRT-LLM's does.

    @property
    def py_request_id(self) -> int:
        return self._state.request_id

    @property
    def py_lora_path(self) -> str | None:
        return self._state.lora_path

    def is_generation_only_request(self) -> bool:  # type: ignore[override]
        # A method here, a property on the base: TensorRT-LLM's Python LlmRequest defines
        # ``def is_generation_only_request(self)`` over the binding.
        return self._state.is_generation_only
