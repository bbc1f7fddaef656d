"""kvbm-tiers-cpu."""
