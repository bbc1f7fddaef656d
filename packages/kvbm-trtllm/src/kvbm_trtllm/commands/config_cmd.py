"""``kvbm config trtllm``: the TensorRT-LLM LLM API YAML that loads kvbm, and the env to set.

``trtllm_config(tokens_per_block=None, dynamo_names=False) -> dict``: the YAML's content
(``backend: pytorch``, block reuse on and partial reuse off, ``kv_connector_config`` naming
``kvbm_trtllm.connector``). ``kvbm_env(args) -> dict``: the ``KVBM_*`` variables for the chosen
options; they are checked with :class:`~kvbm_core.config.KvbmConfig`, so a bad value is an
error here rather than at engine start.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_trtllm.commands.common import UsageError

__all__ = ["trtllm_config", "kvbm_env", "add_parser", "run"]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "config", help="write engine configs that load kvbm (kvbm config trtllm)",
        description="Write engine configs that load kvbm.",
    )
    targets = parser.add_subparsers(dest="target", metavar="ENGINE", required=True)
    trt = targets.add_parser(
        "trtllm",
        help="TensorRT-LLM LLM API YAML for trtllm-serve --extra_llm_api_options",
        description="Write the LLM API YAML (for trtllm-serve --extra_llm_api_options) and print "
        "the KVBM_* environment variables to set.",
    )
    trt.add_argument("-o", "--output", type=Path, help="write the YAML here (default: stdout)")
    trt.add_argument("--cpu-cache-gb", type=float, default=None, help="host-memory tier size (GB)")
    trt.add_argument("--disk-cache-gb", type=float, default=None, help="disk tier size (GB)")
    trt.add_argument("--disk-cache-dir", default=None, help="disk tier directory (local NVMe)")
    trt.add_argument("--metrics-port", type=int, default=None,
                     help="serve Prometheus metrics on this port (sets KVBM_METRICS=1)")
    trt.add_argument("--tokens-per-block", type=int, default=None,
                     help="kv_cache_config.tokens_per_block (TensorRT-LLM's default: 32)")
    trt.add_argument("--dynamo-names", action="store_true",
                     help="use Dynamo's class names (DynamoKVBMConnectorLeader/Worker)")
    trt.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    parser.set_defaults(run=run)


def trtllm_config(tokens_per_block: int | None = None, dynamo_names: bool = False) -> dict[str, Any]:
    prefix = "DynamoKVBMConnector" if dynamo_names else "KvbmConnector"
    kv_cache: dict[str, Any] = {"enable_block_reuse": True, "enable_partial_reuse": False}
    if tokens_per_block is not None:
        kv_cache["tokens_per_block"] = tokens_per_block
    return {
        "backend": "pytorch",
        "kv_cache_config": kv_cache,
        "kv_connector_config": {
            "connector_module": "kvbm_trtllm.connector",
            "connector_scheduler_class": f"{prefix}Leader",
            "connector_worker_class": f"{prefix}Worker",
        },
    }


def kvbm_env(args: argparse.Namespace) -> dict[str, str]:
    env: dict[str, str] = {}
    if args.cpu_cache_gb is not None:
        env["KVBM_CPU_CACHE_GB"] = f"{args.cpu_cache_gb:g}"
    if args.disk_cache_gb is not None:
        env["KVBM_DISK_CACHE_GB"] = f"{args.disk_cache_gb:g}"
    if args.disk_cache_dir is not None:
        env["KVBM_DISK_CACHE_DIR"] = args.disk_cache_dir
    if args.metrics_port is not None:
        env["KVBM_METRICS"] = "1"
        env["KVBM_METRICS_PORT"] = str(args.metrics_port)
    if not env:
        env["KVBM_CPU_CACHE_GB"] = "4"  # without a host tier kvbm has nowhere to keep blocks
    try:
        KvbmConfig.from_env(env)
    except ConfigError as exc:
        raise UsageError(f"{exc} (from the command's options)") from None
    return env


def run(args: argparse.Namespace) -> int:
    if args.tokens_per_block is not None and args.tokens_per_block <= 0:
        raise UsageError(f"--tokens-per-block {args.tokens_per_block} must be positive (e.g. 32)")
    env = kvbm_env(args)
    text = yaml.safe_dump(trtllm_config(args.tokens_per_block, args.dynamo_names), sort_keys=False)
    if args.output is None:
        sys.stdout.write(text)
        note = sys.stderr
        target = "config.yaml"
    else:
        if args.output.exists() and not args.force:
            raise UsageError(f"{args.output} exists; pass --force to overwrite it")
        try:
            args.output.write_text(text)
        except OSError as exc:
            raise UsageError(f"cannot write {args.output}: {exc.strerror}") from None
        note = sys.stdout
        target = str(args.output)
        print(f"wrote {args.output}", file=note)
    print("\n# set these where trtllm-serve runs:", file=note)
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}", file=note)
    print(f"# then: trtllm-serve <model> --extra_llm_api_options {shlex.quote(target)}", file=note)
    return 0
