"""``kvbm events`` against a real nats-server: what a kvbm leader publishes is printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from kvbm_core.config import KvbmConfig
from kvbm_core.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvbm_discovery.nats_events import NatsEventSink

EVENTS = [
    BlockStored("cpu", (111, 222), None, tuple(range(8)), 4),
    BlockRemoved("cpu", (111,)),
    AllBlocksCleared("disk"),
]


def _start_listener(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVBM_", "DYN_KVBM_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvbm_trtllm.cli", "events", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    # Publish only once subscribed: NATS does not keep messages for late subscribers.
    line = proc.stderr.readline()
    assert line.startswith("listening on"), line + proc.stderr.read()
    return proc


def _publish(nats_url: str, namespace: str) -> None:
    sink = NatsEventSink(KvbmConfig(nats_url=nats_url, namespace=namespace), "leader")
    deadline = time.monotonic() + 5
    while not sink.is_connected and time.monotonic() < deadline:
        time.sleep(0.01)
    sink.publish(EVENTS)
    sink.close()
    assert sink.stats().num_sent == len(EVENTS)


def test_events_prints_what_a_leader_publishes(nats_url):
    proc = _start_listener("--url", nats_url, "--namespace", "clitest", "--count", "3", "--timeout", "20")
    try:
        _publish(nats_url, "clitest")
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert "BlockStored" in lines[0] and "CPU_TIER1" in lines[0] and "111, 222" in lines[0]
    assert "tokens=8" in lines[0]
    assert "BlockRemoved" in lines[1] and "[111]" in lines[1]
    assert "AllBlocksCleared" in lines[2] and "CPU_TIER2" in lines[2]
    assert "3 event(s)" in err


def test_events_json_and_namespace_isolation(nats_url):
    proc = _start_listener("--url", nats_url, "--namespace", "mine", "--json", "--timeout", "2")
    try:
        _publish(nats_url, "other")  # another namespace: not ours
        _publish(nats_url, "mine")
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    batches = [json.loads(line) for line in out.strip().splitlines()]
    assert {b["namespace"] for b in batches} == {"mine"}
    assert [e["type"] for b in batches for e in b["events"]] == [
        "BlockStored", "BlockRemoved", "AllBlocksCleared",
    ]


def test_events_without_a_server_or_url_fails_clearly(kvbm, unused_port):
    result = kvbm("events", "--url", f"nats://127.0.0.1:{unused_port}", "--timeout", "1")
    assert result.code == 1
    assert f"127.0.0.1:{unused_port}" in result.err and "NATS" in result.err
    result = kvbm("events")
    assert result.code == 2 and "KVBM_NATS_URL" in result.err
    result = kvbm("events", "--url", "nats://127.0.0.1:4222", "--count", "0")
    assert result.code == 2 and "--count" in result.err
