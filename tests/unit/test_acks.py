"""The ack tracker: never confirm past an unacked event; only forward; idle advance."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_relay.core.acks import AckTracker
from cdc_relay.core.lsn import Lsn


def test_confirms_a_transaction_only_when_all_its_records_are_acked():
    t = AckTracker(Lsn(100))
    txn = t.begin(Lsn(150))
    t.sent(txn, 10)
    t.sent(txn, 10)
    t.commit(txn, Lsn(200))
    assert t.advance() == 100
    t.acked(txn, 10)
    assert t.advance() == 100
    t.acked(txn, 10)
    assert t.advance() == 200
    assert (t.in_flight_events, t.in_flight_bytes) == (0, 0)


def test_a_later_acked_transaction_waits_for_an_earlier_one():
    t = AckTracker(Lsn(0))
    first = t.begin(Lsn(10))
    t.sent(first, 1)
    t.commit(first, Lsn(20))
    second = t.begin(Lsn(30))
    t.sent(second, 1)
    t.commit(second, Lsn(40))
    t.acked(second, 1)
    assert t.advance() == 0
    t.acked(first, 1)
    assert t.advance() == 40


def test_an_open_transaction_is_never_confirmed_even_when_acked():
    t = AckTracker(Lsn(0))
    txn = t.begin(Lsn(10))
    t.sent(txn, 1)
    t.acked(txn, 1)
    assert t.advance() == 0
    assert not t.idle


def test_a_transaction_without_records_is_confirmable_at_commit():
    t = AckTracker(Lsn(5))
    txn = t.begin(Lsn(10))
    t.commit(txn, Lsn(20))
    assert t.advance() == 20


def test_idle_advance_only_when_nothing_is_open_or_in_flight():
    t = AckTracker(Lsn(100))
    assert t.observe_idle_position(Lsn(500)) == 500
    txn = t.begin(Lsn(600))
    assert t.observe_idle_position(Lsn(700)) == 500
    t.sent(txn, 1)
    t.commit(txn, Lsn(800))
    assert t.observe_idle_position(Lsn(900)) == 500
    t.acked(txn, 1)
    assert t.advance() == 800
    assert t.observe_idle_position(Lsn(900)) == 900


def test_never_moves_backwards():
    t = AckTracker(Lsn(1000))
    assert t.observe_idle_position(Lsn(10)) == 1000
    txn = t.begin(Lsn(5))
    t.commit(txn, Lsn(6))
    assert t.advance() == 1000


def test_resize_adjusts_in_flight_bytes():
    t = AckTracker(Lsn(0))
    txn = t.begin(Lsn(1))
    t.sent(txn, 1000)
    t.resize(1000, 10)
    t.acked(txn, 10)
    assert t.in_flight_bytes == 0


# A random history: transactions with record counts, acks arriving in any order, keepalives
# sprinkled in. Invariant: the confirmed position never passes the commit of a transaction
# with an unacked record, and it never decreases.
@st.composite
def histories(draw):
    sizes = draw(st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=12))
    records = [(txn, r) for txn, n in enumerate(sizes) for r in range(n)]
    ack_order = draw(st.permutations(records))
    cut = draw(st.integers(min_value=0, max_value=len(ack_order)))
    keepalive_points = draw(
        st.lists(st.integers(min_value=0, max_value=len(ack_order)), max_size=5)
    )
    return sizes, list(ack_order[:cut]), set(keepalive_points)


@settings(max_examples=300, deadline=None)
@given(histories())
def test_confirmed_never_passes_an_unacked_record(history):
    sizes, acks, keepalive_points = history
    t = AckTracker(Lsn(0))
    txns = []
    lsn = 0
    for n in sizes:
        txn = t.begin(Lsn(lsn + 1))
        for _ in range(n):
            t.sent(txn, 1)
        lsn += 10
        t.commit(txn, Lsn(lsn))
        txns.append(txn)
    acked_count = [0] * len(sizes)
    previous = t.confirmed
    for step, (index, _record) in enumerate(acks):
        if step in keepalive_points:
            t.observe_idle_position(Lsn(lsn + 5))
        t.acked(txns[index], 1)
        acked_count[index] += 1
        confirmed = t.advance()
        assert confirmed >= previous
        previous = confirmed
        for i, n in enumerate(sizes):
            if acked_count[i] < n:
                assert confirmed < txns[i].end_lsn
                break
    # Once everything is acked, everything is confirmable.
    if len(acks) == sum(sizes):
        assert t.advance() == lsn
        assert t.idle


def test_the_queue_holds_only_transactions_with_records_in_flight():
    """Bug 3: every commit queued behind a pending transaction, even those with nothing in
    flight, so a stuck partition (or a stream of empty transactions) grew memory without bound
    and backpressure never engaged."""
    t = AckTracker(Lsn(0))
    stuck = t.begin(Lsn(10))
    t.sent(stuck, 1)
    t.commit(stuck, Lsn(20))
    lsn = 100
    for _ in range(10_000):
        empty = t.begin(Lsn(lsn))
        t.commit(empty, Lsn(lsn + 1))  # an empty transaction (PostgreSQL < 15 sends them)
        acked = t.begin(Lsn(lsn + 2))
        t.sent(acked, 1)
        t.commit(acked, Lsn(lsn + 3))
        t.acked(acked, 1)  # acknowledged at once, behind the stuck one
        lsn += 10
        assert t.queued <= 2
    assert t.queued == 1 and t.confirmed == 0
    t.acked(stuck, 1)
    assert t.confirmed == lsn - 10 + 3 and t.queued == 0


def test_a_transaction_completing_in_the_middle_hands_its_position_to_its_predecessor():
    t = AckTracker(Lsn(0))
    txns = []
    for i in range(3):
        txn = t.begin(Lsn(10 * i + 5))
        t.sent(txn, 1)
        t.commit(txn, Lsn(10 * i + 9))
        txns.append(txn)
    t.acked(txns[1], 1)
    assert (t.queued, t.confirmed) == (2, 0)
    t.acked(txns[0], 1)
    assert (t.queued, t.confirmed) == (1, 19)
    t.acked(txns[2], 1)
    assert (t.queued, t.confirmed) == (0, 29)


def test_an_abandoned_record_blocks_its_transaction_for_good():
    t = AckTracker(Lsn(0))
    txn = t.begin(Lsn(10))
    t.sent(txn, 5)
    t.abandon(txn, 5)
    t.commit(txn, Lsn(20))
    assert (t.in_flight_events, t.in_flight_bytes, t.confirmed) == (0, 0, 0)
    later = t.begin(Lsn(30))
    t.commit(later, Lsn(40))
    assert t.confirmed == 0
