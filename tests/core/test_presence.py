"""Shared tiers (G4): the leader learns blocks other engines stored, and its index there is a
presence cache (forgetting an entry publishes nothing; the block stays in the store)."""

from __future__ import annotations

from kvbm_core.events import BlockRemoved, BlockStored, ListSink
from kvbm_core.hashing import block_hashes
from kvbm_core.manager import BlockManager, TierSlots
from kvbm_core.transfer import JobResult

BS = 4
SALT = 7


class StoreContents:
    """A shared store's contents as a presence source (what another engine put there)."""

    def __init__(self) -> None:
        self.held: set[int] = set()
        self.asked: list[list[int]] = []

    def query(self, block_hashes):
        self.asked.append(list(block_hashes))
        return {h for h in block_hashes if h in self.held}

    def close(self) -> None:
        pass


def make_manager(store, num_cache=4, events=None):
    tiers = [TierSlots("cpu", 8), TierSlots("mooncake", num_cache, presence=store)]
    return BlockManager(tiers, BS, events=events)


def test_blocks_another_engine_stored_are_matched_and_loaded_from_the_shared_tier():
    store = StoreContents()
    prompt = list(range(17))
    hashes = block_hashes(prompt, BS, SALT)
    store.held.update(hashes[:3])  # engine A stored the first three blocks
    manager = make_manager(store)
    match = manager.lookup(1, prompt, 0, SALT)
    assert match.num_tokens == 3 * BS and match.num_blocks_by_tier == {"mooncake": 3}
    jobs = manager.prepare_load(1, list(range(5)))
    assert [(j.src, j.dst, j.block_hashes) for j in jobs] == [("mooncake", "gpu", tuple(hashes[:3]))]
    assert manager.stats.counters["shared_presence_hits"] == 3


def test_only_blocks_no_tier_holds_are_asked_about_and_only_a_prefix_is_cached():
    store = StoreContents()
    prompt = list(range(21))
    hashes = block_hashes(prompt, BS, SALT)
    store.held.update([hashes[0], hashes[2]])  # a gap at block 1: block 2 can never match
    manager = make_manager(store)
    assert manager.lookup(1, prompt, 0, SALT).num_tokens == BS
    assert store.asked == [hashes[:5]]
    assert hashes[0] in manager.indexes["mooncake"] and hashes[2] not in manager.indexes["mooncake"]
    manager.lookup(2, prompt, 0, SALT)
    assert store.asked[-1] == hashes[1:5], "a cached block is not asked about again"


def test_a_block_missing_at_load_leaves_the_cache():
    store = StoreContents()
    prompt = list(range(9))
    hashes = block_hashes(prompt, BS, SALT)
    store.held.update(hashes[:2])
    manager = make_manager(store)
    manager.lookup(1, prompt, 0, SALT)
    (job,) = manager.prepare_load(1, list(range(3)))
    manager.build_plan()
    manager.apply_results(0, [JobResult(job.job_id, False, error="missing", bad_block_hashes=(hashes[1],))])
    assert hashes[1] not in manager.indexes["mooncake"] and hashes[0] in manager.indexes["mooncake"]


def test_stores_publish_the_shared_medium_and_forgetting_an_entry_publishes_nothing():
    sink = ListSink()
    store = StoreContents()
    manager = make_manager(store, num_cache=2, events=sink)
    prompt = list(range(13))
    manager.lookup(1, prompt, 0, SALT)
    manager.schedule(1, prompt, [0, 1, 2, 3], 0, len(prompt), is_new=True)
    plan = manager.build_plan()
    manager.apply_results(0, [JobResult(j.job_id, True, 10) for j in plan.jobs])
    stored = [e for e in sink.events if isinstance(e, BlockStored) and e.medium == "mooncake"]
    assert stored and stored[0].to_wire()["medium"] == "MOONCAKE"
    # A second prompt evicts presence entries (2 of them): no BlockRemoved for the shared tier.
    other = list(range(100, 113))
    manager.lookup(2, other, 0, SALT)
    manager.schedule(2, other, [4, 5, 6, 7], 0, len(other), is_new=True)
    plan = manager.build_plan()
    manager.apply_results(0, [JobResult(j.job_id, True, 10) for j in plan.jobs])
    removed = [e for e in sink.events if isinstance(e, BlockRemoved) and e.medium == "mooncake"]
    assert removed == []
