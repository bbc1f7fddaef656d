"""BlockManager (the planner): matching, loads, write-through stores, completions, failures.

A small in-test simulator plays the workers: tiers are dicts of slot -> content, GPU blocks
hold the hash of the KV they contain, jobs complete late and out of order, some fail.
"""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_core.events import BlockRemoved, BlockStored, ListSink
from kvbm_core.hashing import block_hashes
from kvbm_core.manager import BlockManager, TierSlots
from kvbm_core.transfer import JobResult

BS = 4


def make_manager(num_host=8, num_disk=0, **kwargs):
    tiers = [TierSlots("cpu", num_host)]
    if num_disk:
        tiers.append(TierSlots("disk", num_disk, stores_from=("cpu", "gpu")))
    return BlockManager(tiers, block_size=BS, **kwargs)


def run_prompt(manager, request_id, prompt, block_ids, num_device=0, results_ok=True):
    """Look up, load, schedule the whole prompt, complete every job; return (match, plan)."""
    match = manager.lookup(request_id, prompt, num_device, salt=1)
    manager.prepare_load(request_id, block_ids)
    computed = num_device + match.num_tokens
    manager.schedule(request_id, prompt, block_ids, computed, len(prompt) - computed, is_new=True)
    plan = manager.build_plan()
    manager.apply_results(0, [JobResult(j.job_id, results_ok, 10) for j in plan.jobs])
    return match, plan


def test_first_request_stores_full_blocks_only():
    manager = make_manager()
    _, plan = run_prompt(manager, 1, list(range(1, 15)), [0, 1, 2, 3])
    (job,) = plan.jobs
    assert (job.src, job.dst) == ("gpu", "cpu")
    assert job.src_ids == (0, 1, 2)  # 14 tokens: 3 full blocks, the partial one is never stored
    assert job.block_hashes == tuple(block_hashes(list(range(1, 15)), BS, 1))


def test_repeat_prompt_loads_from_host_and_leaves_one_token():
    manager = make_manager()
    prompt = list(range(1, 13))  # exactly 3 blocks
    run_prompt(manager, 1, prompt, [0, 1, 2])
    match = manager.lookup(2, prompt, 0, salt=1)
    assert match.num_tokens == 8  # the last block holds the last token: it is computed
    (job,) = manager.prepare_load(2, [5, 6, 7])
    assert (job.src, job.dst, job.dst_ids) == ("cpu", "gpu", (5, 6))


def test_device_hit_continues_in_host_and_misaligned_hit_matches_nothing():
    manager = make_manager()
    prompt = list(range(1, 18))
    run_prompt(manager, 1, prompt, [0, 1, 2, 3, 4])
    assert manager.lookup(2, prompt, 4, salt=1).num_tokens == 12
    manager.cancel(2)
    assert manager.lookup(3, prompt, 5, salt=1).num_tokens == 0


def test_different_salt_never_matches():
    manager = make_manager()
    prompt = list(range(1, 18))
    run_prompt(manager, 1, prompt, [0, 1, 2, 3, 4])
    assert manager.lookup(2, prompt, 0, salt=2).num_tokens == 0


def test_blocks_from_hits_are_not_stored_again():
    manager = make_manager()
    prompt = list(range(1, 18))
    run_prompt(manager, 1, prompt, [0, 1, 2, 3, 4])
    _, plan = run_prompt(manager, 2, prompt + [99, 98, 97, 96], [5, 6, 7, 8, 9, 10])
    stores = [j for j in plan.jobs if j.src == "gpu"]
    assert [j.src_ids for j in stores] == [(9,)]  # only the block after the prefix is new


def test_decode_steps_complete_and_store_blocks():
    manager = make_manager()
    prompt = list(range(1, 7))  # 1 full block + 2 tokens
    run_prompt(manager, 1, prompt, [0, 1])
    manager.schedule(1, [50], [], 6, 1)  # writes position 6
    assert manager.build_plan().jobs == ()
    manager.schedule(1, [51], [], 7, 1)  # writes position 7: block 1 (positions 4..7) complete
    (job,) = manager.build_plan().jobs
    assert job.src_ids == (1,)


def test_stores_wait_for_every_rank_and_failure_rolls_back():
    manager = make_manager(num_ranks=2)
    prompt = list(range(1, 10))
    manager.lookup(1, prompt, 0, salt=1)
    manager.schedule(1, prompt, [0, 1, 2], 0, 9, is_new=True)
    (job,) = manager.build_plan().jobs
    manager.apply_results(0, [JobResult(job.job_id, True, 10)])
    assert manager.finish(1) is True  # rank 1 has not written yet
    assert manager.lookup(2, prompt, 0, salt=1).num_tokens == 0
    manager.apply_results(1, [JobResult(job.job_id, False, error="EIO")])
    assert manager.lookup(3, prompt, 0, salt=1).num_tokens == 0
    assert manager.stats.counters["failed_transfers"] == 1
    assert manager.indexes["cpu"].num_used == 0


def test_duplicate_and_unknown_results_are_ignored():
    manager = make_manager(num_ranks=2)
    prompt = list(range(1, 10))
    manager.lookup(1, prompt, 0, salt=1)
    manager.schedule(1, prompt, [0, 1, 2], 0, 9, is_new=True)
    (job,) = manager.build_plan().jobs
    manager.apply_results(0, [JobResult(job.job_id, True), JobResult(job.job_id, True)])
    manager.apply_results(0, [JobResult(12345, True)])
    assert manager.lookup(2, prompt, 0, salt=1).num_tokens == 0


def test_finish_holds_blocks_while_a_load_is_in_flight():
    manager = make_manager()
    prompt = list(range(1, 14))
    run_prompt(manager, 1, prompt, [0, 1, 2, 3])
    assert manager.finish(1) is False
    manager.lookup(2, prompt, 0, salt=1)
    (job,) = manager.prepare_load(2, [4, 5, 6, 7])
    plan = manager.build_plan()
    assert plan.load_job_ids == {2: (job.job_id,)}
    assert manager.finish(2) is True  # cancelled mid-load: GPU blocks still being written
    manager.apply_results(0, [JobResult(job.job_id, True)])
    assert not manager.is_pending(2) and manager.num_requests == 0


def test_corrupt_block_leaves_the_index():
    manager = make_manager(num_disk=8)
    prompt = list(range(1, 14))
    run_prompt(manager, 1, prompt, [0, 1, 2, 3])
    run_prompt(manager, 9, [7] * 5, [9, 10])
    for job in manager.build_plan().jobs:  # host -> disk copies
        manager.apply_results(0, [JobResult(job.job_id, True)])
    manager.indexes["cpu"].clear()
    assert manager.lookup(2, prompt, 0, salt=1).num_disk_blocks == 3
    (job,) = manager.prepare_load(2, [4, 5, 6, 7])
    manager.build_plan()
    bad = job.block_hashes[1]
    manager.apply_results(0, [JobResult(job.job_id, False, error="checksum", bad_block_hashes=(bad,))])
    assert manager.stats.counters["corrupt_blocks"] == 1
    assert manager.lookup(3, prompt, 0, salt=1).num_disk_blocks == 1


def test_host_blocks_reach_disk_after_second_sighting_with_filter():
    from kvbm_core.admission import FrequencyFilter

    manager = make_manager(num_disk=8, admission=FrequencyFilter(threshold=2))
    prompt = list(range(1, 14))
    run_prompt(manager, 1, prompt, [0, 1, 2, 3])
    assert manager.build_plan().jobs == ()  # one sighting: not admitted to disk
    manager.lookup(2, prompt, 0, salt=1)
    jobs = manager.build_plan().jobs
    assert [(j.src, j.dst, j.num_blocks) for j in jobs] == [("cpu", "disk", 3)]


def test_events_report_stored_and_evicted_blocks():
    sink = ListSink()
    manager = make_manager(num_host=2, events=sink)
    run_prompt(manager, 1, list(range(1, 10)), [0, 1, 2])
    run_prompt(manager, 2, list(range(50, 59)), [3, 4, 5])
    stored = [e for e in sink.events if isinstance(e, BlockStored)]
    removed = [e for e in sink.events if isinstance(e, BlockRemoved)]
    assert [len(e.block_hashes) for e in stored] == [2, 2]
    assert stored[0].token_ids == tuple(range(1, 9)) and stored[0].medium == "cpu"
    assert removed and removed[0].block_hashes == stored[0].block_hashes


def test_pinned_tier_full_skips_stores_and_counts_them():
    manager = make_manager(num_host=2)
    prompt = list(range(1, 10))
    run_prompt(manager, 1, prompt, [0, 1, 2])
    manager.lookup(2, prompt, 0, salt=1)  # pins both host blocks
    manager.lookup(3, list(range(100, 110)), 0, salt=1)
    manager.schedule(3, list(range(100, 110)), [7, 8, 9], 0, 10, is_new=True)
    assert manager.build_plan().jobs == ()
    assert manager.stats.counters["store_skipped_full"] == 2


# ---- property test: a simulated cluster of workers --------------------------------------


class Workers:
    """Executes plans against dict storage, late and out of order; GPU blocks hold hashes."""

    def __init__(self, manager, rng, failure_rate):
        self.manager = manager
        self.rng = rng
        self.failure_rate = failure_rate
        self.tiers = {"cpu": {}, "disk": {}}
        self.gpu = {}
        self.in_flight = []
        self.chained = {}

    def submit(self, plan):
        for job in plan.jobs:
            if job.after_job_id is None:
                self.in_flight.append(job)
            else:  # a worker starts a chained job only once the job it follows succeeded
                self.chained.setdefault(job.after_job_id, []).append(job)

    def complete_some(self, everything=False):
        self.rng.shuffle(self.in_flight)
        count = len(self.in_flight) if everything else self.rng.randint(0, len(self.in_flight))
        done, self.in_flight = self.in_flight[:count], self.in_flight[count:]
        for job in done:
            ok = self.rng.random() >= self.failure_rate
            for chained in self.chained.pop(job.job_id, []):
                if ok:
                    self.in_flight.append(chained)
                else:
                    self.manager.apply_results(0, [JobResult(chained.job_id, False)])
            if ok:
                src = self.gpu if job.src == "gpu" else self.tiers[job.src]
                dst = self.gpu if job.dst == "gpu" else self.tiers[job.dst]
                for s, d in zip(job.src_ids, job.dst_ids, strict=True):
                    dst[d] = src[s]
            self.manager.apply_results(0, [JobResult(job.job_id, ok)])
        return done


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_host=st.integers(1, 12),
    num_disk=st.integers(0, 16),
    failure_rate=st.sampled_from([0.0, 0.2]),
)
def test_loads_only_deliver_blocks_wholly_held(seed, num_host, num_disk, failure_rate):
    rng = random.Random(seed)
    manager = make_manager(num_host=num_host, num_disk=num_disk)
    workers = Workers(manager, rng, failure_rate)
    prefixes = [[rng.randint(0, 50) for _ in range(rng.randint(4, 20))] for _ in range(3)]
    next_gpu = 0
    for request_id in range(25):
        prompt = rng.choice(prefixes) + [rng.randint(0, 50) for _ in range(rng.randint(0, 9))]
        hashes = block_hashes(prompt, BS, 1)
        num_device = BS * rng.randint(0, len(hashes)) if rng.random() < 0.2 else 0
        num_device = min(num_device, (len(prompt) - 1) // BS * BS)
        match = manager.lookup(request_id, prompt, num_device, salt=1)
        assert num_device + match.num_tokens < len(prompt), "must leave a token to compute"
        num_blocks = -(-len(prompt) // BS)
        block_ids = list(range(next_gpu, next_gpu + num_blocks))
        next_gpu += num_blocks
        for b in range(num_device // BS):
            workers.gpu[block_ids[b]] = hashes[b]  # device-reused blocks hold their KV
        jobs = manager.prepare_load(request_id, block_ids)
        workers.submit(manager.build_plan())
        workers.complete_some()
        loaded_ids = {d for j in jobs for d in j.dst_ids}
        while any(j in workers.in_flight for j in jobs):
            workers.complete_some(everything=True)
        failed = any(workers.gpu.get(d) is None for d in loaded_ids)
        for j in jobs:
            for gpu_id, expected in zip(j.dst_ids, j.block_hashes, strict=True):
                if gpu_id in workers.gpu:
                    assert workers.gpu[gpu_id] == expected, "loaded a block with the wrong KV"
        if failed:
            manager.finish(request_id)
            continue
        computed = num_device + match.num_tokens
        for b in range(len(prompt) // BS):
            workers.gpu.setdefault(block_ids[b], hashes[b])  # the forward pass computes the rest
        manager.schedule(request_id, prompt, block_ids, computed, len(prompt) - computed, is_new=True)
        workers.submit(manager.build_plan())
        workers.complete_some()
        manager.finish(request_id)
        for name, index in manager.indexes.items():
            assert index.num_used <= index.num_slots
            for block_hash in index.readable_hashes():
                assert workers.tiers[name][index.slot_of(block_hash)] == block_hash
    workers.complete_some(everything=True)
    workers.submit(manager.build_plan())
    workers.complete_some(everything=True)
