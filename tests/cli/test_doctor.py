"""``kvbm doctor``: a table of checks, a FAIL with its fix for each real problem, exit 1 then."""

from __future__ import annotations

import os
import re
import socket

import pytest

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_trtllm.commands.doctor import FAIL, OK, WARN, run_checks


def _by_name(checks):
    return {c.name: c for c in checks}


def test_healthy_config_passes_with_disk_checks(kvbm, monkeypatch, tmp_path):
    monkeypatch.setenv("KVBM_CPU_CACHE_GB", "0.5")
    monkeypatch.setenv("KVBM_DISK_CACHE_GB", "0.5")
    monkeypatch.setenv("KVBM_DISK_CACHE_DIR", str(tmp_path / "cache"))
    result = kvbm("doctor")
    assert result.code == 0, result.out
    checks = _by_name(run_checks())
    assert checks["config"].status == OK
    assert checks["disk directory"].status == OK
    assert checks["disk space"].status == OK
    assert checks["O_DIRECT"].status in (OK, "warn")  # tmpfs has no O_DIRECT; that is a warning
    assert checks["plugins"].status == OK and "cpu" in checks["plugins"].detail
    assert "\nFAIL " not in result.out and "0 FAIL" in result.out
    for name in ("torch / CUDA", "pinned memory", "GDS (cuFile)", "NIXL", "TensorRT-LLM"):
        assert name in result.out


def test_disk_dir_under_a_regular_file_fails_with_the_fix(kvbm, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("KVBM_CPU_CACHE_GB", "0.5")
    monkeypatch.setenv("KVBM_DISK_CACHE_GB", "0.5")
    monkeypatch.setenv("KVBM_DISK_CACHE_DIR", str(blocker / "cache"))
    result = kvbm("doctor")
    assert result.code == 1
    check = _by_name(run_checks())["disk directory"]
    assert check.status == FAIL
    assert "KVBM_DISK_CACHE_DIR" in check.detail and str(blocker / "cache") in check.detail
    assert "writable directory" in check.fix
    assert "FAIL" in result.out and "fix:" in result.out


def test_disk_tier_larger_than_free_space_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("KVBM_CPU_CACHE_GB", "0.5")
    monkeypatch.setenv("KVBM_DISK_CACHE_GB", "9e5")  # 0.9 PB
    monkeypatch.setenv("KVBM_DISK_CACHE_DIR", str(tmp_path))
    check = _by_name(run_checks())["disk space"]
    assert check.status == FAIL and "KVBM_DISK_CACHE_GB" in check.fix


def test_unreachable_etcd_fails_fast_with_the_fix(kvbm, monkeypatch, unused_port):
    monkeypatch.setenv("KVBM_CPU_CACHE_GB", "0.5")
    monkeypatch.setenv("KVBM_DISCOVERY", "etcd")
    monkeypatch.setenv("KVBM_ETCD_ENDPOINTS", f"127.0.0.1:{unused_port}")
    result = kvbm("doctor")
    assert result.code == 1
    check = _by_name(run_checks())[f"etcd 127.0.0.1:{unused_port}"]
    assert check.status == FAIL and "unreachable" in check.detail
    assert "KVBM_ETCD_ENDPOINTS" in check.fix
    # Without KVBM_NATS_URL, TP>1 across processes cannot work: said as a warning.
    assert _by_name(run_checks())["NATS"].status == "warn"


def test_servers_are_not_probed_unless_configured(monkeypatch):
    monkeypatch.setenv("KVBM_CPU_CACHE_GB", "0.5")
    names = [c.name for c in run_checks()]
    assert not any(n.startswith(("etcd", "NATS")) for n in names)


def test_reachable_nats_is_ok(monkeypatch, nats_url):
    monkeypatch.setenv("KVBM_CPU_CACHE_GB", "0.5")
    monkeypatch.setenv("KVBM_NATS_URL", nats_url)
    check = _by_name(run_checks())[f"NATS {nats_url}"]
    assert check.status == OK and check.detail.startswith("INFO")


def test_bad_config_value_names_the_variable(kvbm, monkeypatch):
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "lots")
    result = kvbm("doctor")
    assert result.code == 1
    check = _by_name(run_checks())["config"]
    assert check.status == FAIL and "DYN_KVBM_CPU_CACHE_GB" in check.detail and "'lots'" in check.detail


def test_metrics_port_in_use_fails(monkeypatch):
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        monkeypatch.setenv("KVBM_CPU_CACHE_GB", "0.5")
        monkeypatch.setenv("KVBM_METRICS", "1")
        monkeypatch.setenv("KVBM_METRICS_PORT", str(port))
        check = _by_name(run_checks())["metrics port"]
    assert check.status == FAIL and str(port) in check.detail and "KVBM_METRICS_PORT" in check.fix


def test_no_tiers_configured_is_a_warning_not_a_failure(kvbm):
    result = kvbm("doctor")
    assert result.code == 0
    check = _by_name(run_checks())["config"]
    assert check.status == "warn" and "KVBM_CPU_CACHE_GB" in check.fix


def test_doctor_never_writes_through_planted_links(monkeypatch, tmp_path):
    # S5: links planted at the probe names an older doctor used (.kvbm-probe-<pid>,
    # .kvbm-doctor-<pid>) must not be written through; the targets stay as they were.
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    victims = {}
    for name in (f".kvbm-probe-{os.getpid()}", f".kvbm-doctor-{os.getpid()}"):
        victim = tmp_path / f"victim{name}"
        victim.write_bytes(bytes(range(256)) * 64)
        (cache / name).symlink_to(victim)
        victims[victim] = victim.read_bytes()
    monkeypatch.setenv("KVBM_CPU_CACHE_GB", "0.5")
    monkeypatch.setenv("KVBM_DISK_CACHE_GB", "0.01")
    monkeypatch.setenv("KVBM_DISK_CACHE_DIR", str(cache))
    checks = _by_name(run_checks())
    assert checks["disk directory"].status == OK
    assert checks["O_DIRECT"].status in (OK, "warn")
    for victim, data in victims.items():
        assert victim.read_bytes() == data
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        (f".kvbm-probe-{os.getpid()}", f".kvbm-doctor-{os.getpid()}")
    )


def test_doctor_refuses_a_cache_directory_writable_by_others(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chmod(cache, 0o777)
    monkeypatch.setenv("KVBM_CPU_CACHE_GB", "0.5")
    monkeypatch.setenv("KVBM_DISK_CACHE_GB", "0.01")
    monkeypatch.setenv("KVBM_DISK_CACHE_DIR", str(cache))
    check = _by_name(run_checks())["disk directory"]
    assert check.status == FAIL and "mode 0777" in check.detail and "chmod go-w" in check.detail


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("KVBM_NAMESPACE", "my ns.prod", "letters, digits, '_' or '-'"),
        ("KVBM_ETCD_ENDPOINTS", ",,,", "host:port"),
        ("KVBM_CPU_CACHE_GB", "1e30", "<= 1000000 (1 PB)"),
    ],
)
def test_doctor_refuses_config_the_engine_refuses(kvbm, monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        KvbmConfig.from_env()  # what the connector runs at start
    check = _by_name(run_checks())["config"]
    assert check.status == FAIL and name in check.detail and expected in check.detail
    assert kvbm("doctor").code == 1


def test_doctor_refuses_an_unparseable_etcd_endpoint(monkeypatch):
    monkeypatch.setenv("KVBM_CPU_CACHE_GB", "0.5")
    monkeypatch.setenv("KVBM_DISCOVERY", "etcd")
    monkeypatch.setenv("KVBM_ETCD_ENDPOINTS", "ftp://x:1")
    check = _by_name(run_checks())["etcd"]
    assert check.status == FAIL and "'ftp://x:1' is invalid" in check.detail


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("KVBM_DISK_BACKEND", "bogus", "KVBM_DISK_BACKEND='bogus' is invalid"),
        ("KVBM_CPU_PIN_THREADS", "0", "KVBM_CPU_PIN_THREADS='0' is invalid"),
        ("KVBM_CPU_STAGING_MIB", "1e99", "KVBM_CPU_STAGING_MIB='1e99' is invalid"),
    ],
)
def test_doctor_refuses_bad_tier_options(monkeypatch, tmp_path, name, value, expected):
    monkeypatch.setenv("KVBM_CPU_CACHE_GB", "0.5")
    monkeypatch.setenv("KVBM_DISK_CACHE_GB", "0.01")
    monkeypatch.setenv("KVBM_DISK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(name, value)
    check = _by_name(run_checks())["tier options"]
    assert check.status == FAIL and expected in check.detail


def test_doctor_warns_about_near_miss_names(monkeypatch):
    monkeypatch.setenv("KVBM_CPU_CACHE_GIB", "4")
    checks = [c for c in run_checks() if "KVBM_CPU_CACHE_GIB" in c.detail]
    assert [(c.status, c.fix) for c in checks] == [("warn", "rename it to KVBM_CPU_CACHE_GB")]


def test_doctor_finds_nixl_as_the_disk_tier_does(monkeypatch, tmp_path):
    from kvbm_tiers_disk.nixl_io import nixl_module_name

    monkeypatch.setenv("KVBM_CPU_CACHE_GB", "0.5")
    monkeypatch.setenv("KVBM_DISK_CACHE_GB", "0.01")
    monkeypatch.setenv("KVBM_DISK_CACHE_DIR", str(tmp_path / "cache"))
    check = _by_name(run_checks())["NIXL"]
    name = nixl_module_name()
    if name is None:
        assert check.status == "warn" and "not installed" in check.detail
    else:
        assert check.status == OK and name in check.detail and "the disk tier uses it" in check.detail
        assert "not installed" not in check.detail


def test_doctor_says_gds_is_unavailable_without_a_gpu():
    import torch

    check = _by_name(run_checks())["GDS (cuFile)"]
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert check.status == "warn" and "no CUDA GPU" in check.detail and check.status != OK


@pytest.mark.parametrize(
    ("settings", "status", "expected"),
    [
        ({}, FAIL, "KVBM_CONTROL_SECRET_FILE"),
        ({"KVBM_CONTROL_SECRET": "short"}, FAIL, "expected at least 16"),
        ({"KVBM_CONTROL_INSECURE": "1"}, WARN, "not signed"),
        ({"KVBM_CONTROL_SECRET": "a" * 32}, OK, "32 bytes"),
    ],
)
def test_doctor_checks_the_control_secret_as_the_engine_would(monkeypatch, settings, status, expected):
    monkeypatch.setenv("KVBM_CPU_CACHE_GB", "0.5")
    monkeypatch.setenv("KVBM_DISCOVERY", "etcd")
    for name in ("KVBM_CONTROL_SECRET", "KVBM_CONTROL_SECRET_FILE", "KVBM_CONTROL_INSECURE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    check = _by_name(run_checks())["control secret"]
    assert check.status == status and expected in check.detail


def test_doctor_refuses_a_secret_file_others_can_read(monkeypatch, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("b" * 32)
    secret.chmod(0o644)
    monkeypatch.setenv("KVBM_CPU_CACHE_GB", "0.5")
    monkeypatch.setenv("KVBM_DISCOVERY", "etcd")
    monkeypatch.delenv("KVBM_CONTROL_SECRET", raising=False)
    monkeypatch.setenv("KVBM_CONTROL_SECRET_FILE", str(secret))
    check = _by_name(run_checks())["control secret"]
    assert check.status == FAIL and "chmod" in check.detail
