"""kvbm-discovery."""
