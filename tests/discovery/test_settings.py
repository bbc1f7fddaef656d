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


def _secret_config(**values: object) -> KvbmConfig:
    return KvbmConfig.from_mapping({"discovery": "etcd", **values})


def test_control_secret_from_text_file_or_insecure_switch(tmp_path: Path) -> None:
    from kvbm_discovery.control_secret import control_secret

    assert control_secret(_secret_config(control_secret="a" * 32), "etcd") == b"a" * 32
    secret_file = tmp_path / "secret"
    secret_file.write_text("b" * 32 + "\n")
    secret_file.chmod(0o600)
    assert control_secret(_secret_config(control_secret_file=str(secret_file)), "etcd") == b"b" * 32
    assert control_secret(_secret_config(control_insecure=True), "etcd") is None
    env = {"DYN_KVBM_CONTROL_SECRET": "c" * 32}  # Dynamo's spelling works as for every setting
    assert control_secret(KvbmConfig.from_env(env), "etcd") == b"c" * 32


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "set KVBM_CONTROL_SECRET .* or KVBM_CONTROL_SECRET_FILE"),
        ({"control_secret": "short"}, "KVBM_CONTROL_SECRET holds 5 bytes"),
        ({"control_secret": "a" * 32, "control_secret_file": "x"}, "both set"),
        ({"control_secret_file": "missing"}, "cannot be read"),
    ],
)
def test_bad_control_secrets_are_config_errors(values, message, tmp_path: Path, monkeypatch) -> None:
    from kvbm_discovery.control_secret import control_secret

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        control_secret(_secret_config(**values), "etcd discovery")


def test_a_secret_file_others_can_read_or_another_user_owns_is_refused(tmp_path: Path) -> None:
    import os

    from kvbm_discovery.control_secret import control_secret

    secret_file = tmp_path / "secret"
    secret_file.write_text("d" * 32)
    secret_file.chmod(0o640)
    with pytest.raises(ConfigError, match=f"readable by group or others .*chmod 600 {secret_file}"):
        control_secret(_secret_config(control_secret_file=str(secret_file)), "etcd")
    secret_file.chmod(0o600)
    if os.getuid() != 0:
        pytest.skip("only root can give a file to another user")
    os.chown(secret_file, 12345, -1)
    with pytest.raises(ConfigError, match="belongs to uid 12345, not to this user .*chown"):
        control_secret(_secret_config(control_secret_file=str(secret_file)), "etcd")
