"""TierIndex: allocation, readiness, pins, eviction order, rollback, removal, restore."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvbm_core.index import TierIndex


def stored(index, hashes, priorities=None):
    allocation = index.prepare_store(hashes, priorities)
    index.complete_store(allocation.block_hashes, success=True)
    return allocation


def test_pending_block_is_not_matchable_until_complete():
    index = TierIndex("cpu", 4)
    allocation = index.prepare_store([1, 2])
    assert allocation.slots == (0, 1)
    assert index.match_prefix([1, 2]) == 0
    index.complete_store([1, 2], success=True)
    assert index.match_prefix([1, 2, 3]) == 2


def test_failed_store_rolls_back_and_frees_slots():
    index = TierIndex("cpu", 2)
    index.prepare_store([1, 2])
    index.complete_store([1, 2], success=False)
    assert index.num_free == 2
    assert 1 not in index
    assert index.prepare_store([3, 4]).slots == (0, 1)


def test_eviction_takes_least_recently_released_first():
    index = TierIndex("cpu", 3)
    stored(index, [1, 2, 3])
    slots = index.pin([1])
    index.unpin(slots)  # 1 is now the most recently released
    allocation = index.prepare_store([4, 5])
    assert allocation.evicted_hashes == (2, 3)
    assert index.match_prefix([1]) == 1


def test_eviction_takes_lowest_priority_first():
    index = TierIndex("cpu", 3)
    stored(index, [1, 2, 3], priorities=[50, 10, 90])
    assert index.prepare_store([4]).evicted_hashes == (2,)
    assert index.prepare_store([5]).evicted_hashes == (1,)


def test_pinned_and_pending_blocks_are_never_evicted():
    index = TierIndex("cpu", 2)
    stored(index, [1])
    index.pin([1])
    index.prepare_store([2])  # pending
    assert index.prepare_store([3]) is None
    assert index.prepare_store([3]) is None


def test_store_of_held_hash_is_skipped_not_duplicated():
    index = TierIndex("cpu", 4)
    stored(index, [1])
    allocation = index.prepare_store([1, 2, 2])
    assert allocation.block_hashes == (2,)


def test_full_tier_reports_skipped_hashes():
    index = TierIndex("cpu", 1)
    index.prepare_store([1])
    assert index.prepare_store([2, 3]) is None
    index.complete_store([1], success=True)
    allocation = index.prepare_store([2, 3])
    assert allocation.block_hashes == (2,) and allocation.skipped_hashes == (3,)


def test_pin_of_unreadable_block_raises_and_pins_nothing():
    index = TierIndex("cpu", 2)
    stored(index, [1])
    with pytest.raises(KeyError):
        index.pin([1, 9])
    assert index.prepare_store([2, 3]).evicted_hashes == (1,)


def test_unpin_of_unpinned_slot_raises():
    index = TierIndex("cpu", 2)
    stored(index, [1])
    with pytest.raises(KeyError):
        index.unpin([0])


def test_removed_pinned_block_stops_matching_and_frees_on_unpin():
    index = TierIndex("cpu", 1)
    stored(index, [1])
    slots = index.pin([1])
    assert index.remove([1]) == [1]
    assert index.match_prefix([1]) == 0
    assert index.prepare_store([2]) is None  # slot still being read
    index.unpin(slots)
    assert index.prepare_store([2]).slots == (0,)


def test_restore_seeds_readable_blocks_and_ignores_bad_slots():
    index = TierIndex("disk", 3)
    index.restore({10: 2, 11: 7, 12: 2, 13: 0})
    assert index.slot_of(10) == 2 and index.slot_of(13) == 0
    assert 11 not in index and 12 not in index
    assert index.prepare_store([14]).slots == (1,)


class IndexMachine(RuleBasedStateMachine):
    """Random operation sequences against a model of what the index must guarantee."""

    def __init__(self):
        super().__init__()
        self.index = TierIndex("t", 4)
        self.pending: set[int] = set()
        self.ready: set[int] = set()
        self.pins: dict[int, list[int]] = {}  # hash -> slots pinned
        self.next_hash = 1

    @rule(count=st.integers(1, 3))
    def store(self, count):
        hashes = list(range(self.next_hash, self.next_hash + count))
        self.next_hash += count
        before_ready = set(self.ready)
        allocation = self.index.prepare_store(hashes)
        if allocation is None:
            return
        for evicted in allocation.evicted_hashes:
            assert evicted in before_ready, "evicted a block that was not readable"
            assert not self.pins.get(evicted), "evicted a pinned block"
            self.ready.discard(evicted)
        self.pending.update(allocation.block_hashes)

    @precondition(lambda self: self.pending)
    @rule(success=st.booleans(), data=st.data())
    def complete(self, success, data):
        block_hash = data.draw(st.sampled_from(sorted(self.pending)))
        self.index.complete_store([block_hash], success)
        self.pending.discard(block_hash)
        if success:
            self.ready.add(block_hash)

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def pin(self, data):
        block_hash = data.draw(st.sampled_from(sorted(self.ready)))
        self.pins.setdefault(block_hash, []).extend(self.index.pin([block_hash]))

    @precondition(lambda self: any(self.pins.values()))
    @rule(data=st.data())
    def unpin(self, data):
        block_hash = data.draw(st.sampled_from(sorted(h for h, s in self.pins.items() if s)))
        self.index.unpin([self.pins[block_hash].pop()])

    @invariant()
    def capacity_never_exceeded(self):
        assert self.index.num_used <= self.index.num_slots
        assert len(self.pending) + len(self.ready) <= self.index.num_slots

    @invariant()
    def only_ready_blocks_match(self):
        for block_hash in self.pending:
            assert self.index.match_prefix([block_hash]) == 0
        for block_hash in self.ready:
            assert self.index.match_prefix([block_hash]) == 1


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=1, max_size=12, unique=True))
def test_eviction_order_follows_release_order(release_order):
    index = TierIndex("t", len(release_order))
    stored(index, release_order)
    for block_hash in release_order:  # re-release in the given order
        index.unpin(index.pin([block_hash]))
    allocation = index.prepare_store([1000 + i for i in range(len(release_order))])
    assert list(allocation.evicted_hashes) == release_order


def test_slot_failing_repeatedly_is_retired_and_capacity_shrinks():
    from kvbm_core.index import MAX_SLOT_FAILURES

    index = TierIndex("disk", 2)
    for attempt in range(MAX_SLOT_FAILURES):
        allocation = index.prepare_store([100 + attempt])
        assert allocation.slots == (0,)
        index.complete_store(allocation.block_hashes, success=False)
    assert index.retired_slots == {0}
    assert index.prepare_store([1]).slots == (1,)
    assert index.prepare_store([2]) is None  # one usable slot left, now pending
    assert index.num_used == 1
