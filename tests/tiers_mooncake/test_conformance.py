"""The mooncake tier passes the tier conformance kit against a real store on loopback."""

from __future__ import annotations

import pytest

from kvbm_core.testing import TierConformance


class TestMooncakeTier(TierConformance):
    tier_name = "mooncake"

    @pytest.fixture(autouse=True)
    def _store_options(self, shared_store, request):
        # Every test gets its own namespace: blocks of one test never serve another's.
        options = {**shared_store.options, "mooncake_namespace": f"conf{id(request.node)}"}
        self.tier_options = options
