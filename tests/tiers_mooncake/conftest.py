"""A real Mooncake Store (``mooncake_master`` + one store node) on loopback for these tests.

Started and stopped by the fixtures on free ports. Where the wheel is absent the tests skip
locally, and fail under CI (``CI=1`` or ``KVBM_REQUIRE_SERVICES=1``): CI must run them.
"""

from __future__ import annotations

import os
from importlib.util import find_spec

import pytest

from kvbm_tiers_mooncake.local_store import LocalMooncake, find_binary


def _require_store() -> None:
    missing = [b for b in ("mooncake_master", "mooncake_client") if find_binary(b) is None]
    if find_spec("mooncake") is None:
        missing.append("the mooncake module")
    if not missing:
        return
    why = f"Mooncake Store not installed ({', '.join(missing)}): pip install mooncake-transfer-engine-non-cuda"
    if os.environ.get("CI") or os.environ.get("KVBM_REQUIRE_SERVICES") == "1":
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One store for a module's tests that do not stop it."""
    _require_store()
    store = LocalMooncake(log_dir=tmp_path_factory.mktemp("mooncake")).start()
    yield store
    store.stop()


@pytest.fixture
def store(tmp_path):
    """A store of one's own, for tests that stop, restart or corrupt it."""
    _require_store()
    store = LocalMooncake(log_dir=tmp_path).start()
    yield store
    store.stop()
