"""A kvbm worker rank in its own process, for the multi-process tests (run as a script).

It opens its control inbox, registers through etcd, waits for the barrier, takes the
leader's TierSizes over NATS, reports a batch of completions (one failed) and then holds its
registration until stdin closes (clean exit) or it is killed.
"""

from __future__ import annotations

import argparse
import sys

from kvbm_core import JobResult, KvbmConfig, KvLayout
from kvbm_discovery import Completions, InstanceInfo, TierSizes, make_etcd_services


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("--rank", "--num-workers", "--ttl"):
        parser.add_argument(name, type=int, required=True)
    for name in ("--etcd", "--nats", "--namespace"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    config = KvbmConfig.from_env(overrides={  # the secret comes in KVBM_CONTROL_SECRET
        "namespace": args.namespace, "discovery": "etcd", "etcd_endpoints": args.etcd,
        "nats_url": args.nats, "leader_worker_init_timeout_secs": 30,
    })  # fmt: skip
    services = make_etcd_services(config, lease_ttl_secs=args.ttl)
    inbox = services.control.worker_inbox(args.rank)
    layout = KvLayout(num_layers=2, tokens_per_block=4, num_kv_heads=2, head_dim=8)
    services.discovery.register(InstanceInfo(
        "worker", rank=args.rank, world_size=args.num_workers, bytes_per_block=layout.bytes_per_block,
        layout=layout,
    ))  # fmt: skip
    services.discovery.wait_for_peers(args.num_workers)
    sizes = inbox.get(timeout=30)
    if not isinstance(sizes, TierSizes):
        print(f"expected TierSizes, got {sizes!r}", flush=True)
        return 1
    results = (
        JobResult(100 * args.rank + 1, True, sizes.num_slots["cpu"] * layout.bytes_per_block),
        JobResult(100 * args.rank + 2, False, error=f"rank {args.rank}: disk full"),
    )
    services.control.send_to_leader(Completions(args.rank, results))
    print("reported", flush=True)
    sys.stdin.read()
    services.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
