"""KvbmConfig tells the truth about what it will not do: near-miss names warn with the closest
known name, every number is bounded, and a tier smaller than one block is an error."""

from __future__ import annotations

import logging

import pytest

from kvbm_core import config as config_module
from kvbm_core.config import MAX_CACHE_GB, ConfigError, KvbmConfig, unknown_setting_names


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "_WARNED", set())


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("KVBM_CPU_CACHE_GIB", "KVBM_CPU_CACHE_GB"),
        ("kvbm_cpu_cache_gb", "KVBM_CPU_CACHE_GB"),
        ("DYN_KVBM_CPU_CACHE_OVERRIDE_BLOCKS", "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"),
        ("KVBM_METRIC_PORT", "KVBM_METRICS_PORT"),
    ],
)
def test_a_near_miss_name_warns_once_with_the_closest_name(
    name: str, suggestion: str, caplog: pytest.LogCaptureFixture, fresh_warnings: None
) -> None:
    env = {name: "4"}
    with caplog.at_level(logging.WARNING, logger="kvbm.config"):
        config = KvbmConfig.from_env(env)
        KvbmConfig.from_env(env)
    assert not config.cpu_enabled  # ignored, as the warning says
    warnings = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert warnings == [f"kvbm: {name} is not a kvbm setting and is ignored; did you mean {suggestion}?"]


def test_known_names_and_other_variables_draw_no_warning() -> None:
    env = {
        "KVBM_CPU_CACHE_GB": "1",
        "DYN_KVBM_DISK_BACKEND": "threads",  # read by the disk tier
        "KVBM_CPU_PIN_THREADS": "4",  # read by the cpu tier
        "KVBM_REQUIRE_SERVICES": "1",  # read by the test suite
        "PATH": "/bin",
    }
    assert unknown_setting_names(env) == []


def test_a_far_miss_has_no_suggestion() -> None:
    assert unknown_setting_names({"KVBM_ZZZZZZZZZZZZ": "1"}) == [("KVBM_ZZZZZZZZZZZZ", None)]


def test_an_unknown_mapping_key_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'cpu_cache_gb'\?"):
        KvbmConfig.from_mapping({"cpu_cache_gib": 4})


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("CPU_CACHE_GB", "1e30", "<= 1000000 (1 PB)"),
        ("DISK_CACHE_GB", "2e6", "<= 1000000 (1 PB)"),
        ("CPU_CACHE_OVERRIDE_NUM_BLOCKS", "1" + "0" * 30, f"<= {1 << 40}"),
        ("LEADER_WORKER_INIT_TIMEOUT_SECS", "inf", "<= 604800 (7 days)"),
        ("LEADER_WORKER_INIT_TIMEOUT_SECS", "1e300", "<= 604800 (7 days)"),
        ("NAMESPACE", "a.b c", "letters, digits, '_' or '-'"),
        ("ETCD_ENDPOINTS", ",,,", "host:port"),
        ("METRICS_HOST", "not a host!", "an address to listen on"),
    ],
)
def test_every_number_and_name_is_bounded(name: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as caught:
        KvbmConfig.from_env({"KVBM_" + name: value})
    message = str(caught.value)
    assert message.startswith(f"KVBM_{name}={value!r} is invalid: expected ")
    assert accepted in message


def test_metrics_host_defaults_to_every_interface_and_can_be_loopback() -> None:
    assert KvbmConfig().metrics_host == "0.0.0.0"
    assert KvbmConfig.from_env({"KVBM_METRICS_HOST": "127.0.0.1"}).metrics_host == "127.0.0.1"
    assert KvbmConfig.from_env({"DYN_KVBM_METRICS_HOST": "::1"}).metrics_host == "::1"


def test_a_tier_smaller_than_one_block_is_an_error_naming_the_minimum() -> None:
    config = KvbmConfig.from_env({"KVBM_CPU_CACHE_GB": "0.000001", "KVBM_DISK_CACHE_GB": "0.0000001"})
    with pytest.raises(ConfigError) as caught:
        config.num_cpu_blocks(2_000_000)
    assert str(caught.value).startswith("KVBM_CPU_CACHE_GB=1e-06 is smaller than one block (2000000 bytes")
    assert "at least 0.002" in str(caught.value)
    with pytest.raises(ConfigError, match=r"^KVBM_DISK_CACHE_GB=1e-07 is smaller than one block"):
        config.num_disk_blocks(2_000_000)
    assert config.num_cpu_blocks(1000) == 1  # one block is enough


def test_an_override_above_the_bound_in_bytes_is_an_error() -> None:
    config = KvbmConfig.from_env(
        {"KVBM_CPU_CACHE_GB": "1", "KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": str(6_000_000_000)}
    )
    with pytest.raises(ConfigError, match=r"^KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS=6000000000 is 12 PB"):
        config.num_disk_blocks(2_000_000)
    assert config.num_disk_blocks(int(MAX_CACHE_GB * 1e9) // 6_000_000_000) == 6_000_000_000
