"""NIXL's INFO lines (an agent created, a backend instantiated) stay out of kvbm's output
unless the user asks for them with NIXL_LOG_LEVEL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvbm_tiers_disk.nixl_io import load_nixl

pytestmark = pytest.mark.skipif(load_nixl() is None, reason="no NIXL wheel installed")

_OPEN_AGENT = """
import os, sys
from kvbm_tiers_disk.buffers import aligned_array
from kvbm_tiers_disk.nixl_io import NixlFileIo
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 1 << 20)
NixlFileIo("quiet", fd, 1 << 20, aligned_array(1 << 16)).close()
print("agent ok")
"""


def _run(tmp_path: Path, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "NIXL_LOG_LEVEL"} | env
    done = subprocess.run(
        [sys.executable, "-c", _OPEN_AGENT, str(tmp_path / "slots")],
        capture_output=True, text=True, timeout=120, env=environ,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_nixl_info_lines_are_off_by_default(tmp_path: Path) -> None:
    out = _run(tmp_path)
    assert "agent ok" in out
    assert "NIXL INFO" not in out and "was instantiated" not in out


def test_a_users_nixl_log_level_is_kept(tmp_path: Path) -> None:
    out = _run(tmp_path, NIXL_LOG_LEVEL="INFO")
    assert "NIXL INFO" in out and "was instantiated" in out
