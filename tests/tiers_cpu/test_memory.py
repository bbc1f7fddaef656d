"""The cpu tier checks its size against the host's available memory before mapping any."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvbm_core.config import ConfigError
from kvbm_core.layout import KvLayout
from kvbm_tiers_cpu import PinnedHostStorage, memory
from kvbm_tiers_cpu.memory import available_memory_bytes

LAYOUT = KvLayout(num_layers=2, tokens_per_block=16, num_kv_heads=2, head_dim=64, dtype="float16")


def test_a_tier_larger_than_available_memory_is_refused_before_mapping() -> None:
    available = available_memory_bytes()
    assert available is not None and available > 0
    num_slots = available // LAYOUT.bytes_per_block + 1_000_000  # ~16 GB more than there is
    with pytest.raises(ConfigError) as caught:
        PinnedHostStorage(LAYOUT, num_slots, pin=False)
    message = str(caught.value)
    assert message.startswith("KVBM_CPU_CACHE_GB: the cpu tier needs")
    assert "GB is available; lower KVBM_CPU_CACHE_GB" in message
    storage = PinnedHostStorage(LAYOUT, 4, pin=False)  # a tier that fits still works
    storage.host_view()[:] = 1
    assert storage.host_view().sum() == 4 * LAYOUT.bytes_per_block
    storage.close()


def test_the_error_names_the_available_amount(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fakes only the reading of available memory (a meminfo file saying 1 GB)."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 2000000 kB\nMemAvailable: 976562 kB\n")
    monkeypatch.setattr(memory, "_MEMINFO", meminfo)
    assert available_memory_bytes() == 976562 * 1024
    with pytest.raises(ConfigError, match=r"needs 1\.64 GB of host memory on rank 3 but 1\.00 GB"):
        PinnedHostStorage(LAYOUT, 100_000, pin=False, rank=3)
