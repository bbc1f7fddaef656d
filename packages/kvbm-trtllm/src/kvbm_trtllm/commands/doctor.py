"""``kvbm doctor``: what will work on this machine with this config, and the fix for what won't.

``run_checks(environ=None) -> list[Check]`` runs every check in this process (nothing is
started, servers get a short TCP probe); ``run(args)`` prints them as a table and exits 1 when
one failed. Servers are probed only when the config names them (``KVBM_DISCOVERY=etcd``,
``KVBM_NATS_URL``).

Doctor refuses what the engine would refuse by calling the engine's own code: the config
parser, the tier plugins' ``check_options``, the disk tier's directory checks and backend
choice (``disk_backend``: so "NIXL" says what the disk tier will use), kvbm_discovery's
namespace and endpoint parsing. GDS is reported unavailable without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import mmap
import os
import shutil
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kvbm_core.config import ConfigError, KvbmConfig, unknown_setting_names
from kvbm_core.private_dir import open_probe
from kvbm_trtllm.commands.common import format_table

__all__ = ["Check", "OK", "WARN", "FAIL", "run_checks", "add_parser", "run"]

OK, WARN, FAIL = "ok", "warn", "FAIL"
PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check the environment and the kvbm config; say what will work and the fix for what won't",
        description="Check torch/CUDA, pinned memory, the disk directory, GDS and NIXL, etcd and "
        "NATS (when configured), the plugins and the KVBM_* / DYN_KVBM_* settings. Exits 1 "
        "when a check fails.",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    checks = run_checks()
    rows = [(c.status, c.name, c.detail + (f"\n{'':>4}fix: {c.fix}" if c.fix else "")) for c in checks]
    print(format_table(("status", "check", "detail"), _indent_rows(rows)))
    failed = [c for c in checks if c.status == FAIL]
    warned = [c for c in checks if c.status == WARN]
    print(f"\n{len(checks)} checks: {len(checks) - len(failed) - len(warned)} ok, "
          f"{len(warned)} warn, {len(failed)} FAIL")
    return 1 if failed else 0


def _indent_rows(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    # A fix goes on its own line under the detail, lined up with the detail column.
    width = max(len(r[0]) for r in rows) + 2 + max(len(r[1]) for r in rows) + 2
    out = []
    for status, name, text in rows:
        out.append((status, name, text.replace("\n    ", "\n" + " " * width + "  ")))
    return out


def run_checks(environ: Mapping[str, str] | None = None) -> list[Check]:
    env = os.environ if environ is None else environ
    config, config_check = _load_config(env)
    checks = [config_check, *_unknown_name_checks(env), *_torch_checks()]
    if config is not None:
        checks.append(_check_cpu_tier(config))
        checks += _disk_checks(config, env)
        checks.append(_check_plugins(config))
        checks.append(_check_tier_options(config))
        checks += _discovery_checks(config)
        if config.metrics:
            checks.append(_check_metrics_port(config.metrics_host, config.metrics_port))
    checks.append(_check_gds())
    checks.append(_check_nixl(config))
    checks.append(_check_module("TensorRT-LLM", "tensorrt_llm",
                                "only the reference executor (kvbm bench) can drive kvbm here",
                                "install TensorRT-LLM (>= 1.2) to serve models with kvbm"))
    return checks


def _load_config(env: Mapping[str, str]) -> tuple[KvbmConfig | None, Check]:
    """The config (``None`` when it is invalid) and the check that reports it."""
    try:
        config = KvbmConfig.from_env(env)
    except ConfigError as exc:
        return None, Check("config", FAIL, str(exc), "fix or unset that variable (see README: Configuration)")
    status = OK if config.cpu_enabled else WARN
    fix = "" if config.cpu_enabled else "set KVBM_CPU_CACHE_GB (and KVBM_DISK_CACHE_GB) to give kvbm tiers"
    return config, Check("config", status, _describe_config(config), fix)


def _unknown_name_checks(env: Mapping[str, str]) -> list[Check]:
    checks = []
    for name, suggestion in unknown_setting_names(env):
        fix = f"rename it to {suggestion}" if suggestion else "remove it (see README: Configuration)"
        checks.append(Check("config", WARN, f"{name} is not a kvbm setting and is ignored", fix))
    return checks


def _describe_config(config: KvbmConfig) -> str:
    def size(gb: float, override: int | None) -> str:
        return f"{override} blocks" if override is not None else f"{gb:g} GB"

    parts = [
        f"cpu tier {size(config.cpu_cache_gb, config.cpu_cache_override_num_blocks)}"
        if config.cpu_enabled else "cpu tier off",
        f"disk tier {size(config.disk_cache_gb, config.disk_cache_override_num_blocks)}"
        if config.disk_enabled else "disk tier off",
        f"discovery {config.discovery}",
        f"metrics on :{config.metrics_port}" if config.metrics else "metrics off",
    ]
    detail = ", ".join(parts)
    if not config.cpu_enabled:
        detail += ": kvbm has no tier to keep blocks in"
    return detail


# ---- torch, CUDA, pinned memory ------------------------------------------------------------


def _torch_checks() -> list[Check]:
    try:
        import torch
    except ImportError as exc:
        return [Check("torch", FAIL, f"not importable ({exc})", "pip install torch")]
    checks = []
    if torch.cuda.is_available():
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        checks.append(Check("torch / CUDA", OK, f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                            f"{torch.cuda.device_count()} GPU(s): {', '.join(sorted(names))}"))
    else:
        checks.append(Check(
            "torch / CUDA", WARN, f"torch {torch.__version__}, no CUDA GPU visible",
            "kvbm bench runs on the CPU; serving needs a CUDA GPU and a CUDA build of torch",
        ))
    checks.append(_check_pinned(torch))
    return checks


def _check_pinned(torch) -> Check:
    if not torch.cuda.is_available():
        return Check("pinned memory", OK, "not applicable without a GPU: the host tier uses pageable memory")
    try:
        torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)
    except RuntimeError as exc:
        return Check("pinned memory", FAIL, f"cannot pin 64 MiB ({exc})",
                     "raise the memlock limit (ulimit -l unlimited; docker --ulimit memlock=-1)")
    return Check("pinned memory", OK, "64 MiB pinned")


def _check_cpu_tier(config: KvbmConfig) -> Check:
    if not config.cpu_enabled:
        return Check("host memory", OK, "no cpu tier configured")
    from kvbm_tiers_cpu.memory import available_memory_bytes

    available = available_memory_bytes()
    if config.cpu_cache_override_num_blocks is not None or available is None:
        return Check("host memory", OK, "cpu tier sized in blocks; the engine checks it fits "
                     "in available memory at start")
    wanted = config.cpu_cache_gb * 1e9
    detail = f"cpu tier {config.cpu_cache_gb:g} GB, {available / 1e9:.1f} GB available"
    if wanted > available:
        return Check("host memory", FAIL, detail,
                     "lower KVBM_CPU_CACHE_GB below the available memory (leave room for the engine)")
    if wanted > 0.8 * available:
        return Check("host memory", WARN, detail, "leave at least 20% of memory to the engine and OS")
    return Check("host memory", OK, detail)


# ---- disk ----------------------------------------------------------------------------------


def _disk_checks(config: KvbmConfig, env: Mapping[str, str]) -> list[Check]:
    is_dir_set = any(p + "DISK_CACHE_DIR" in env for p in ("KVBM_", "DYN_KVBM_"))
    if not config.disk_enabled and not is_dir_set:
        return [Check("disk directory", OK, "no disk tier configured")]
    try:
        path = config.check_disk_dir()
    except ConfigError as exc:
        return [Check("disk directory", FAIL, str(exc),
                      "set KVBM_DISK_CACHE_DIR to a writable directory on a local disk (NVMe)")]
    checks = [_check_free_space(config, path), _check_o_direct(path, config.disk_disable_o_direct)]
    return [Check("disk directory", OK, f"{path} is writable"), *checks]


def _check_free_space(config: KvbmConfig, path: Path) -> Check:
    free = shutil.disk_usage(path).free
    # An existing cache is reused in place, so its files count as room.
    free += sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    if not config.disk_enabled or config.disk_cache_override_num_blocks is not None:
        return Check("disk space", OK, f"{free / 1e9:.1f} GB free")
    detail = f"disk tier {config.disk_cache_gb:g} GB, {free / 1e9:.1f} GB free in {path}"
    if config.disk_cache_gb * 1e9 > free:
        return Check("disk space", FAIL, detail, "lower KVBM_DISK_CACHE_GB or free space there")
    return Check("disk space", OK, detail)


def _check_o_direct(path: Path, is_disabled: bool) -> Check:
    if is_disabled:
        return Check("O_DIRECT", OK, "off (KVBM_DISK_DISABLE_O_DIRECT): buffered I/O through the page cache")
    if not hasattr(os, "O_DIRECT"):
        return Check("O_DIRECT", WARN, "this OS has no O_DIRECT: buffered I/O", "")
    buffer = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
    probe = None
    try:
        # A new file under an unguessable name: nothing planted there is written through.
        fd, probe = open_probe(path, ".kvbm-doctor-", os.O_DIRECT)
        try:
            os.write(fd, buffer)
        finally:
            os.close(fd)
    except OSError as exc:
        return Check("O_DIRECT", WARN, f"not supported in {path} ({exc.strerror}); kvbm uses buffered I/O",
                     "put KVBM_DISK_CACHE_DIR on a local ext4/xfs disk (not tmpfs or overlayfs) "
                     "for steady throughput, or set KVBM_DISK_DISABLE_O_DIRECT=1 to silence this")
    finally:
        buffer.close()
        if probe is not None:
            probe.unlink(missing_ok=True)
    return Check("O_DIRECT", OK, f"supported in {path}")


# ---- plugins, servers, ports ---------------------------------------------------------------


def _check_plugins(config: KvbmConfig) -> Check:
    from kvbm_core.plugins import load_discovery_backend, load_tier_specs, shared_plugin_manager

    wanted = [name for name, on in (("cpu", config.cpu_enabled), ("disk", config.disk_enabled)) if on]
    try:
        pm = shared_plugin_manager(config.disabled_plugins)
        tiers = load_tier_specs(pm, required=wanted)
        load_discovery_backend(pm, config.discovery)
    except (ImportError, LookupError, ValueError) as exc:
        return Check("plugins", FAIL, str(exc), "see `kvbm plugins` for what is installed")
    return Check("plugins", OK, f"tiers {', '.join(tiers) or 'none'}; discovery backend "
                 f"{config.discovery!r} found")


def _tier_context(config: KvbmConfig, options: Mapping[str, Any] | None = None):
    from kvbm_core.layout import KvLayout
    from kvbm_core.plugins import TierContext

    # The options do not depend on the model; any layout will do for checking them.
    layout = KvLayout(num_layers=1, tokens_per_block=1, num_kv_heads=1, head_dim=1, dtype="float16")
    return TierContext(layout=layout, num_slots=1, config=config, options=options or {})


def _check_tier_options(config: KvbmConfig) -> Check:
    from kvbm_core.plugins import load_tier_specs, shared_plugin_manager
    from kvbm_core.tier_options import read_tier_options

    try:
        # Every installed tier's declared options, parsed as the leader and workers parse them.
        specs = load_tier_specs(shared_plugin_manager(config.disabled_plugins))
        options = {name: read_tier_options(spec.options, config) for name, spec in specs.items()}
        if config.cpu_enabled:
            from kvbm_tiers_cpu.plugin import check_options as check_cpu_options

            check_cpu_options(_tier_context(config, options.get("cpu", {})))
        if config.disk_enabled:
            from kvbm_tiers_disk.plugin import check_options as check_disk_options

            backend = check_disk_options(_tier_context(config, options.get("disk", {})))
            return Check("tier options", OK, f"valid; the disk tier moves host <-> disk bytes with {backend}")
    except (ConfigError, ImportError, LookupError, ValueError) as exc:
        return Check("tier options", FAIL, str(exc), "fix or unset that option (see README: Configuration)")
    return Check("tier options", OK, "valid")


def _check_nixl(config: KvbmConfig | None) -> Check:
    from kvbm_tiers_disk.nixl_io import INSTALL_HINT, nixl_module_name

    name = nixl_module_name()  # the disk tier's own detection
    if name is None:
        return Check("NIXL", WARN, "not installed: the disk tier uses its own I/O threads",
                     INSTALL_HINT + " (optional)")
    version = _dist_version(name)
    detail = f"{name}{f' {version}' if version else ''} importable"
    if config is not None and config.disk_enabled:
        from kvbm_tiers_disk.plugin import disk_backend

        try:
            backend = disk_backend(_tier_context(config))
        except ConfigError as exc:
            return Check("NIXL", FAIL, f"{detail}; {exc}", "fix KVBM_DISK_BACKEND")
        used = "the disk tier uses it" if backend == "nixl" else "not used (KVBM_DISK_BACKEND=threads)"
        detail += f": {used}"
    return Check("NIXL", OK, detail)


def _check_gds() -> Check:
    without = "disk <-> GPU moves go through host memory"
    try:
        import torch
    except ImportError:
        return Check("GDS (cuFile)", WARN, f"unavailable without torch: {without}", "pip install torch")
    if not torch.cuda.is_available():
        return Check("GDS (cuFile)", WARN, f"unavailable: no CUDA GPU visible; {without}",
                     "GDS needs a CUDA GPU, its driver and libcufile")
    return _check_module("GDS (cuFile)", "cuda.bindings.cufile", without,
                         "pip install cuda-python (cuda-bindings) on a machine with libcufile")


def _discovery_checks(config: KvbmConfig) -> list[Check]:
    checks = []
    if config.discovery == "etcd" or config.nats_url:
        checks.append(_check_control_secret(config))
    if config.discovery == "etcd":
        from kvbm_discovery.etcd import parse_endpoints

        try:
            parse_endpoints(config)  # what the etcd backend runs at start
        except ConfigError as exc:
            return [Check("etcd", FAIL, str(exc), "fix KVBM_ETCD_ENDPOINTS")]
        for endpoint in config.etcd_endpoints:
            checks.append(_probe_etcd(endpoint))
    if config.nats_url:
        for server in config.nats_url.split(","):
            if server.strip():
                checks.append(_probe_nats(server.strip()))
    elif config.discovery == "etcd":
        checks.append(Check("NATS", WARN, "KVBM_NATS_URL is not set: ranks in other processes "
                            "cannot report to the leader", "set KVBM_NATS_URL=nats://host:4222 for TP>1"))
    return checks


def _check_control_secret(config: KvbmConfig) -> Check:
    from kvbm_discovery.control_secret import control_secret

    try:
        secret = control_secret(config, "the control plane (etcd / NATS)")  # as at start
    except ConfigError as exc:
        return Check("control secret", FAIL, str(exc), "set KVBM_CONTROL_SECRET or KVBM_CONTROL_SECRET_FILE")
    if secret is None:
        return Check("control secret", WARN, "KVBM_CONTROL_INSECURE=1: control messages are not signed",
                     "set KVBM_CONTROL_SECRET or KVBM_CONTROL_SECRET_FILE outside trusted test setups")
    return Check("control secret", OK, f"{len(secret)} bytes; every process must hold the same")


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _probe(address: str, default_port: int, greet: Callable[[socket.socket], str]) -> str:
    host, port = _host_port(address, default_port)
    with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as sock:
        sock.settimeout(PROBE_TIMEOUT_S)
        return greet(sock)


def _probe_etcd(endpoint: str) -> Check:
    def version(sock: socket.socket) -> str:
        host, _ = _host_port(endpoint, 2379)
        sock.sendall(f"GET /version HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        reply = sock.recv(4096).decode(errors="replace")
        return reply.rsplit("\r\n\r\n", 1)[-1].strip() if "etcdserver" in reply else "answers (TLS or not HTTP)"

    try:
        answer = _probe(endpoint, 2379, version)
    except (OSError, ValueError) as exc:
        return Check(f"etcd {endpoint}", FAIL, f"unreachable ({_reason(exc)})",
                     "start etcd there, fix KVBM_ETCD_ENDPOINTS, or use KVBM_DISCOVERY=inproc "
                     "(one process, TP=1)")
    return Check(f"etcd {endpoint}", OK, answer)


def _probe_nats(server: str) -> Check:
    def info(sock: socket.socket) -> str:
        line = sock.recv(4096).decode(errors="replace")
        return line.split("\r\n", 1)[0][:120] if line.startswith("INFO") else "answers, but not as NATS"

    try:
        answer = _probe(server, 4222, info)
    except (OSError, ValueError) as exc:
        return Check(f"NATS {server}", FAIL, f"unreachable ({_reason(exc)})",
                     "start nats-server there or fix KVBM_NATS_URL")
    status = OK if answer.startswith("INFO") else WARN
    return Check(f"NATS {server}", status, answer)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return f"no answer in {PROBE_TIMEOUT_S:g} s"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _check_metrics_port(host: str, port: int) -> Check:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            return Check("metrics port", FAIL, f"cannot listen on {host}:{port} ({exc.strerror})",
                         "set KVBM_METRICS_PORT to a free port and KVBM_METRICS_HOST to an "
                         "address of this machine")
    scope = "every interface" if host in ("0.0.0.0", "::") else host
    return Check("metrics port", OK, f"port {port} is free on {scope}")


def _check_module(name: str, module: str, without: str, fix: str) -> Check:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised
        kind = "not installed" if isinstance(exc, ModuleNotFoundError) else f"fails to import ({exc})"
        return Check(name, WARN, f"{kind}: {without}", fix)
    version = getattr(mod, "__version__", None) or _dist_version(module)
    return Check(name, OK, f"importable{f' ({version})' if version else ''}")


def _dist_version(module: str) -> str | None:
    top = module.split(".")[0]
    for dist in importlib.metadata.packages_distributions().get(top, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None
