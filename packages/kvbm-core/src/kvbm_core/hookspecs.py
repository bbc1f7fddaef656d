"""Hook specifications for kvbm plugins (pluggy project name ``kvbm``).

A plugin is a module or object with ``@kvbm_core.hookimpl`` functions, published through an
entry point in group ``kvbm``. Built-in tiers and discovery backends use the same mechanism
as third-party ones; nothing in kvbm names a plugin it does not ship.

Which process calls which hook:
- ``kvbm_tier_specs``: the leader (to size and order tiers) and every worker (to build
  storage and handlers).
- ``kvbm_discovery_backends``: every process, once, when it connects to its peers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kvbm_core.plugins import DiscoveryBackendSpec, TierSpec

hookspec = pluggy.HookspecMarker("kvbm")
hookimpl = pluggy.HookimplMarker("kvbm")


# -------------------------------------------------------------------------------------------
# tier hooks
# -------------------------------------------------------------------------------------------


@hookspec
def kvbm_tier_specs() -> list[TierSpec]:
    """Return the tiers this plugin contributes.

    Each :class:`kvbm_core.plugins.TierSpec` names its tier and medium, its level (2 for host
    memory, 3 for local disk, 4 and up for shared storage), and factories for the storage of
    one rank and for the transfer handlers that move blocks in and out of it.

    :return: A list of tier specs (may be empty). Results of all plugins are concatenated; two
        tiers with the same name are an error that names both plugins.

    .. versionadded:: 0.1

    Use in plugins
    ~~~~~~~~~~~~~~
    Implement it in the module named by your ``[project.entry-points.kvbm]`` entry.
    """


# -------------------------------------------------------------------------------------------
# discovery hooks
# -------------------------------------------------------------------------------------------


@hookspec
def kvbm_discovery_backends() -> list[DiscoveryBackendSpec]:
    """Return the discovery backends this plugin contributes.

    Each :class:`kvbm_core.plugins.DiscoveryBackendSpec` has a ``name`` (the value of
    ``KVBM_DISCOVERY`` that selects it) and a factory taking the :class:`KvbmConfig`.

    :return: A list of backend specs (may be empty); names must be unique across plugins.

    .. versionadded:: 0.1
    """
