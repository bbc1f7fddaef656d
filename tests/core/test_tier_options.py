"""Tier options are read once, from the kvbm mapping or the environment, by one parser."""

import pytest

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_core.tier_options import TierOption, optional, positive_int, read_tier_options

OPTIONS = (TierOption("disk_io_threads", 16, positive_int), TierOption("x_depth", None, optional(positive_int)))


def test_mapping_wins_over_environment_and_defaults_fill_the_rest():
    env = {"KVBM_DISK_IO_THREADS": "4", "DYN_KVBM_X_DEPTH": "2"}
    assert read_tier_options(OPTIONS, KvbmConfig(), env) == {"disk_io_threads": 4, "x_depth": 2}
    config = KvbmConfig.from_mapping({"tier_options": {"disk_io_threads": 8}})
    assert read_tier_options(OPTIONS, config, env)["disk_io_threads"] == 8
    assert read_tier_options(OPTIONS, None, {}) == {"disk_io_threads": 16, "x_depth": None}


def test_a_bad_value_names_the_variable_as_set():
    with pytest.raises(ConfigError, match="KVBM_DISK_IO_THREADS='lots'"):
        read_tier_options(OPTIONS, KvbmConfig(), {"KVBM_DISK_IO_THREADS": "lots"})
    assert KvbmConfig.from_env({"KVBM_TIER_OPTIONS": "mmap_num_blocks=9"}).tier_options == {"mmap_num_blocks": "9"}
