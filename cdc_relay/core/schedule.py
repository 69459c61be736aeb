"""The scheduled-events mover's decisions, without I/O: when a scheduled time is acceptable, how
long to wait before the next pass, and what the mover reports.

The mover (cdc_relay.runtime.scheduler) asks the database two things per pass: move what is due
(at most one batch), and how far away the next scheduled time is. Everything it then decides,
how long to sleep, how to back off after an error, is here, so that it is tested without a
server or a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

# After a pass that moved nothing although a row is due (a row another transaction holds
# locked, a row held back behind an earlier one of its aggregate, or one that committed just
# after the pass's snapshot), the next pass comes after this many seconds, doubling on each
# such pass up to the interval: quick for a row that has just become visible, quiet for a row
# that stays locked.
HELD_BACK_RETRY: Final = 0.02

# Sleeping exactly until a deliver_at can wake a hair before it (timer granularity, the
# server's clock read a little later): wake this much after it instead of making an empty pass.
WAKE_MARGIN: Final = 0.001

# The longest wait after failures (connection lost, a statement refused), whatever the interval.
MAX_RETRY_WAIT: Final = 30.0


def require_aware(deliver_at: datetime) -> datetime:
    """``deliver_at`` itself when it names an instant; ValueError for a naive datetime, which
    PostgreSQL would read in the session's TimeZone setting, a silent shift of hours."""
    if deliver_at.tzinfo is None or deliver_at.utcoffset() is None:
        raise ValueError(
            "deliver_at must be a timezone-aware datetime (e.g. datetime.now(UTC) + "
            f"timedelta(hours=1)), not the naive {deliver_at.isoformat()}: PostgreSQL would "
            "read it in the session's TimeZone"
        )
    return deliver_at


def next_wait(
    *,
    next_due_in: float | None,
    interval: float,
    moved: int,
    batch: int,
    held_passes: int = 0,
) -> float:
    """Seconds to wait before the next pass.

    ``next_due_in``: seconds from now (the server's clock) to the earliest deliver_at still in
    the table, negative when it is past, None when the table is empty. ``moved``: rows the pass
    just moved, ``batch`` its limit. ``held_passes``: consecutive passes, this one included,
    that moved nothing while a row was due.

    A full batch means more may be due: no wait. Otherwise the mover sleeps until the next
    deliver_at, but never longer than ``interval``, which bounds how late a row scheduled (or
    committed) during the sleep can be, and is the period of the stats.
    """
    if interval <= 0:
        raise ValueError("interval must be positive")
    if moved >= batch:
        return 0.0
    if next_due_in is None:
        return interval
    if next_due_in <= 0:
        if held_passes <= 0:
            return 0.0  # the pass moved rows and more are due: look again at once
        return min(interval, HELD_BACK_RETRY * 2.0 ** min(held_passes - 1, 30))
    return min(interval, next_due_in + WAKE_MARGIN)


def count_held(previous: int, *, moved: int, next_due_in: float | None) -> int:
    """``held_passes`` for next_wait after a pass: one more when it moved nothing although a row
    is due, else 0."""
    if moved == 0 and next_due_in is not None and next_due_in <= 0:
        return previous + 1
    return 0


def retry_wait(failures: int, interval: float) -> float:
    """Seconds to wait after ``failures`` consecutive failed passes (1 for the first): the
    interval, doubling, capped at MAX_RETRY_WAIT (and never below the interval)."""
    if failures < 1:
        raise ValueError("failures counts from 1")
    return max(interval, min(MAX_RETRY_WAIT, interval * 2.0 ** min(failures - 1, 30)))


@dataclass(slots=True)
class ScheduledStats:
    """What the mover reports (metrics, logs). The table's counts are sampled (``sampled_unix``,
    0 before the first sample); the counters count since the mover started.

    Written by the mover's thread only; a reader in another thread tolerates a value that is one
    update old (as RelayStats).
    """

    # Rows in the scheduled table (not yet moved), due or not.
    scheduled: int = 0
    # Rows whose deliver_at has passed: the next passes move them.
    due: int = 0
    # Due rows past their deliver_at by more than the overdue threshold: the mover is behind,
    # failing, or the rows are held (locked by another transaction, or waiting behind an earlier
    # row of their aggregate).
    overdue: int = 0
    # How far past its deliver_at the oldest due row is, in seconds; 0.0 when none is due.
    oldest_due_age_seconds: float = 0.0
    sampled_unix: float = 0.0
    # Rows moved into the outbox (each exactly once: the move deletes and inserts in one
    # transaction).
    moved_total: int = 0
    # Passes that failed (connection, statement), and the last failure's one-line description.
    errors_total: int = 0
    last_error: str | None = None

    def sampled(
        self,
        *,
        scheduled: int,
        due: int,
        overdue: int,
        oldest_due_age_seconds: float | None,
        now_unix: float,
    ) -> None:
        """Record one sample of the table."""
        self.scheduled = scheduled
        self.due = due
        self.overdue = overdue
        self.oldest_due_age_seconds = max(0.0, oldest_due_age_seconds or 0.0)
        self.sampled_unix = now_unix
