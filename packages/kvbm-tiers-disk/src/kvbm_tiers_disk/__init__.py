"""kvbm-tiers-disk."""
