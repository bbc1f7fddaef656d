"""kvbm_core's error types (in their own module so that every other module can import them)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A setting, or what it points at, is unusable; the message names it and the fix."""
