"""The Mooncake Store tier (G4) as a kvbm plugin: entry point ``mooncake`` in group ``kvbm``.

Light at import (no torch, no mooncake): the leader needs only the spec.

The leader's half: the tier is on when the tier option ``mooncake_master`` (host:port, also
``KVBM_MOONCAKE_MASTER``) is set and the master answers at start; a master that is down then
turns the tier off with one warning (or, with ``mooncake_required``, fails the start with the
reason). Its index is a presence cache of ``mooncake_num_blocks`` entries
(:mod:`kvbm_core.presence`): the store owns sizing and eviction. It takes blocks from the host
tier (chained behind their GPU -> host store) or from the GPU when there is no host tier;
``mooncake_admission`` picks which: ``write_through`` (every block, default) or ``hot``
(blocks sighted twice, as the disk filter). ``make_presence`` gives the planner batched
existence queries bounded by ``mooncake_query_timeout_ms`` with a negative cache of
``mooncake_negative_ttl_ms``.

The worker's half: ``make_storage`` connects the rank's client (``mooncake_segment_mib`` is the
memory it contributes to the store, default 0: the store's memory comes from dedicated store
nodes); ``make_handlers`` returns gpu -> mooncake, mooncake -> gpu and, with a host tier,
cpu -> mooncake.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kvbm_core
from kvbm_core.admission import AdmissionPolicy, AlwaysAdmit, FrequencyFilter
from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_core.plugins import TierContext, TierSpec
from kvbm_core.tier_options import TierOption, flag, optional, positive_float, positive_int
from kvbm_core.transfer import CPU, GPU, DevicePool, Storage, TransferHandler

__all__ = ["kvbm_tier_specs", "OPTIONS", "TIER_NAME"]

log = logging.getLogger(__name__)

TIER_NAME = "mooncake"
ADMISSIONS = ("write_through", "hot")


def _text(name: str, value: Any) -> str:
    return str(value).strip()


def _choice(name: str, value: Any) -> str:
    choice = str(value).strip().lower()
    if choice not in ADMISSIONS:
        raise ConfigError(f"{name}={value!r} is invalid: expected one of {', '.join(ADMISSIONS)}")
    return choice


def _non_negative_int(name: str, value: Any) -> int:
    return 0 if str(value).strip() == "0" else positive_int(name, value)


OPTIONS = (
    TierOption("mooncake_master", None, optional(_text)),
    TierOption("mooncake_metadata_server", None, optional(_text)),
    TierOption("mooncake_protocol", "tcp", _text),
    TierOption("mooncake_device_name", "", _text),
    TierOption("mooncake_local_hostname", None, optional(_text)),
    TierOption("mooncake_namespace", "kvbm", _text),
    TierOption("mooncake_segment_mib", 0, _non_negative_int),
    TierOption("mooncake_buffer_mib", 64, positive_int),
    TierOption("mooncake_num_blocks", 1_000_000, positive_int),
    TierOption("mooncake_batch_blocks", 32, positive_int),
    TierOption("mooncake_admission", "write_through", _choice),
    TierOption("mooncake_query_timeout_ms", 50.0, positive_float),
    TierOption("mooncake_negative_ttl_ms", 500.0, positive_float),
    TierOption("mooncake_required", False, flag),
)


def _settings(options: Mapping[str, Any]) -> Any:
    from kvbm_tiers_mooncake.client import StoreSettings

    return StoreSettings.from_options(options)


def _keys(
    config: KvbmConfig, options: Mapping[str, Any], bytes_per_rank: int, world_size: int
) -> Any:
    from kvbm_tiers_mooncake.keys import KeyScheme

    return KeyScheme(
        str(options.get("mooncake_namespace") or "kvbm"),
        config.model_id,
        bytes_per_rank,
        world_size,
    )


def num_slots(config: KvbmConfig, options: Mapping[str, Any], bytes_per_block: int) -> int:
    if not options.get("mooncake_master"):
        return 0
    from kvbm_tiers_mooncake.client import probe

    why = probe(_settings(options))
    if why is None:
        return int(options["mooncake_num_blocks"])
    if options.get("mooncake_required"):
        raise ConfigError(f"mooncake_required is set but {why}; start mooncake_master or unset it")
    log.warning("kvbm mooncake tier off: %s (set mooncake_required to fail instead)", why)
    return 0


def make_presence(
    config: KvbmConfig, options: Mapping[str, Any], bytes_per_block: int, num_ranks: int
) -> Any:
    from kvbm_tiers_mooncake.presence import MooncakePresence

    return MooncakePresence(
        _settings(options),
        _keys(config, options, bytes_per_block // max(num_ranks, 1), num_ranks),
        timeout_s=float(options["mooncake_query_timeout_ms"]) / 1000,
        negative_ttl_s=float(options["mooncake_negative_ttl_ms"]) / 1000,
    )


def make_admission(config: KvbmConfig) -> AdmissionPolicy:
    from kvbm_core.tier_options import read_tier_options

    admission = read_tier_options(OPTIONS, config)["mooncake_admission"]
    return FrequencyFilter() if admission == "hot" else AlwaysAdmit()


def make_storage(ctx: TierContext) -> Storage:
    from kvbm_tiers_mooncake.storage import MooncakeStorage
    from kvbm_tiers_mooncake.value_format import layout_fingerprint

    if not ctx.options.get("mooncake_master"):
        raise ConfigError("the mooncake tier needs mooncake_master (host:port of mooncake_master)")
    config = ctx.config or KvbmConfig()
    return MooncakeStorage(
        ctx.layout,
        ctx.num_slots,
        _settings(ctx.options),
        _keys(config, ctx.options, ctx.layout.bytes_per_block, ctx.world_size),
        ctx.rank,
        layout_fingerprint(ctx.layout, ctx.rank, ctx.world_size, config.model_id),
        segment_bytes=int(ctx.options.get("mooncake_segment_mib", 0)) << 20,
    )


def make_handlers(storages: Mapping[str, Storage], ctx: TierContext) -> list[TransferHandler]:
    from kvbm_tiers_mooncake.blocks import HostBlocks, PoolBlocks
    from kvbm_tiers_mooncake.handlers import MooncakeHandler
    from kvbm_tiers_mooncake.storage import MooncakeStorage

    store = storages[TIER_NAME]
    if not isinstance(store, MooncakeStorage):
        raise TypeError(
            f"the mooncake tier's handlers need a MooncakeStorage, got {type(store).__name__}"
        )
    batch = int(ctx.options.get("mooncake_batch_blocks", 32))
    handlers: list[TransferHandler] = []
    pool = storages.get(GPU)
    if pool is not None:
        if not isinstance(pool, DevicePool):
            raise TypeError(f"the gpu storage must be a DevicePool, got {type(pool).__name__}")
        blocks = PoolBlocks(pool)
        handlers += [
            MooncakeHandler(store, blocks, is_store=True, batch_blocks=batch),
            MooncakeHandler(store, blocks, is_store=False, batch_blocks=batch),
        ]
    host = storages.get(CPU)
    rows = host.host_view() if host is not None else None
    if rows is not None:
        handlers.append(
            MooncakeHandler(store, HostBlocks(rows), is_store=True, medium=CPU, batch_blocks=batch)
        )
    return handlers


@kvbm_core.hookimpl
def kvbm_tier_specs() -> list[TierSpec]:
    return [
        TierSpec(
            name=TIER_NAME,
            medium=TIER_NAME,
            level=5,
            make_storage=make_storage,
            make_handlers=make_handlers,
            description="G4: KV blocks shared across engine instances through Mooncake Store",
            num_slots=num_slots,
            stores_from=(CPU, GPU),
            make_admission=make_admission,
            options=OPTIONS,
            make_presence=make_presence,
        )
    ]
