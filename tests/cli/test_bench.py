"""``kvbm bench`` end to end on the CPU with the tiny model (seconds): files, numbers, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch


@pytest.mark.parametrize("workload", ["multi-turn", "doc-qa", "prefix"])
def test_bench_writes_json_and_png_whose_numbers_add_up(kvbm, tmp_path, workload):
    out_dir = tmp_path / "out"
    result = kvbm("bench", "--model", "tiny", "--workload", workload, "--no-progress", "-o", out_dir)
    assert result.code == 0, result.err
    assert (out_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out_dir / "bench.json").read_text())
    options = report["options"]
    with_kvbm, without = report["with_kvbm"], report["without_kvbm"]
    num_requests = options["sessions"] * options["rounds"]

    # Loaded KV is bit-identical to recomputed KV, so greedy outputs match exactly.
    assert report["outputs_match"] is True
    assert len(with_kvbm["requests"]) == len(without["requests"]) == num_requests
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == list(range(options["rounds"]))
    assert sum(r["num_requests"] for r in rounds) == num_requests
    assert all(r["ttft_with_s"] > 0 and r["ttft_without_s"] > 0 for r in rounds)

    # The GPU pool is smaller than the working set, so later rounds reuse through kvbm's tiers.
    pools = report["pools_blocks"]
    assert pools["gpu"] < pools["working_set"]
    assert sum(r["kvbm_hit_tokens"] for r in rounds[1:]) > 0
    summary, baseline = with_kvbm["summary"], without["summary"]
    assert summary["num_computed_prompt_tokens"] < baseline["num_computed_prompt_tokens"]
    assert baseline["num_connector_hit_tokens"] == 0

    # Every prompt token came from exactly one place; the leader's per-tier counts agree.
    tiers = report["tier_tokens"]
    assert tiers["gpu"] + tiers["host"] + tiers["disk"] + tiers["computed"] == tiers["prompt"]
    assert tiers["host"] + tiers["disk"] == tiers["kvbm_reported"] == summary["num_connector_hit_tokens"]
    stats = with_kvbm["kvbm_stats"]
    assert stats["matched_tokens"] == summary["num_connector_hit_tokens"]
    assert stats["failed_transfers"] == 0

    transfers = report["transfers"]
    assert transfers["bytes"]["offload_bytes_d2h"] > 0
    assert transfers["bytes"]["onboard_bytes_h2d"] + transfers["bytes"]["onboard_bytes_d2d"] > 0
    assert transfers["jobs"]["onboard"]["jobs"] > 0
    probe = transfers["probe"]
    assert probe["gpu->cpu"]["gb_per_s"] > 0 and probe["cpu->gpu"]["gb_per_s"] > 0
    assert probe["cpu->disk"]["gb_per_s"] > 0

    for text in ("TTFT without", "TTFT with", "host memory (G2)", "disk (G3)", "bytes moved",
                 "GB/s", "outputs with kvbm == outputs without: yes", "bench.json"):
        assert text in result.out


def test_bench_host_tier_only_with_a_progress_bar(kvbm, tmp_path):
    result = kvbm("bench", "--model", "tiny", "--tiers", "cpu", "--no-baseline", "-o", tmp_path)
    assert result.code == 0, result.err
    assert "with kvbm" in result.err and "12/12" in result.err  # tqdm, one tick per request
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["without_kvbm"] is None and report["outputs_match"] is None
    assert report["tier_tokens"]["disk"] == 0 and report["tier_tokens"]["host"] > 0
    assert report["pools_blocks"]["disk"] == 0
    assert not any("disk" in direction for direction in report["transfers"]["probe"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--tp", "3"], "--tp 3 must divide"),
        (["--tiers", "disk"], "needs the cpu tier"),
        (["--tiers", "cpu,ssd"], "unknown tier 'ssd'"),
        (["--gpu-blocks", "2"], "cannot hold the longest request"),
        (["--sessions", "0"], "--sessions 0 must be"),
        (["--device", "tpu"], "--device 'tpu' is unknown"),
        (["--cpu-cache-gb", "-1"], "--cpu-cache-gb -1.0 must be"),
        (["--tiers", ""], "--tiers names no tier"),
        (["--tiers", "cpu,disk", "--disk-blocks", "0"], "--disk-blocks 0: the disk tier needs at least one block"),
        (["--cpu-blocks", "0"], "--cpu-blocks 0: the cpu tier needs at least one block"),
        (["--cpu-cache-gb", "0.0000001"], "KVBM_CPU_CACHE_GB=1e-07 is smaller than one block"),
        (["--cpu-cache-gb", "900000"], "GB is available; lower KVBM_CPU_CACHE_GB"),
    ],
)
def test_bench_rejects_bad_options(kvbm, tmp_path, args, expected):
    result = kvbm("bench", "--model", "tiny", "--no-progress", "-o", tmp_path, *args)
    assert result.code == 2
    assert expected in result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1
    assert "without kvbm" not in result.out  # refused before the baseline run
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("problem", ["a file", "writable by others"])
def test_bench_checks_the_disk_dir_before_the_baseline(kvbm, tmp_path, problem):
    disk_dir = tmp_path / "disk"
    if problem == "a file":
        disk_dir.write_text("x")
        expected = "is not a directory"
    else:
        disk_dir.mkdir()
        os.chmod(disk_dir, 0o777)
        expected = "mode 0777, writable by other users"
    result = kvbm("bench", "--model", "tiny", "--no-progress", "-o", tmp_path / "out",
                  "--disk-dir", disk_dir)
    assert result.code == 2 and expected in result.err and "--disk-dir" in result.err
    assert "without kvbm" not in result.out


def test_bench_rejects_an_output_path_that_is_a_file(kvbm, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = kvbm("bench", "--model", "tiny", "--no-progress", "-o", target)
    assert result.code == 2 and "not a directory" in result.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_bench_on_cuda_without_a_gpu_says_so(kvbm, tmp_path):
    result = kvbm("bench", "--model", "tiny", "--device", "cuda", "--no-progress", "-o", tmp_path)
    assert result.code == 2 and "no CUDA GPU" in result.err


@pytest.mark.services
def test_bench_tp2_ranks_meet_over_local_etcd_and_nats(kvbm, tmp_path, require_services, monkeypatch):
    """TP=2: one process per rank; kvbm's ranks meet over an etcd and a nats-server that the
    bench starts on free loopback ports. Outputs still match the TP=2 recompute."""
    monkeypatch.delenv("KVBM_CONTROL_SECRET", raising=False)
    result = kvbm("bench", "--model", "tiny", "--tp", "2", "--sessions", "3", "--rounds", "2",
                  "--no-progress", "-o", tmp_path)
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["options"]["tp"] == 2
    assert report["outputs_match"] is True
    assert report["with_kvbm"]["kvbm_config"]["discovery"] == "etcd"
    # The bench signs its own servers' control plane with a fresh secret it never writes out.
    assert "control_secret" not in report["with_kvbm"]["kvbm_config"]
    tiers = report["tier_tokens"]
    assert tiers["host"] + tiers["disk"] == report["with_kvbm"]["summary"]["num_connector_hit_tokens"] > 0
    # Bytes count every rank's share of a block: two ranks, two halves.
    stats = report["with_kvbm"]["kvbm_stats"]
    assert stats["onboard_bytes_h2d"] > 0 and stats["onboard_blocks_h2d"] > 0
