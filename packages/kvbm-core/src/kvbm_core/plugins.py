"""Finding plugins: entry points of group ``kvbm``, loaded through pluggy.

Operations (any process):
- ``get_plugin_manager(blocked=())``: a manager with the hookspecs added and every installed
  ``kvbm`` entry point registered under its entry-point name, except the blocked ones. An
  entry point that fails to load raises :class:`PluginLoadError` naming it and how to block it.
- ``shared_plugin_manager(blocked=())``: the process's one such manager per ``blocked`` set
  (the connector, leader and worker of a process share it; tests that register plugins into
  a manager use ``get_plugin_manager``). Built again when the installed entry points change.
- ``load_tier_specs(pm, required=())``: tier specs by name; a required tier that no plugin
  provides raises :class:`PluginNotFoundError` naming it (and, when plugins were blocked,
  saying that ``KVBM_DISABLED_PLUGINS`` disabled them rather than that they are missing).
- ``load_discovery_backend(pm, name)``: the backend spec called ``name``, or the same error.
- ``plugin_distributions(pm)``: which distribution and version each plugin came from.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from kvbm_core import hookspecs
from kvbm_core.tier_options import TierOption

if TYPE_CHECKING:
    from kvbm_core.admission import AdmissionPolicy
    from kvbm_core.config import KvbmConfig
    from kvbm_core.layout import KvLayout
    from kvbm_core.presence import PresenceSource
    from kvbm_core.transfer import Storage, TransferHandler

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginNotFoundError",
    "PluginLoadError",
    "TierContext",
    "TierSpec",
    "DiscoveryBackendSpec",
    "get_plugin_manager",
    "shared_plugin_manager",
    "load_tier_specs",
    "load_discovery_backend",
    "plugin_distributions",
]

ENTRY_POINT_GROUP = "kvbm"


class PluginNotFoundError(LookupError):
    pass


class PluginLoadError(ImportError):
    pass


@dataclass(frozen=True)
class TierContext:
    """What a tier's factories get: one rank's layout and slot count, and the config."""

    layout: KvLayout
    num_slots: int
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    config: KvbmConfig | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TierSpec:
    """A tier contributed by a plugin: both halves, the leader's and the worker's.

    ``name`` is the tier's key everywhere: the leader's index, jobs' ``src``/``dst``, the
    worker's storages and its handlers' media. ``medium`` must equal it (kept so plugins
    written for 0.1 still construct). ``level`` orders the tiers, top (nearest the GPU) first.

    The leader's half: ``num_slots(config, options, bytes_per_block)`` sizes the tier in blocks
    (0, or no ``num_slots``: the tier is off); ``stores_from`` names the tiers (or ``"gpu"``)
    whose blocks its handlers copy in, so the planner knows which copies it may plan (every
    tier loads into the GPU); ``make_admission(config)`` picks the blocks it takes from the
    tier above (``None``: the default); ``is_persistent`` trusts blocks its workers find from
    before a restart (``Storage.persisted_blocks``). ``make_presence(config, options,
    bytes_per_block, num_ranks)`` marks a tier shared with other engines (G4): its index on the
    leader is then a bounded presence cache, not an allocator (``num_slots`` sizes the cache;
    the store sizes and evicts itself), and the planner asks the returned
    :class:`~kvbm_core.presence.PresenceSource` which blocks the store holds before matching
    (``None``: the tier is off). ``options`` declares its tuning knobs:
    core reads and parses them once (:mod:`kvbm_core.tier_options`) into ``options`` here and
    into ``TierContext.options`` on every worker.

    The worker's half: ``make_storage(ctx)`` builds one rank's storage. ``make_handlers(storages,
    ctx)`` gets every storage of the worker by tier name (the GPU pool under ``"gpu"``) and
    returns the handlers for the pairs this tier moves (each pair is handled by exactly one
    tier). ``requires`` names the other tiers whose storages ``make_handlers`` needs (the disk
    tier's host<->disk handlers need ``"cpu"``); the GPU pool is always there.
    """

    name: str
    medium: str
    level: int
    make_storage: Callable[[TierContext], Storage]
    make_handlers: Callable[[Mapping[str, Storage], TierContext], list[TransferHandler]]
    description: str = ""
    requires: tuple[str, ...] = ()
    num_slots: Callable[[KvbmConfig, Mapping[str, Any], int], int] | None = None
    stores_from: tuple[str, ...] = ("gpu",)
    make_admission: Callable[[KvbmConfig], AdmissionPolicy] | None = None
    is_persistent: bool = False
    options: tuple[TierOption, ...] = ()
    make_presence: Callable[[KvbmConfig, Mapping[str, Any], int, int], PresenceSource | None] | None = None

    def __post_init__(self) -> None:
        if self.medium != self.name:
            raise ValueError(
                f"tier {self.name!r}: medium {self.medium!r} must equal the tier's name, which "
                "is its key in jobs, storages and handlers"
            )


@dataclass(frozen=True)
class DiscoveryBackendSpec:
    """A discovery backend contributed by a plugin (hook ``kvbm_discovery_backends``).

    Every kvbm process (the leader and each worker rank) picks the one ``KVBM_DISCOVERY`` names
    and calls ``make`` once at start.

    Args:
        name: the value of ``KVBM_DISCOVERY`` that selects it (``inproc``, ``etcd``, ...).
        make: ``make(config)`` returns the process's services: ``discovery``, ``control`` and
            ``make_event_sink``, as :class:`kvbm_runtime.services.RuntimeServices` names them,
            plus ``close()``; it raises ``ServiceUnavailableError`` / ``ConfigError`` naming what
            is missing. The built-in backends return a ``kvbm_discovery.DiscoveryServices``.
        description: one line for ``kvbm plugins``.
    """

    name: str
    make: Callable[[KvbmConfig], Any]
    description: str = ""


def get_plugin_manager(blocked: Iterable[str] = ()) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for name in blocked:
        pm.set_blocked(name)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _load_entry_point(pm, entry_point)
    return pm


_SHARED: dict[tuple[tuple[str, ...], tuple[str, ...]], pluggy.PluginManager] = {}


def shared_plugin_manager(blocked: Iterable[str] = ()) -> pluggy.PluginManager:
    installed = tuple(sorted(ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)))
    key = (tuple(sorted(blocked)), installed)
    if key not in _SHARED:
        _SHARED[key] = get_plugin_manager(blocked)
    return _SHARED[key]


def _load_entry_point(pm: pluggy.PluginManager, entry_point: importlib.metadata.EntryPoint) -> None:
    # pluggy would let the bare ImportError escape, naming a module but not the plugin to block.
    try:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=entry_point.name)
    except Exception as exc:
        dist = entry_point.dist.name if entry_point.dist else "unknown distribution"
        raise PluginLoadError(
            f"kvbm plugin {entry_point.name!r} ({entry_point.value}, from {dist}) failed to "
            f"load: {type(exc).__name__}: {exc}. Reinstall or fix that package, or block the "
            f"plugin with KVBM_DISABLED_PLUGINS={entry_point.name}"
        ) from exc


def _collect(pm: pluggy.PluginManager, hook_name: str) -> dict[str, tuple[str, Any]]:
    found: dict[str, tuple[str, Any]] = {}
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        for spec in impl.function() or []:
            plugin_name = impl.plugin_name
            if spec.name in found:
                raise ValueError(
                    f"{hook_name}: {spec.name!r} is provided by both plugin "
                    f"{found[spec.name][0]!r} and plugin {plugin_name!r}; block one (KVBM_DISABLED_PLUGINS)"
                )
            found[spec.name] = (plugin_name, spec)
    return found


def load_tier_specs(pm: pluggy.PluginManager, required: Iterable[str] = ()) -> dict[str, TierSpec]:
    specs = {name: spec for name, (_, spec) in _collect(pm, "kvbm_tier_specs").items()}
    missing = [name for name in required if name not in specs]
    blocked = _blocked_plugins(pm)
    disabled = [name for name in missing if name in blocked]
    if disabled:
        raise PluginNotFoundError(
            f"tier(s) {', '.join(map(repr, disabled))} configured, but plugin(s) of that name "
            "are installed and disabled by KVBM_DISABLED_PLUGINS; remove them from "
            "KVBM_DISABLED_PLUGINS or turn the tier off"
        )
    if missing:
        also = (
            f" KVBM_DISABLED_PLUGINS disables {', '.join(map(repr, blocked))}, which may provide it."
            if blocked
            else ""
        )
        raise PluginNotFoundError(
            f"tier plugin(s) {', '.join(map(repr, missing))} configured but not installed; "
            f"found: {sorted(specs) or 'none'}. Install the package that provides it "
            f"(e.g. kvbm-tiers-{missing[0]}) or remove it from the config.{also}"
        )
    return dict(sorted(specs.items(), key=lambda item: item[1].level))


def _blocked_plugins(pm: pluggy.PluginManager) -> list[str]:
    """Installed plugins that ``get_plugin_manager(blocked=...)`` kept out."""
    names = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(name for name in names if pm.is_blocked(name))


def load_discovery_backend(pm: pluggy.PluginManager, name: str) -> DiscoveryBackendSpec:
    specs = {n: spec for n, (_, spec) in _collect(pm, "kvbm_discovery_backends").items()}
    if name not in specs:
        raise PluginNotFoundError(
            f"discovery backend {name!r} (KVBM_DISCOVERY) is not installed; found: "
            f"{sorted(specs) or 'none'}. Install kvbm-discovery or pick one of those."
        )
    return specs[name]


def plugin_distributions(pm: pluggy.PluginManager) -> list[tuple[str, str, str]]:
    """``(plugin name, distribution, version)`` for every plugin loaded from an entry point."""
    rows = []
    for plugin, dist in pm.list_plugin_distinfo():
        rows.append((pm.get_name(plugin) or "?", dist.metadata["name"], dist.version))
    return sorted(rows)
