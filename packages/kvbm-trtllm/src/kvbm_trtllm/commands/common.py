"""What the subcommands share: their errors, the kvbm config from the environment, tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvbm_core.config import ConfigError, KvbmConfig

__all__ = ["UsageError", "CommandError", "load_config", "format_table"]


class UsageError(ValueError):
    """A bad option or value: exit status 2."""


class CommandError(RuntimeError):
    """The command ran and found a problem: exit status 1."""


def load_config(overrides: Mapping[str, Any] | None = None) -> KvbmConfig:
    try:
        return KvbmConfig.from_env(overrides=overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(line) for row in cells for line in row[i].splitlines() or [""])
              for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        # The last column is left ragged: it holds free text.
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)) + "  " + row[-1])
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
