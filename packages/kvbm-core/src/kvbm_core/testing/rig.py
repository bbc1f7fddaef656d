"""A tier under test: its storage, the GPU pool and required tiers, handlers, and byte access.

Runs in the test process. ``build_tier_rig`` loads the tier by name through the real plugin
manager (entry points of group ``kvbm``), builds a ``DevicePool`` over torch tensors (CUDA when
available) plus the storages of every tier the tested one ``requires``, and asks the tier for its
handlers exactly as a worker does. ``read_blocks``/``write_blocks`` reach a block's bytes
directly on the GPU pool and on host-addressable storages (``host_view``), and through the
rig's handlers otherwise. ``run_jobs`` submits batches, then polls until every job has been
reported, checking that none is reported twice or never.

torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvbm_core.config import KvbmConfig
from kvbm_core.layout import KvLayout, LayoutKind
from kvbm_core.plugins import TierContext, TierSpec, get_plugin_manager, load_tier_specs
from kvbm_core.transfer import GPU, DevicePool, JobResult, Storage, TransferHandler, TransferJob

__all__ = [
    "TierRig",
    "build_tier_rig",
    "make_device_pool",
    "default_device",
    "read_blocks",
    "write_blocks",
    "run_jobs",
    "is_host_addressable",
    "route",
]

_job_ids = itertools.count(1)


def default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def make_device_pool(layout: KvLayout, num_blocks: int, device: str) -> DevicePool:
    """A zeroed GPU pool shaped as the engine registers it (see ``DevicePool``)."""
    import torch

    dtype = getattr(torch, layout.dtype)
    inner = layout.elements_per_region
    shapes: list[tuple[int, ...]]
    if layout.kind is LayoutKind.FULLY_CONTIGUOUS:
        shapes = [(num_blocks, layout.num_layers, layout.kv_factor, inner)]
    else:
        shapes = [(num_blocks, layout.kv_factor, inner)] * layout.num_layers
    tensors = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
    return DevicePool(tensors, layout)


class _Storages(Mapping[str, Storage]):
    """The storages ``make_handlers`` gets; a missing medium says how to declare it."""

    def __init__(self, storages: dict[str, Storage], tier_name: str) -> None:
        self._storages = storages
        self._tier_name = tier_name

    def __getitem__(self, medium: str) -> Storage:
        try:
            return self._storages[medium]
        except KeyError:
            raise KeyError(
                f"tier {self._tier_name!r} asked for the storage of medium {medium!r}, which "
                f"was not built (built: {sorted(self._storages)}); list the tier that provides "
                f"it in TierSpec.requires"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._storages)

    def __len__(self) -> int:
        return len(self._storages)


@dataclass
class TierRig:
    """Everything a conformance check needs for one tier and one layout."""

    spec: TierSpec
    layout: KvLayout
    device: str
    storages: dict[str, Storage]
    contexts: dict[str, TierContext]
    handlers: list[TransferHandler]
    required_handlers: list[TransferHandler] = field(default_factory=list)
    # Block hash last written to each slot, per medium, so integrity-checking tiers can verify.
    slot_hashes: dict[str, dict[int, int]] = field(default_factory=dict)

    @property
    def medium(self) -> str:
        return self.spec.medium

    @property
    def storage(self) -> Storage:
        return self.storages[self.spec.medium]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(h.src_medium, h.dst_medium) for h in self.handlers]

    def handler(self, src: str, dst: str) -> TransferHandler | None:
        for handler in [*self.handlers, *self.required_handlers]:
            if (handler.src_medium, handler.dst_medium) == (src, dst):
                return handler
        return None

    def ready_fence(self, src: str) -> Any:
        """What a worker passes as ``ready``: a CUDA event after GPU writes, else ``None``."""
        if src != GPU or not self.device.startswith("cuda"):
            return None
        import torch

        return torch.cuda.current_stream().record_event()

    def close(self) -> None:
        for handler in [*self.handlers, *self.required_handlers]:
            handler.close()
        for storage in self.storages.values():
            storage.close()


def _required_specs(
    specs: Mapping[str, TierSpec], spec: TierSpec, extra: Sequence[str]
) -> list[TierSpec]:
    names: list[str] = []
    pending = [*spec.requires, *extra]
    while pending:
        name = pending.pop()
        if name in names or name == spec.name:
            continue
        if name not in specs:
            raise LookupError(
                f"tier {spec.name!r} requires tier {name!r}, which no installed plugin provides; "
                f"installed: {sorted(specs)}"
            )
        names.append(name)
        pending.extend(specs[name].requires)
    return sorted((specs[n] for n in names), key=lambda s: s.level)


def build_tier_rig(
    tier_name: str,
    layout: KvLayout,
    *,
    num_slots: int,
    num_gpu_blocks: int,
    config: KvbmConfig,
    device: str | None = None,
    blocked_plugins: Sequence[str] = (),
    extra_tiers: Sequence[str] = (),
    options: Mapping[str, Any] | None = None,
    specs: Mapping[str, TierSpec] | None = None,
) -> TierRig:
    """Load ``tier_name`` through the plugin manager and build its storages and handlers.

    ``specs`` replaces the installed plugins (for testing the kit itself). Required tiers get
    ``num_slots + 24`` slots, so a handler that sizes one storage by another's count is caught.
    """
    device = device or default_device()
    if specs is None:
        specs = load_tier_specs(get_plugin_manager(blocked_plugins), required=[tier_name])
    spec = specs[tier_name]
    storages: dict[str, Storage] = {GPU: make_device_pool(layout, num_gpu_blocks, device)}
    contexts: dict[str, TierContext] = {}
    required = _required_specs(specs, spec, extra_tiers)
    rig = TierRig(spec, layout, device, storages, contexts, handlers=[])
    try:
        for tier, tier_slots in [*((s, num_slots + 24) for s in required), (spec, num_slots)]:
            ctx = TierContext(
                layout, tier_slots, device=device, config=config, options=dict(options or {})
            )
            contexts[tier.medium] = ctx
            storages[tier.medium] = tier.make_storage(ctx)
        view = _Storages(storages, spec.name)
        for tier in required:
            rig.required_handlers.extend(tier.make_handlers(view, contexts[tier.medium]))
        rig.handlers = list(spec.make_handlers(view, contexts[spec.medium]))
    except BaseException:
        rig.close()
        raise
    return rig


# -------------------------------------------------------------------------------------------
# byte access
# -------------------------------------------------------------------------------------------


def is_host_addressable(storage: Storage) -> bool:
    return isinstance(storage, DevicePool) or storage.host_view() is not None


def _pool_pieces(pool: DevicePool) -> list[Any]:
    """Each GPU tensor as ``[num_blocks, bytes]`` uint8; concatenated they are one block."""
    import torch

    return [t.view(torch.uint8).reshape(t.shape[0], -1) for t in pool.tensors]


def _read_direct(storage: Storage, ids: Sequence[int]) -> np.ndarray:
    if isinstance(storage, DevicePool):
        import torch

        pieces = _pool_pieces(storage)
        index = torch.as_tensor(list(ids), dtype=torch.long, device=pieces[0].device)
        return torch.cat([p[index] for p in pieces], dim=1).cpu().numpy()
    view = storage.host_view()
    assert view is not None
    return np.array(view[list(ids)], dtype=np.uint8, copy=True)


def _write_direct(storage: Storage, ids: Sequence[int], data: np.ndarray) -> None:
    if isinstance(storage, DevicePool):
        import torch

        offset = 0
        for piece in _pool_pieces(storage):
            width = piece.shape[1]
            index = torch.as_tensor(list(ids), dtype=torch.long, device=piece.device)
            chunk = torch.from_numpy(np.ascontiguousarray(data[:, offset : offset + width]))
            piece[index] = chunk.to(piece.device)
            offset += width
        return
    view = storage.host_view()
    assert view is not None
    view[list(ids)] = data


def route(rig: TierRig, medium: str, outward: bool) -> tuple[str, TransferHandler]:
    """A host-addressable medium with a handler from (``outward``) or to ``medium``."""
    for other, storage in rig.storages.items():
        if other == medium or not is_host_addressable(storage):
            continue
        handler = rig.handler(medium, other) if outward else rig.handler(other, medium)
        if handler is not None:
            return other, handler
    direction = "out of" if outward else "into"
    raise AssertionError(
        f"cannot {'read' if outward else 'write'} blocks of medium {medium!r}: its storage has "
        f"no host_view() and no handler moves blocks {direction} it from a host-addressable medium"
    )


def read_blocks(rig: TierRig, medium: str, ids: Sequence[int], scratch: SlotPicker) -> np.ndarray:
    """The bytes of ``ids`` of ``medium``, ``[len(ids), bytes_per_block]`` uint8."""
    storage = rig.storages[medium]
    if is_host_addressable(storage):
        return _read_direct(storage, ids)
    other, handler = route(rig, medium, outward=True)
    other_ids = scratch.take(other, len(ids))
    copy_blocks(rig, handler, ids, other_ids)
    return _read_direct(rig.storages[other], other_ids)


def write_blocks(
    rig: TierRig,
    medium: str,
    ids: Sequence[int],
    data: np.ndarray,
    hashes: Sequence[int],
    scratch: SlotPicker,
) -> None:
    storage = rig.storages[medium]
    if is_host_addressable(storage):
        _write_direct(storage, ids, data)
        rig.slot_hashes.setdefault(medium, {}).update(zip(ids, hashes, strict=True))
        return
    other, handler = route(rig, medium, outward=False)
    other_ids = scratch.take(other, len(ids))
    _write_direct(rig.storages[other], other_ids, data)
    rig.slot_hashes.setdefault(other, {}).update(zip(other_ids, hashes, strict=True))
    copy_blocks(rig, handler, other_ids, ids)


def copy_blocks(
    rig: TierRig, handler: TransferHandler, src_ids: Sequence[int], dst_ids: Sequence[int]
) -> None:
    """One job moving ``src_ids`` to ``dst_ids``; it must succeed."""
    jobs = [make_job(rig, handler.src_medium, handler.dst_medium, src_ids, dst_ids)]
    results = run_jobs(rig, handler, [jobs])
    result = results[jobs[0].job_id]
    assert result.ok, (
        f"{handler.src_medium} -> {handler.dst_medium} helper copy failed: {result.error}"
    )
    record_hashes(rig, jobs, results)


def make_job(
    rig: TierRig, src: str, dst: str, src_ids: Sequence[int], dst_ids: Sequence[int]
) -> TransferJob:
    """A job carrying the hash last written to each source slot (random where none was)."""
    known = rig.slot_hashes.get(src, {})
    hashes = tuple(known.get(i, hash((src, i, "unwritten")) & (2**64 - 1)) for i in src_ids)
    return TransferJob(next(_job_ids), src, dst, tuple(src_ids), tuple(dst_ids), hashes)


def record_hashes(
    rig: TierRig, jobs: Sequence[TransferJob], results: Mapping[int, JobResult]
) -> None:
    for job in jobs:
        if results[job.job_id].ok:
            rig.slot_hashes.setdefault(job.dst, {}).update(
                zip(job.dst_ids, job.block_hashes, strict=True)
            )


def run_jobs(
    rig: TierRig,
    handler: TransferHandler,
    batches: Sequence[Sequence[TransferJob]],
    timeout_s: float = 60.0,
) -> dict[int, JobResult]:
    """Submit every batch before the first poll, then poll until each job is reported once."""
    pair = f"{handler.src_medium} -> {handler.dst_medium}"
    expected = {job.job_id for batch in batches for job in batch}
    for batch in batches:
        handler.submit(list(batch), rig.ready_fence(handler.src_medium))
    results: dict[int, JobResult] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < len(expected):
        for result in handler.poll():
            assert result.job_id in expected, f"{pair}: poll() returned unknown job {result.job_id}"
            assert result.job_id not in results, (
                f"{pair}: poll() reported job {result.job_id} twice"
            )
            results[result.job_id] = result
        if len(results) < len(expected) and time.monotonic() > deadline:
            missing = sorted(expected - set(results))
            raise AssertionError(
                f"{pair}: {len(missing)} job(s) never reported within {timeout_s}s "
                f"(first: {missing[:5]}); num_pending={handler.num_pending}"
            )
        time.sleep(0.0005)
    assert handler.num_pending == 0, (
        f"{pair}: num_pending is {handler.num_pending} after every job was reported"
    )
    late = handler.poll()
    assert not late, (
        f"{pair}: poll() returned {len(late)} more result(s) after every job was reported"
    )
    return results


class SlotPicker:
    """Hands out distinct slots of each medium in a random order (so ids are non-adjacent)."""

    def __init__(self, rig: TierRig, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._free = {
            m: [int(i) for i in self._rng.permutation(s.num_slots)] for m, s in rig.storages.items()
        }

    def take(self, medium: str, count: int) -> list[int]:
        free = self._free[medium]
        assert len(free) >= count, f"test rig has too few {medium} slots for {count} more blocks"
        taken, self._free[medium] = free[:count], free[count:]
        return taken

    def random_bytes(self, num_blocks: int, bytes_per_block: int) -> np.ndarray:
        return self._rng.integers(0, 256, size=(num_blocks, bytes_per_block), dtype=np.uint8)

    def random_hashes(self, count: int) -> list[int]:
        return [int(h) for h in self._rng.integers(0, 2**63, size=count, dtype=np.int64)]


def split(ids: Sequence[int], sizes: Callable[[int], int]) -> list[list[int]]:
    """Cut ``ids`` into consecutive groups of ``sizes(i)`` for group ``i``."""
    groups: list[list[int]] = []
    start = 0
    for i in itertools.count():
        if start >= len(ids):
            return groups
        groups.append(list(ids[start : start + sizes(i)]))
        start += sizes(i)
    return groups
