"""Dynamo's disk admission filter: doubling counts, threshold, decay, bounded memory."""

from kvbm_core.admission import AlwaysAdmit, FrequencyFilter


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_second_sighting_is_admitted():
    policy = FrequencyFilter(threshold=2, clock=FakeClock())
    assert not policy.should_admit(7)
    assert policy.should_admit(7)
    assert policy.count(7) == 2


def test_counts_decay_by_one_per_period_and_zeros_are_forgotten():
    clock = FakeClock()
    policy = FrequencyFilter(threshold=2, decay_secs=600, clock=clock)
    policy.should_admit(1)
    policy.should_admit(1)
    policy.should_admit(1)  # 4
    policy.should_admit(2)  # 1
    clock.now = 601
    assert policy.count(1) == 3
    assert policy.count(2) == 0 and len(policy) == 1
    clock.now = 1801
    assert policy.count(1) == 1
    assert not policy.is_admitted(1)


def test_memory_is_bounded_and_keeps_hot_hashes():
    policy = FrequencyFilter(threshold=2, max_entries=10, clock=FakeClock())
    for _ in range(3):
        policy.should_admit(999)
    for block_hash in range(100):
        policy.should_admit(block_hash)
    assert len(policy) <= 10
    assert policy.count(999) == 4


def test_always_admit():
    assert AlwaysAdmit().should_admit(1) and AlwaysAdmit().is_admitted(2)
