"""What the mooncake tier does when the store misbehaves: never a wrong byte, never a hang.

A real store on loopback (the ``store`` fixture); values are corrupted, removed or the master is
stopped and restarted under the tier's handlers and the leader's presence source.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_core.layout import KvLayout
from kvbm_core.testing import build_tier_rig, run_jobs, write_blocks
from kvbm_core.testing.rig import SlotPicker, make_job, read_blocks
from kvbm_core.tier_options import read_tier_options
from kvbm_tiers_mooncake import plugin
from kvbm_tiers_mooncake.client import StoreSettings, connect
from kvbm_tiers_mooncake.keys import KeyScheme
from kvbm_tiers_mooncake.presence import MooncakePresence

LAYOUT = KvLayout(num_layers=2, tokens_per_block=4, num_kv_heads=2, head_dim=32, dtype="bfloat16")


def _rig(options):
    return build_tier_rig(
        "mooncake",
        LAYOUT,
        num_slots=64,
        num_gpu_blocks=32,
        config=KvbmConfig(model_id="m"),
        device="cpu",
        options=options,
    )


def _store_blocks(rig, hashes):
    """Put ``hashes`` from GPU blocks 0.. and zero those GPU blocks; their bytes."""
    picker = SlotPicker(rig, seed=1)
    data = picker.random_bytes(len(hashes), LAYOUT.bytes_per_block)
    gpu_ids = list(range(len(hashes)))
    write_blocks(rig, "gpu", gpu_ids, data, hashes, picker)
    job = make_job(rig, "gpu", "mooncake", gpu_ids, list(range(len(hashes))))
    job = type(job)(job.job_id, job.src, job.dst, job.src_ids, job.dst_ids, tuple(hashes))
    results = run_jobs(rig, rig.handler("gpu", "mooncake"), [[job]], 30)
    assert results[job.job_id].ok, results[job.job_id].error
    write_blocks(rig, "gpu", gpu_ids, np.zeros_like(data), hashes, picker)
    return data


def _load(rig, hashes, gpu_ids):
    job = make_job(rig, "mooncake", "gpu", list(range(len(hashes))), gpu_ids)
    job = type(job)(job.job_id, job.src, job.dst, job.src_ids, job.dst_ids, tuple(hashes))
    started = time.monotonic()
    result = run_jobs(rig, rig.handler("mooncake", "gpu"), [[job]], 30)[job.job_id]
    return result, time.monotonic() - started


def _gpu(rig, ids):
    return read_blocks(rig, "gpu", ids, SlotPicker(rig, seed=2))


def test_a_round_trip_lands_the_bytes(store):
    rig = _rig({**store.options, "mooncake_namespace": "rt"})
    try:
        data = _store_blocks(rig, [11, 12, 13])
        result, _ = _load(rig, [11, 12, 13], [5, 6, 7])
        assert result.ok, result.error
        assert np.array_equal(_gpu(rig, [5, 6, 7]), data)
    finally:
        rig.close()


def test_a_corrupt_value_fails_the_load_and_reaches_no_gpu_byte(store):
    options = {**store.options, "mooncake_namespace": "corrupt"}
    rig = _rig(options)
    try:
        _store_blocks(rig, [21, 22])
        keys = KeyScheme("corrupt", "m", LAYOUT.bytes_per_block, 1)
        raw = connect(StoreSettings.from_options(options), 0)
        value = bytearray(raw.get(keys.key(22, 0)))
        value[-1] ^= 0xFF  # one flipped bit in the payload's last byte
        assert raw.upsert(keys.key(22, 0), bytes(value)) == 0
        result, took = _load(rig, [21, 22], [8, 9])
        assert not result.ok and result.bad_block_hashes == (22,)
        assert "corrupt" in (result.error or "")
        assert not _gpu(rig, [8, 9]).any(), "no byte of a batch with a corrupt value is delivered"
        assert took < 10
        raw.close()
    finally:
        rig.close()


def test_a_value_evicted_between_lookup_and_load_fails_the_load_cleanly(store):
    rig = _rig({**store.options, "mooncake_namespace": "evicted"})
    try:
        _store_blocks(rig, [31])
        result, took = _load(rig, [31, 32], [3, 4])  # 32 was "seen" by a lookup, then evicted
        assert not result.ok and result.bad_block_hashes == (32,)
        assert not _gpu(rig, [3, 4]).any()
        assert took < 10
    finally:
        rig.close()


def test_master_stopped_mid_run_fails_jobs_in_bounded_time_then_recovers(store):
    options = {**store.options, "mooncake_namespace": "restart"}
    rig = _rig(options)
    presence = MooncakePresence(
        StoreSettings.from_options(options),
        KeyScheme("restart", "m", LAYOUT.bytes_per_block, 1),
        timeout_s=0.05,
        negative_ttl_s=0.01,
        retry_secs=0.2,
    )
    try:
        assert presence.wait_connected(10)
        _store_blocks(rig, [41])
        assert presence.query([41]) == {41}
        store.stop()
        result, took = _load(rig, [41], [1])
        assert not result.ok and took < 15, "a load against a stopped master ends, with an error"
        started = time.monotonic()
        assert presence.query([41]) == set()
        assert time.monotonic() - started < 1.0, "an existence query never stalls the scheduler"
        store.restart()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                _store_blocks(rig, [42])
                break
            except AssertionError:
                time.sleep(0.5)
        else:
            pytest.fail("stores did not work again within 30 s of the master's restart")
        result, _ = _load(rig, [42], [2])
        assert result.ok, result.error
    finally:
        presence.close()
        rig.close()


def test_master_down_at_start_turns_the_tier_off_with_one_warning(caplog):
    from kvbm_tiers_mooncake.local_store import free_port

    dead = {
        "mooncake_master": f"127.0.0.1:{free_port()}",
        "mooncake_metadata_server": f"http://127.0.0.1:{free_port()}/metadata",
    }
    config = KvbmConfig(tier_options=dead)
    options = read_tier_options(plugin.OPTIONS, config)
    with caplog.at_level(logging.WARNING, logger="kvbm_tiers_mooncake"):
        assert plugin.num_slots(config, options, 4096) == 0
    assert len(caplog.records) == 1 and "unreachable" in caplog.records[0].getMessage()
    required = read_tier_options(
        plugin.OPTIONS, KvbmConfig(tier_options={**dead, "mooncake_required": True})
    )
    with pytest.raises(ConfigError, match="unreachable"):
        plugin.num_slots(config, required, 4096)


def test_a_worker_whose_store_is_down_fails_jobs_at_once():
    from kvbm_tiers_mooncake.local_store import free_port

    rig = _rig(
        {
            "mooncake_master": f"127.0.0.1:{free_port()}",
            "mooncake_metadata_server": f"http://127.0.0.1:{free_port()}/metadata",
        }
    )
    try:
        result, took = _load(rig, [1], [1])
        assert not result.ok and "unreachable" in (result.error or "") and took < 2
    finally:
        rig.close()


def test_the_tier_is_off_without_a_master():
    config = KvbmConfig()
    assert plugin.num_slots(config, read_tier_options(plugin.OPTIONS, config), 4096) == 0
