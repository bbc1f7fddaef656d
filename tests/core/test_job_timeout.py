"""Jobs some rank never reports fail at their deadline, as a reported failure would fail them.

A fake clock drives the deadlines; one rank of two answers, the other stays silent.
"""

from kvbm_core.manager import BlockManager, TierSlots
from kvbm_core.transfer import JobResult

BS = 4
TIMEOUT = 10.0
PROMPT = list(range(1, 14))  # 3 full blocks + 1 token


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_manager(clock, num_ranks=2, num_host=8):
    return BlockManager(
        [TierSlots("cpu", num_host)], BS, num_ranks=num_ranks, clock=clock,
        job_timeout_secs=TIMEOUT,
    )


def store(manager, request_id, prompt, block_ids):
    manager.lookup(request_id, prompt, 0, salt=1)
    manager.schedule(request_id, prompt, block_ids, 0, len(prompt), is_new=True)
    (job,) = manager.build_plan().jobs
    return job


def past_deadline(manager, clock):
    clock.now += TIMEOUT + 1.0
    return manager.fail_late_jobs()


def test_a_store_a_rank_never_reports_is_rolled_back_and_a_late_ok_is_ignored():
    clock = Clock()
    manager = make_manager(clock)
    job = store(manager, 1, PROMPT, [0, 1, 2, 3])
    manager.apply_results(0, [JobResult(job.job_id, True)])
    clock.now += TIMEOUT - 1.0
    assert manager.fail_late_jobs() == [] and manager.num_pending_jobs == 1
    assert past_deadline(manager, clock) == [job.job_id]
    assert manager.num_pending_jobs == 0 and manager.finish(1) is False
    assert manager.stats.counters["timed_out_jobs"] == 1
    assert manager.stats.counters["failed_transfers"] == 1
    assert manager.indexes["cpu"].num_used == 0, "slots come back"
    assert manager.indexes["cpu"].retired_slots == set(), "a silent rank is not a bad slot"
    manager.apply_results(1, [JobResult(job.job_id, True)])  # the lost report, late
    assert manager.lookup(2, PROMPT, 0, salt=1).num_tokens == 0, "never matchable"
    manager.cancel(2)
    again = store(manager, 3, PROMPT, [4, 5, 6, 7])
    for rank in (0, 1):
        manager.apply_results(rank, [JobResult(again.job_id, True)])
    assert manager.lookup(4, PROMPT, 0, salt=1).num_tokens == 12, "stored again, by every rank"


def test_a_load_a_rank_never_reports_is_recomputed_without_retry_and_unpinned():
    clock = Clock()
    manager = make_manager(clock, num_host=3)
    stored = store(manager, 1, PROMPT, [0, 1, 2, 3])
    for rank in (0, 1):
        manager.apply_results(rank, [JobResult(stored.job_id, True)])
    manager.finish(1)
    assert manager.lookup(2, PROMPT, 0, salt=1).num_tokens == 12
    (load,) = manager.prepare_load(2, [4, 5, 6, 7])
    manager.build_plan()
    manager.apply_results(0, [JobResult(load.job_id, True)])
    assert past_deadline(manager, clock) == [load.job_id]
    (outcome,) = manager.take_load_outcomes()
    assert outcome.retry_jobs == () and outcome.recompute_from_token == 0
    assert manager.stats.counters["failed_loads"] == 1
    assert not manager.is_pending(2)
    # Unpinned: a new prompt may evict every block the load was reading.
    other = store(manager, 3, list(range(50, 63)), [8, 9, 10, 11])
    assert other.num_blocks == 3 and manager.stats.counters["store_skipped_full"] == 0


def test_only_sent_jobs_have_a_deadline_and_none_means_never():
    clock = Clock()
    manager = make_manager(clock)
    manager.lookup(1, PROMPT, 0, salt=1)
    manager.schedule(1, PROMPT, [0, 1, 2, 3], 0, len(PROMPT), is_new=True)
    assert past_deadline(manager, clock) == [], "queued, not sent yet"
    (job,) = manager.build_plan().jobs
    assert past_deadline(manager, clock) == [job.job_id]

    patient = BlockManager([TierSlots("cpu", 8)], BS, clock=clock)
    store(patient, 1, PROMPT, [0, 1, 2, 3])
    assert past_deadline(patient, clock) == [] and patient.num_pending_jobs == 1
