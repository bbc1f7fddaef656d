"""Tier options: the tuning knobs a tier declares, read once from the config for every process.

Any process (the leader sizes tiers with them, every worker builds storage with them).

- ``TierOption(name, default, parse)``: an option a :class:`~kvbm_core.plugins.TierSpec`
  declares. It is set as ``KVBM_<NAME>`` / ``DYN_KVBM_<NAME>`` in the environment, or under
  ``tier_options`` in the kvbm mapping (``llm_args.extra["kvbm"]``, YAML), which wins.
- ``read_tier_options(options, config, environ=None, given=None)``: every declared option,
  parsed by its ``parse(name as spelled, value)``: a bad value is a ``ConfigError`` naming the
  variable. Unset options get their default. The result is what ``TierContext.options``
  holds; a tier that reads its options again passes that as ``given``.
- ``positive_int``, ``positive_float``, ``flag``, ``auto_flag``, ``optional(parse)``: parsers
  with kvbm's bounds, for tiers to declare their options with.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvbm_core.config import ENV_PREFIXES, _parse_bool
from kvbm_core.errors import ConfigError

if TYPE_CHECKING:
    from kvbm_core.config import KvbmConfig

__all__ = [
    "TierOption",
    "read_tier_options",
    "positive_int",
    "positive_float",
    "flag",
    "auto_flag",
    "optional",
]

MAX_OPTION = 1_000_000  # threads, MiB, seconds: far above any machine, far below an overflow


@dataclass(frozen=True)
class TierOption:
    name: str
    default: Any
    parse: Callable[[str, Any], Any]


def read_tier_options(
    options: Sequence[TierOption],
    config: KvbmConfig | None,
    environ: Mapping[str, str] | None = None,
    given: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every declared option's value.

    Args:
        options: what the tier declares.
        config: its ``tier_options`` mapping wins over the environment; ``None``: no mapping.
        environ: the environment (``os.environ`` when ``None``).
        given: values that win over both (a ``TierContext.options``); a value already parsed
            (what this function returned) is kept as it is.

    Returns:
        ``{name: parsed value}``, the default for an unset option.
    """
    env = os.environ if environ is None else environ
    mapping = dict(config.tier_options) if config is not None else {}
    values = {}
    for option in options:
        if given is not None and option.name in given:
            values[option.name] = _reparse(option, given[option.name])
            continue
        spelled, value = _find(option.name, mapping, env)
        values[option.name] = option.default if spelled is None else option.parse(spelled, value)
    return values


def _reparse(option: TierOption, value: Any) -> Any:
    # A parsed value may be one no text parses to (None for "auto" / unset): keep those.
    return value if value is None or value == option.default else option.parse(option.name, value)


def _find(name: str, given: Mapping[str, Any], env: Mapping[str, str]) -> tuple[str | None, Any]:
    if name in given and given[name] is not None:
        return name, given[name]
    for prefix in ENV_PREFIXES:
        var = prefix + name.upper()
        if env.get(var, "").strip():
            return var, env[var]
    return None, None


def _number(name: str, value: Any, kind: type) -> Any:
    try:
        number = kind(str(value).strip()) if not isinstance(value, bool) else None
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or not 0 < number <= MAX_OPTION:
        raise ConfigError(
            f"{name}={value!r} is invalid: expected a {'whole ' if kind is int else ''}number "
            f"> 0 and <= {MAX_OPTION}"
        )
    return number


def positive_int(name: str, value: Any) -> int:
    return int(_number(name, value, int))


def positive_float(name: str, value: Any) -> float:
    return float(_number(name, value, float))


def flag(name: str, value: Any) -> bool:
    return _parse_bool(name, value)


def auto_flag(name: str, value: Any) -> bool | None:
    """``auto`` (``None``: the tier decides), or a flag."""
    if str(value).strip().lower() == "auto":
        return None
    try:
        return _parse_bool(name, value)
    except ConfigError:
        raise ConfigError(f"{name}={value!r} is invalid: expected auto, true or false") from None


def optional(parse: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """``parse``, with an empty value meaning unset (``None``)."""

    def parse_optional(name: str, value: Any) -> Any:
        return None if str(value).strip() == "" else parse(name, value)

    return parse_optional
