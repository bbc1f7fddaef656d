"""``kvbm events``: print the KV events kvbm leaders publish on NATS, as they come.

Subscribes to ``kvbm.<namespace>.events.*`` (or one worker's subject) through
:class:`~kvbm_discovery.nats_events.NatsEventListener` and prints one line per event (or one
JSON batch per line with ``--json``), until ``--count`` events, ``--timeout`` seconds without
an event, or Ctrl-C. The URL and namespace default to ``KVBM_NATS_URL`` / ``KVBM_NAMESPACE``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from kvbm_core.config import ConfigError
from kvbm_trtllm.commands.common import CommandError, UsageError, load_config

__all__ = ["format_event", "add_parser", "run"]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "events", help="print the KV events published on NATS (BlockStored / BlockRemoved ...)",
        description="Subscribe to kvbm's KV event subject on NATS and print events as they come.",
    )
    parser.add_argument("--url", help="NATS server(s), e.g. nats://127.0.0.1:4222 (default: KVBM_NATS_URL)")
    parser.add_argument("--namespace", help="kvbm namespace (default: KVBM_NAMESPACE or 'kvbm')")
    parser.add_argument("--worker-id", help="only this publisher's events (default: all)")
    parser.add_argument("--count", type=int, default=None, help="stop after this many events")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop after this many seconds without an event")
    parser.add_argument("--json", action="store_true", help="print each batch as one JSON line")
    parser.set_defaults(run=run)


def format_event(worker_id: str, seq: int, wire: dict[str, Any]) -> str:
    kind = wire.get("type", "?")
    hashes = wire.get("block_hashes") or []
    parts = [f"{time.strftime('%H:%M:%S')}", f"{worker_id}#{seq}", f"{kind:<16}", f"{wire.get('medium', '-'):<9}"]
    if hashes:
        shown = ", ".join(str(h) for h in hashes[:3]) + (f", ... ({len(hashes)} blocks)" if len(hashes) > 3 else "")
        parts.append(f"[{shown}]")
    if kind == "BlockStored":
        parts.append(f"parent={wire.get('parent_block_hash')} tokens={len(wire.get('token_ids') or [])}")
        if wire.get("lora_name"):
            parts.append(f"lora={wire['lora_name']}")
    return "  ".join(parts)


def run(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise UsageError(f"--count {args.count} must be >= 1")
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout} must be > 0 seconds")
    overrides = {k: v for k, v in (("nats_url", args.url), ("namespace", args.namespace)) if v}
    config = load_config(overrides)
    if not config.nats_url:
        raise UsageError("no NATS server: pass --url nats://host:4222 or set KVBM_NATS_URL")
    from kvbm_discovery.errors import ServiceUnavailableError
    from kvbm_discovery.nats_events import NatsEventListener

    try:
        listener = NatsEventListener(config, args.worker_id)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    except ServiceUnavailableError as exc:
        raise CommandError(str(exc)) from None
    print(f"listening on {listener.subject} at {config.nats_url}", file=sys.stderr, flush=True)
    try:
        num_events = _print_events(listener, args)
    finally:
        listener.close()
    print(f"{num_events} event(s)", file=sys.stderr)
    return 0


def _print_events(listener: Any, args: argparse.Namespace) -> int:
    num_events = 0
    while args.count is None or num_events < args.count:
        batch = listener.get(timeout=args.timeout if args.timeout is not None else 1.0)
        if batch is None:
            if args.timeout is not None:
                break
            continue
        events = [e.to_wire() for e in batch.events]
        if args.count is not None:
            events = events[: args.count - num_events]
        if args.json:
            print(json.dumps({"namespace": batch.namespace, "worker_id": batch.worker_id,
                              "seq": batch.seq, "events": events}), flush=True)
        else:
            for wire in events:
                print(format_event(batch.worker_id, batch.seq, wire), flush=True)
        num_events += len(events)
    return num_events
