"""The scheduled-events mover's decisions (cdc_relay.core.schedule): how long it sleeps, how it
backs off, and what a naive deliver_at gets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone, tzinfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_relay.core.schedule import (
    HELD_BACK_RETRY,
    MAX_RETRY_WAIT,
    WAKE_MARGIN,
    ScheduledStats,
    count_held,
    next_wait,
    require_aware,
    retry_wait,
)


def test_an_aware_deliver_at_is_taken_as_it_is():
    when = datetime(2026, 12, 1, 9, 30, tzinfo=timezone(timedelta(hours=2)))
    assert require_aware(when) is when
    assert require_aware(datetime.now(UTC)).tzinfo is UTC


class _NoOffset(tzinfo):
    """A tzinfo that knows no offset: as naive as no tzinfo at all."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None


@pytest.mark.parametrize(
    "naive", [datetime(2026, 12, 1, 9, 30), datetime(2026, 12, 1, tzinfo=_NoOffset())]
)
def test_a_naive_deliver_at_is_refused_with_the_fix_in_the_message(naive: datetime):
    with pytest.raises(ValueError, match=r"timezone-aware.*datetime\.now\(UTC\)"):
        require_aware(naive)


def test_sleeps_until_the_next_deliver_at_when_it_comes_before_the_interval():
    assert next_wait(next_due_in=0.25, interval=1.0, moved=3, batch=500) == 0.25 + WAKE_MARGIN


def test_never_sleeps_past_the_interval_so_late_scheduled_rows_wait_at_most_that():
    assert next_wait(next_due_in=3600.0, interval=1.0, moved=0, batch=500) == 1.0
    assert next_wait(next_due_in=None, interval=2.5, moved=0, batch=500) == 2.5


def test_a_full_batch_means_more_may_be_due_so_the_next_pass_comes_at_once():
    assert next_wait(next_due_in=-5.0, interval=1.0, moved=500, batch=500) == 0.0
    assert next_wait(next_due_in=None, interval=1.0, moved=500, batch=500) == 0.0


def test_rows_due_that_the_pass_could_not_move_are_retried_soon_then_less_often():
    # Moved some, more due (committed just after the pass's snapshot): look again at once.
    held = count_held(0, moved=7, next_due_in=-0.1)
    assert held == 0
    assert next_wait(next_due_in=-0.1, interval=1.0, moved=7, batch=500, held_passes=held) == 0.0
    # Passes that move nothing while a row stays due (locked by another transaction): back off
    # from HELD_BACK_RETRY, doubling, up to the interval; no busy loop.
    waits = []
    held = 0
    for _ in range(10):
        held = count_held(held, moved=0, next_due_in=-0.1)
        waits.append(
            next_wait(next_due_in=-0.1, interval=1.0, moved=0, batch=500, held_passes=held)
        )
    assert waits[0] == HELD_BACK_RETRY
    assert waits == sorted(waits)
    assert waits[-1] == 1.0
    # Once it moves again, the count starts over.
    assert count_held(held, moved=1, next_due_in=-0.1) == 0
    assert count_held(held, moved=0, next_due_in=3.0) == 0
    assert count_held(held, moved=0, next_due_in=None) == 0


@given(
    next_due_in=st.one_of(st.none(), st.floats(-1e6, 1e6)),
    interval=st.floats(0.001, 3600),
    moved=st.integers(0, 1000),
    batch=st.integers(1, 1000),
    held=st.integers(0, 10_000),
)
def test_every_wait_is_between_zero_and_the_interval(
    next_due_in: float | None, interval: float, moved: int, batch: int, held: int
):
    wait = next_wait(
        next_due_in=next_due_in, interval=interval, moved=moved, batch=batch, held_passes=held
    )
    assert 0.0 <= wait <= interval
    if next_due_in is not None and next_due_in > 0 and moved < batch:
        # never wakes before the next deliver_at unless the interval says so
        assert wait >= min(interval, next_due_in)


def test_an_interval_of_zero_is_refused():
    with pytest.raises(ValueError, match="interval"):
        next_wait(next_due_in=None, interval=0.0, moved=0, batch=1)


def test_failures_back_off_from_the_interval_doubling_to_a_cap():
    assert [retry_wait(n, 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert retry_wait(50, 1.0) == MAX_RETRY_WAIT
    assert retry_wait(1_000_000, 0.5) == MAX_RETRY_WAIT
    # An interval above the cap is still the least wait: never faster than the healthy loop.
    assert retry_wait(1, 60.0) == 60.0
    with pytest.raises(ValueError):
        retry_wait(0, 1.0)


def test_a_sample_records_the_counts_and_no_negative_age():
    stats = ScheduledStats()
    assert (stats.scheduled, stats.due, stats.sampled_unix) == (0, 0, 0.0)
    stats.sampled(scheduled=10, due=3, overdue=1, oldest_due_age_seconds=7.5, now_unix=100.0)
    assert (stats.scheduled, stats.due, stats.overdue) == (10, 3, 1)
    assert stats.oldest_due_age_seconds == 7.5
    assert stats.sampled_unix == 100.0
    # The oldest row is not due yet (its age is negative), or the table is empty (None).
    stats.sampled(scheduled=10, due=0, overdue=0, oldest_due_age_seconds=-30.0, now_unix=101.0)
    assert stats.oldest_due_age_seconds == 0.0
    stats.sampled(scheduled=0, due=0, overdue=0, oldest_due_age_seconds=None, now_unix=102.0)
    assert stats.oldest_due_age_seconds == 0.0
