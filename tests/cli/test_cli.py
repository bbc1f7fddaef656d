"""The installed ``kvbm`` entry point and its top-level behaviour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_installed_entry_point_lists_every_command():
    script = Path(sys.executable).parent / "kvbm"
    if not script.exists():
        pytest.skip("the kvbm script is not installed next to this interpreter")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("bench", "doctor", "config", "plugins", "events"):
        assert command in done.stdout


def test_no_command_prints_help_and_exits_2(kvbm):
    result = kvbm()
    assert result.code == 2 and "bench" in result.out


def test_unknown_option_exits_2(kvbm):
    with pytest.raises(SystemExit) as info:
        kvbm("bench", "--no-such-option")
    assert info.value.code == 2
