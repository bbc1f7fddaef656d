"""A real Mooncake Store (``mooncake_master`` + one store node) on loopback for these tests.

Started and stopped by the fixtures on free ports. Where the wheel is absent the tests skip
locally, and fail under CI (``CI=1`` or ``KVBM_REQUIRE_SERVICES=1``): CI must run them.
"""

from __future__ import annotations

import os

import pytest

from kvbm_tiers_mooncake.local_store import LocalMooncake, unavailable_reason


def require_store() -> None:
    why = unavailable_reason()
    if why is None:
        return
    if os.environ.get("CI") or os.environ.get("KVBM_REQUIRE_SERVICES") == "1":
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One store for a module's tests that do not stop it."""
    require_store()
    store = LocalMooncake(log_dir=tmp_path_factory.mktemp("mooncake")).start()
    yield store
    store.stop()


@pytest.fixture
def store(tmp_path):
    """A store of one's own, for tests that stop, restart or corrupt it."""
    require_store()
    store = LocalMooncake(log_dir=tmp_path).start()
    yield store
    store.stop()
