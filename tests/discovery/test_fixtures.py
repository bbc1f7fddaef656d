"""The service fixtures' own contract: a missing binary skips, or fails under CI's
KVBM_REQUIRE_SERVICES=1."""

from __future__ import annotations

import pytest


def test_missing_binary_skips_or_fails_when_required(require_binary_fn, monkeypatch) -> None:
    monkeypatch.delenv("KVBM_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="kvbm-no-such-server binary not found"):
        require_binary_fn("kvbm-no-such-server")
    monkeypatch.setenv("KVBM_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="KVBM_REQUIRE_SERVICES=1"):
        require_binary_fn("kvbm-no-such-server")
