"""Tier options are read once, from the kvbm mapping or the environment, by one parser."""

import pytest

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_core.tier_options import TierOption, auto_flag, optional, positive_int, read_tier_options

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


def test_given_values_win_and_parsed_ones_read_back_unchanged():
    options = (TierOption("x_threads", 4, positive_int), TierOption("x_zero_copy", None, auto_flag))
    env = {"KVBM_X_THREADS": "9", "KVBM_X_ZERO_COPY": "true"}
    parsed = read_tier_options(options, KvbmConfig(tier_options={"x_zero_copy": "auto"}), env)
    assert parsed == {"x_threads": 9, "x_zero_copy": None}
    assert read_tier_options(options, None, env, given=parsed) == parsed  # "auto" stays auto
    assert read_tier_options(options, None, env, given={"x_threads": "3"})["x_threads"] == 3
    with pytest.raises(ConfigError, match="x_threads='0' is invalid"):
        read_tier_options(options, None, env, given={"x_threads": "0"})
