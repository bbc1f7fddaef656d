"""kvbm_core, and its test kit, import no torch at import time (layers point down)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "statement",
    [
        "import kvbm_core",
        "import kvbm_core.testing",
        "from kvbm_core.testing import TierConformance",
        "import kvbm_core, kvbm_core.config, kvbm_core.events, kvbm_core.hashing, kvbm_core.layout, "
        "kvbm_core.metrics, kvbm_core.plugins, kvbm_core.transfer",
    ],
)
def test_no_torch_at_import(statement: str) -> None:
    code = f"{statement}; import sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_no_sibling_package_at_import() -> None:
    code = (
        "import kvbm_core, kvbm_core.testing, sys; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('kvbm_tiers_cpu', 'kvbm_tiers_disk', 'kvbm_discovery', 'kvbm_trtllm', 'tensorrt_llm')]; "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
