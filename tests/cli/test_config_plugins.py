"""``kvbm config trtllm`` (YAML TensorRT-LLM accepts, and the env to set) and ``kvbm plugins``."""

from __future__ import annotations

import json

import yaml

from kvbm_trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker
from kvbm_trtllm.executor import resolve_connector
from kvbm_trtllm.trtllm_api import KvCacheConnectorConfigLike


def test_config_trtllm_to_stdout_parses_back_and_names_importable_classes(kvbm):
    result = kvbm("config", "trtllm", "--cpu-cache-gb", "16", "--disk-cache-gb", "100",
                  "--disk-cache-dir", "/mnt/nvme/kvbm", "--metrics-port", "6880")
    assert result.code == 0, result.err
    config = yaml.safe_load(result.out)
    assert config["backend"] == "pytorch"
    assert config["kv_cache_config"]["enable_partial_reuse"] is False
    assert config["kv_cache_config"]["enable_block_reuse"] is True
    assert config["kv_connector_config"] == {
        "connector_module": "kvbm_trtllm.connector",
        "connector_scheduler_class": "KvbmConnectorLeader",
        "connector_worker_class": "KvbmConnectorWorker",
    }
    # The engine imports exactly these names.
    classes = resolve_connector(KvCacheConnectorConfigLike(**config["kv_connector_config"]))
    assert classes == (KvbmConnectorLeader, KvbmConnectorWorker)
    # The environment goes to stderr, so `kvbm config trtllm > x.yaml` stays valid YAML.
    for line in ("export KVBM_CPU_CACHE_GB=16", "export KVBM_DISK_CACHE_GB=100",
                 "export KVBM_DISK_CACHE_DIR=/mnt/nvme/kvbm", "export KVBM_METRICS=1",
                 "export KVBM_METRICS_PORT=6880"):
        assert line in result.err


def test_config_trtllm_to_file_with_dynamo_names(kvbm, tmp_path):
    target = tmp_path / "kvbm.yaml"
    result = kvbm("config", "trtllm", "-o", target, "--dynamo-names", "--tokens-per-block", "64")
    assert result.code == 0, result.err
    config = yaml.safe_load(target.read_text())
    assert config["kv_connector_config"]["connector_scheduler_class"] == "DynamoKVBMConnectorLeader"
    assert config["kv_cache_config"]["tokens_per_block"] == 64
    classes = resolve_connector(KvCacheConnectorConfigLike(**config["kv_connector_config"]))
    assert classes == (KvbmConnectorLeader, KvbmConnectorWorker)
    assert "KVBM_CPU_CACHE_GB" in result.out  # a default host tier is suggested
    again = kvbm("config", "trtllm", "-o", target)
    assert again.code == 2 and "--force" in again.err
    assert kvbm("config", "trtllm", "-o", target, "--force").code == 0


def test_config_trtllm_rejects_bad_values(kvbm):
    result = kvbm("config", "trtllm", "--cpu-cache-gb", "-1")
    assert result.code == 2 and "KVBM_CPU_CACHE_GB" in result.err
    result = kvbm("config", "trtllm", "--disk-cache-gb", "10")  # a disk tier needs a host tier
    assert result.code == 2 and "CPU tier" in result.err
    result = kvbm("config", "trtllm", "--tokens-per-block", "0")
    assert result.code == 2 and "--tokens-per-block" in result.err


def test_plugins_lists_tiers_and_discovery_backends_with_distributions(kvbm):
    result = kvbm("plugins", "--json")
    assert result.code == 0, result.err
    rows = {(r["kind"], r["name"]): r for r in json.loads(result.out)}
    assert rows[("tier", "cpu")]["distribution"] == "kvbm-tiers-cpu"
    assert rows[("tier", "cpu")]["level"] == 2
    assert rows[("tier", "disk")]["distribution"] == "kvbm-tiers-disk"
    assert rows[("discovery", "inproc")]["distribution"] == "kvbm-discovery"
    assert rows[("discovery", "etcd")]["distribution"] == "kvbm-discovery"
    assert all(r["version"] for r in rows.values())
    table = kvbm("plugins")
    assert table.code == 0
    for word in ("cpu", "disk", "inproc", "etcd", "kvbm-tiers-cpu", "G2", "G3"):
        assert word in table.out


def test_plugins_honours_disabled_plugins(kvbm, monkeypatch):
    monkeypatch.setenv("KVBM_DISABLED_PLUGINS", "disk")
    result = kvbm("plugins", "--json")
    names = {r["name"] for r in json.loads(result.out)}
    assert "disk" not in names and "cpu" in names
