"""A KVCacheManagerV2 ``KvCacheLayout`` as kvbm's GPU storage (a ``RegionPool``).

Runs in every worker process, inside ``register_kv_cache_layout``.

Operations:
- ``primary_group_index(layout) -> int``: the position (in ``layout.groups``, the order of
  TensorRT-LLM's by-layer-group lists [U]) of the first full-attention group; its pages are the
  block ids kvbm plans with. A layout with no full-attention group is refused with an error
  naming its groups and windows: every block of a prefix needs a page somewhere.
- ``region_pool(layout) -> RegionPool``: every region of every group as a page region of one
  tier slot, the primary group first, then the others in layout order; replicated regions are
  stored on every rank [U: storing them once per TP group would need a broadcast on load].
  A block is then ``sum(region sizes)`` bytes (``block_layout``).
- ``registration_ranges(layout) -> [(start, end)]``: the GPU address ranges one would register
  with a NIC: each region's span, split wherever a ``gpu_pool_mapping_bytes`` mapping ends
  (counted from the lowest region base of its group, since the reservation base itself is not
  in the layout [U]), so no range spans two ``cuMemCreate`` mappings. ``check_mapping(layout)``
  refuses a layout where a single slot region crosses a mapping boundary (no transfer buffer
  could hold it). kvbm's own tiers copy through the device and do not register GPU memory;
  the check keeps any range kvbm hands out valid for one that does.
"""

from __future__ import annotations

from typing import Any

from kvbm_core.regions import PageRegion, RegionPool, block_layout

__all__ = ["primary_group_index", "region_pool", "registration_ranges", "check_mapping"]


def primary_group_index(layout: Any) -> int:
    for index, group in enumerate(layout.groups):
        if group.window_size is None:
            return index
    described = ", ".join(f"group {g.layer_group_id} (window {g.window_size})" for g in layout.groups)
    raise NotImplementedError(
        f"kvbm needs a full-attention layer group to key blocks on, but every layer group of this "
        f"KV cache slides: {described}"
    )


def group_order(layout: Any) -> list[int]:
    """Positions in ``layout.groups``: the primary first, then the others in layout order."""
    primary = primary_group_index(layout)
    return [primary] + [i for i in range(len(layout.groups)) if i != primary]


def region_pool(layout: Any) -> RegionPool:
    check_mapping(layout)
    regions: list[PageRegion] = []
    num_pages: list[int] = []
    offset = 0
    device: Any = "cpu"
    for space, index in enumerate(group_order(layout)):
        group = layout.groups[index]
        all_regions = tuple(group.regions) + tuple(group.replicated_regions)
        if not all_regions:
            raise ValueError(f"layer group {group.layer_group_id} has no regions")
        slots = {r.num_slots for r in all_regions}
        if len(slots) != 1:
            raise ValueError(
                f"layer group {group.layer_group_id}: regions disagree on num_slots {sorted(slots)}"
            )
        num_pages.append(slots.pop())
        for region in all_regions:
            rows = region.as_tensor()
            device = rows.device
            regions.append(PageRegion(space, offset, int(region.size), rows))
            offset += int(region.size)
    return RegionPool(regions, block_layout(int(layout.tokens_per_block), offset), num_pages, device)


def _regions_by_group(layout: Any) -> list[list[Any]]:
    return [list(g.regions) + list(g.replicated_regions) for g in layout.groups]


def registration_ranges(layout: Any) -> list[tuple[int, int]]:
    mapping = layout.gpu_pool_mapping_bytes
    ranges = []
    for regions in _regions_by_group(layout):
        if not regions:
            continue
        origin = min(r.base for r in regions)
        for region in regions:
            start = region.base
            end = region.base + region.stride * (region.num_slots - 1) + region.size
            while mapping and (boundary := origin + ((start - origin) // mapping + 1) * mapping) < end:
                ranges.append((start, boundary))
                start = boundary
            ranges.append((start, end))
    return sorted(set(ranges))


def check_mapping(layout: Any) -> None:
    mapping = layout.gpu_pool_mapping_bytes
    if not mapping:
        return
    for group, regions in zip(layout.groups, _regions_by_group(layout), strict=True):
        if not regions:
            continue
        origin = min(r.base for r in regions)
        for region in regions:
            # With a stride that is a multiple of the mapping, every slot sits where slot 0 does.
            slots = range(region.num_slots) if region.stride % mapping else range(1)
            if any(
                (region.base + region.stride * i - origin) % mapping + region.size > mapping
                for i in slots
            ):
                raise ValueError(
                    f"layer group {group.layer_group_id}: a {region.size}-byte region slot crosses "
                    f"a {mapping}-byte GPU pool mapping boundary; no single registration can hold it"
                )
