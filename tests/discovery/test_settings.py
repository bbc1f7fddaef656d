"""Bad discovery settings fail at once with errors naming the variable and the fix; no
server is contacted for any of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_discovery.nats_conn import NatsConnection
from kvbm_discovery.services import lease_ttl_from_env


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "KVBM_NATS_URL is not set"),
        ({"nats_url": "127.0.0.1:4222"}, "KVBM_NATS_URL='127.0.0.1:4222' is invalid"),
        ({"nats_url": "nats://127.0.0.1:1", "nats_creds": "missing.creds"}, "KVBM_NATS_CREDS='missing.creds'"),
        ({"nats_url": "tls://127.0.0.1:1", "nats_tls_ca": "missing.pem"}, "KVBM_NATS_TLS_CA='missing.pem'"),
    ],
)
def test_bad_nats_settings(settings: dict[str, str], message: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        NatsConnection(KvbmConfig.from_mapping(settings), "test")


def test_lease_ttl_from_env() -> None:
    assert lease_ttl_from_env({}) == 10
    assert lease_ttl_from_env({"KVBM_ETCD_LEASE_TTL_SECS": "3"}) == 3
    for bad in ("1", "x", "2.5"):
        with pytest.raises(ConfigError, match=f"KVBM_ETCD_LEASE_TTL_SECS='{bad}' is invalid"):
            lease_ttl_from_env({"KVBM_ETCD_LEASE_TTL_SECS": bad})
