"""KvbmConfig: both variable spellings, sizes, and an actionable error for every bad value."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kvbm_core.config import ConfigError, KvbmConfig


def test_defaults_have_no_tiers() -> None:
    config = KvbmConfig.from_env({})
    assert config == KvbmConfig()
    assert not config.cpu_enabled and not config.disk_enabled
    assert config.discovery == "inproc" and config.metrics_port == 6880


@pytest.mark.parametrize("prefix", ["KVBM_", "DYN_KVBM_"])
def test_both_spellings_are_read(prefix: str) -> None:
    env = {
        f"{prefix}CPU_CACHE_GB": "4",
        f"{prefix}DISK_CACHE_GB": "0.5",
        f"{prefix}DISK_CACHE_DIR": "/somewhere/kv",
        f"{prefix}METRICS": "true",
        f"{prefix}METRICS_PORT": "9100",
        f"{prefix}LEADER_WORKER_INIT_TIMEOUT_SECS": "60",
        f"{prefix}DISABLE_DISK_OFFLOAD_FILTER": "1",
        f"{prefix}ETCD_ENDPOINTS": "a:2379, b:2379",
    }
    config = KvbmConfig.from_env(env)
    assert config.cpu_cache_gb == 4.0 and config.disk_cache_gb == 0.5
    assert config.disk_cache_dir == "/somewhere/kv"
    assert config.metrics is True and config.metrics_port == 9100
    assert config.leader_worker_init_timeout_secs == 60.0
    assert config.disable_disk_offload_filter is True
    assert config.etcd_endpoints == ("a:2379", "b:2379")


def test_kvbm_spelling_wins_over_dynamos() -> None:
    env = {"KVBM_CPU_CACHE_GB": "2", "DYN_KVBM_CPU_CACHE_GB": "8", "DYN_KVBM_METRICS_PORT": "7000"}
    config = KvbmConfig.from_env(env)
    assert config.cpu_cache_gb == 2.0 and config.metrics_port == 7000


def test_a_blank_variable_counts_as_unset() -> None:
    config = KvbmConfig.from_env({"KVBM_CPU_CACHE_GB": "  ", "DYN_KVBM_CPU_CACHE_GB": "3"})
    assert config.cpu_cache_gb == 3.0


def test_overrides_win_over_the_environment() -> None:
    config = KvbmConfig.from_env({"KVBM_CPU_CACHE_GB": "bad"}, overrides={"cpu_cache_gb": 1})
    assert config.cpu_cache_gb == 1.0


def test_os_environ_is_the_default_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "77")
    assert KvbmConfig.from_env().num_cpu_blocks(1 << 20) == 77


def test_blocks_from_gb_and_from_overrides() -> None:
    config = KvbmConfig.from_env({"KVBM_CPU_CACHE_GB": "1", "KVBM_DISK_CACHE_GB": "2"})
    assert config.num_cpu_blocks(4_000_000) == 250
    assert config.num_disk_blocks(4_000_000) == 500
    config = config.replace(cpu_cache_override_num_blocks=12, disk_cache_override_num_blocks=30)
    assert config.num_cpu_blocks(4_000_000) == 12 and config.num_disk_blocks(4_000_000) == 30


def test_an_override_alone_enables_a_tier() -> None:
    config = KvbmConfig.from_env({"KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "100"})
    assert config.cpu_enabled and config.num_cpu_blocks(1) == 100


def test_an_override_of_zero_turns_the_tier_off() -> None:
    config = KvbmConfig(cpu_cache_gb=4, cpu_cache_override_num_blocks=0)
    assert config.num_cpu_blocks(1024) == 0
    assert not config.cpu_enabled


def test_mapping_keys_in_every_spelling() -> None:
    expected = KvbmConfig(
        cpu_cache_gb=1.5,
        metrics=True,
        disk_cache_override_num_blocks=4,
        cpu_cache_override_num_blocks=8,
    )
    config = KvbmConfig.from_mapping(
        {
            "cpu_cache_gb": "1.5",
            "METRICS": True,
            "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": 4,
            "KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "8",
            "nats_url": None,
        }
    )
    assert config == expected


def test_unknown_setting_lists_the_known_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown kvbm setting 'cpu_cache_size'; known settings: .*cpu_cache_gb"
    ):
        KvbmConfig.from_mapping({"cpu_cache_size": 4})


BAD_VALUES = [
    ("CPU_CACHE_GB", "four", "a number of GB >= 0"),
    ("CPU_CACHE_GB", "-1", "a number of GB >= 0"),
    ("DISK_CACHE_GB", "nan", "a number of GB >= 0"),
    ("DISK_CACHE_GB", "inf", "a number of GB >= 0"),
    ("CPU_CACHE_OVERRIDE_NUM_BLOCKS", "1.5", "a whole number >= 0"),
    ("DISK_CACHE_OVERRIDE_NUM_BLOCKS", "-3", "a whole number >= 0"),
    ("LEADER_WORKER_INIT_TIMEOUT_SECS", "0", "a number of seconds > 0"),
    ("LEADER_WORKER_INIT_TIMEOUT_SECS", "soon", "a number of seconds > 0"),
    ("METRICS", "maybe", "true/false"),
    ("DISABLE_DISK_OFFLOAD_FILTER", "2", "true/false"),
    ("METRICS_PORT", "0", "a whole number >= 1"),
    ("METRICS_PORT", "70000", "a TCP port 1..65535"),
    ("DISCOVERY", "et cd!", "a discovery backend name"),
]


@pytest.mark.parametrize("prefix", ["KVBM_", "DYN_KVBM_"])
@pytest.mark.parametrize(("name", "value", "accepted"), BAD_VALUES)
def test_bad_value_names_variable_value_and_what_is_accepted(
    prefix: str, name: str, value: str, accepted: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        KvbmConfig.from_env({prefix + name: value})
    message = str(caught.value)
    assert message.startswith(f"{prefix}{name}={value!r} is invalid: expected ")
    assert accepted in message


def test_bad_mapping_value_names_the_key_as_written() -> None:
    with pytest.raises(
        ConfigError, match=r"^cpu_cache_gb='lots' is invalid: expected a number of GB"
    ):
        KvbmConfig.from_mapping({"cpu_cache_gb": "lots"})


@pytest.mark.parametrize(
    "env",
    [
        {"KVBM_DISK_CACHE_GB": "10"},
        {"DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "100"},
        {"KVBM_DISK_CACHE_GB": "10", "KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "0"},
    ],
)
def test_disk_without_cpu_tier_is_an_error_that_says_so(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="a disk tier needs a CPU tier.*KVBM_CPU_CACHE_GB"):
        KvbmConfig.from_env(env)


def test_disk_with_cpu_tier_is_fine() -> None:
    config = KvbmConfig.from_env({"KVBM_DISK_CACHE_GB": "10", "DYN_KVBM_CPU_CACHE_GB": "1"})
    assert config.cpu_enabled and config.disk_enabled


def test_replace_validates_again() -> None:
    with pytest.raises(ConfigError, match="disk tier needs a CPU tier"):
        KvbmConfig().replace(disk_cache_gb=1)


def test_check_disk_dir_creates_a_private_directory(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    assert KvbmConfig(disk_cache_dir=str(target)).check_disk_dir() == target
    assert target.is_dir()
    assert stat.S_IMODE(os.stat(target).st_mode) & 0o077 == 0
    assert list(target.iterdir()) == []  # the write probe is gone


def test_check_disk_dir_under_a_regular_file_names_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    path = blocker / "kv"
    with pytest.raises(
        ConfigError, match=rf"^KVBM_DISK_CACHE_DIR='{path}' cannot be created .*writable directory"
    ):
        KvbmConfig(disk_cache_dir=str(path)).check_disk_dir()


def test_check_disk_dir_on_a_regular_file_fails(tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(ConfigError, match="KVBM_DISK_CACHE_DIR"):
        KvbmConfig(disk_cache_dir=str(target)).check_disk_dir()
