"""``kvbm plugins``: the tier and discovery plugins installed, with their distributions.

``list_plugins(blocked=()) -> list[PluginRow]``: one row per tier or discovery backend, with
the plugin (entry-point name) that provides it and that plugin's distribution and version.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import cast

from kvbm_core.plugins import (
    DiscoveryBackendSpec,
    PluginLoadError,
    TierSpec,
    load_discovery_backend,
    load_tier_specs,
    plugin_distributions,
    shared_plugin_manager,
)
from kvbm_trtllm.commands.common import CommandError, format_table, load_config

__all__ = ["PluginRow", "list_plugins", "add_parser", "run"]


@dataclass(frozen=True)
class PluginRow:
    kind: str  # "tier" or "discovery"
    name: str
    plugin: str
    distribution: str
    version: str
    description: str
    level: int | None = None
    medium: str | None = None


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plugins", help="list the tier and discovery plugins found (entry-point group 'kvbm')",
        description="List the tier and discovery plugins found through entry points of group "
        "'kvbm', with the distribution and version each came from. KVBM_DISABLED_PLUGINS blocks some.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


def list_plugins(blocked: tuple[str, ...] = ()) -> list[PluginRow]:
    pm = shared_plugin_manager(blocked)
    dists = {name: (dist, version) for name, dist, version in plugin_distributions(pm)}
    rows = []
    for kind, hook in (("tier", pm.hook.kvbm_tier_specs), ("discovery", pm.hook.kvbm_discovery_backends)):
        for impl in hook.get_hookimpls():
            dist, version = dists.get(impl.plugin_name, ("(registered in-process)", ""))
            # pluggy types a hook implementation as returning ``object``; the hookspecs
            # (kvbm_core.hookspecs) say what these two return.
            specs = cast("Iterable[TierSpec | DiscoveryBackendSpec] | None", impl.function())
            for spec in specs or []:
                rows.append(PluginRow(
                    kind, spec.name, impl.plugin_name, dist, version, spec.description,
                    getattr(spec, "level", None), getattr(spec, "medium", None),
                ))
    return sorted(rows, key=lambda r: (r.kind != "tier", r.level or 0, r.name))


def _validate(blocked: tuple[str, ...], rows: list[PluginRow]) -> None:
    # The same lookups the engine does, so a clash between two plugins shows up here too.
    pm = shared_plugin_manager(blocked)
    load_tier_specs(pm)
    for row in rows:
        if row.kind == "discovery":
            load_discovery_backend(pm, row.name)


def run(args: argparse.Namespace) -> int:
    config = load_config()
    try:
        rows = list_plugins(config.disabled_plugins)
        _validate(config.disabled_plugins, rows)
    except (PluginLoadError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    table = [
        (r.kind, r.name, "" if r.level is None else f"G{r.level}", r.plugin,
         f"{r.distribution} {r.version}".strip(), r.description)
        for r in rows
    ]
    print(format_table(("kind", "name", "level", "plugin", "distribution", "description"), table))
    if config.disabled_plugins:
        print(f"\nblocked (KVBM_DISABLED_PLUGINS): {', '.join(config.disabled_plugins)}")
    return 0
