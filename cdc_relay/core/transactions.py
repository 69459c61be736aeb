"""Exactly-once delivery: which PostgreSQL transactions go into the open Kafka transaction,
when it is committed, what position its progress record carries, and what a replay drops.

Kafka transactions cover whole PostgreSQL transactions, batched by time and size; a PostgreSQL
transaction larger than ``max_events`` is split, its progress record then naming how many of
its events are committed (core/progress.py). The slot is confirmed only up to what a committed
Kafka transaction covers: the progress topic is the truth, the slot a WAL-retention bookmark.

Pure, owned by the pipeline (core/pipeline.py), which calls it at transaction boundaries and
ticks, never per event. ``counted`` is the pipeline's running count of outbox events handed to
the producer (one record each, on its topic or the dead-letter topic).
"""

from __future__ import annotations

from dataclasses import dataclass

from cdc_relay.core.lsn import Lsn
from cdc_relay.core.progress import Progress


@dataclass(frozen=True, slots=True)
class TransactionLimits:
    max_events: int = 20_000  # per Kafka transaction: past it, commit (and split if need be)
    max_seconds: float = 0.1  # a Kafka transaction stays open at most this long (at a boundary)


class KafkaTransaction:
    """The state of one session's Kafka transactions."""

    __slots__ = (
        "_batch_end",
        "_done_in_txn",
        "_kafka_counted",
        "_pg_counted",
        "_pg_final_lsn",
        "_started_at",
        "committed",
        "committing",
        "dropping",
        "limits",
        "open",
        "progress",
        "to_skip",
    )

    def __init__(self, limits: TransactionLimits, progress: Progress | None, start: Lsn) -> None:
        self.limits = limits
        # What Kafka holds, as far as this session knows: the last progress record.
        self.progress = progress
        # The position the slot may be confirmed to (never past a committed Kafka transaction).
        self.committed = max(start, progress.lsn) if progress is not None else start
        self.open = False  # a Kafka transaction is open (BeginTransaction decided)
        self.committing = False  # its commit is decided and not answered yet
        self._started_at = 0.0
        self._kafka_counted = 0  # ``counted`` when the Kafka transaction began
        self._batch_end: Lsn | None = None  # end of the last PG transaction wholly in it
        # The PostgreSQL transaction being read: its commit LSN, ``counted`` at its Begin, and
        # how many of its events were committed in Kafka before (in an earlier session, or an
        # earlier Kafka transaction of this one when it was split).
        self._pg_final_lsn: Lsn | None = None
        self._pg_counted = 0
        self._done_in_txn = 0
        self.dropping = False  # the whole PostgreSQL transaction is committed already
        self.to_skip = 0  # so many of its first events are

    # ------------------------------------------------------------------ PostgreSQL side

    def begin(self, final_lsn: Lsn, counted: int) -> None:
        progress = self.progress
        self._pg_final_lsn = final_lsn
        self._pg_counted = counted
        self.dropping = progress is not None and progress.covers(final_lsn)
        self.to_skip = 0 if progress is None or self.dropping else progress.done_in(final_lsn)
        self._done_in_txn = self.to_skip

    def skipped(self) -> None:
        """One event of the transaction was dropped as already committed."""
        self.to_skip -= 1

    def end(self, end_lsn: Lsn) -> None:
        """The PostgreSQL transaction being read committed at ``end_lsn``."""
        self._pg_final_lsn = None
        self._done_in_txn = 0
        self.dropping = False
        self.to_skip = 0
        if self.open:
            self._batch_end = end_lsn
        elif end_lsn > self.committed:
            # Nothing of it (or of anything before it) waits in an open Kafka transaction:
            # dropped, empty, or without outbox events.
            self.committed = end_lsn

    def idle_position(self, wal_end: Lsn) -> None:
        """A keepalive with nothing open anywhere: the stream's position may be confirmed."""
        if not self.open and self._pg_final_lsn is None and wal_end > self.committed:
            self.committed = wal_end

    @property
    def at_boundary(self) -> bool:
        """No PostgreSQL transaction is being read."""
        return self._pg_final_lsn is None

    # ------------------------------------------------------------------ Kafka side

    def began(self, now: float, counted: int) -> None:
        self.open = True
        self._started_at = now
        self._kafka_counted = counted

    def due(self, now: float, counted: int, *, idle: bool = False) -> bool:
        """Whether to commit now: a Kafka transaction is open, and it holds enough events, or
        it has been open long enough (or the stream is idle) at a boundary."""
        if not self.open or self.committing:
            return False
        if counted - self._kafka_counted >= self.limits.max_events:
            return True
        return self.at_boundary and (idle or now - self._started_at >= self.limits.max_seconds)

    def progress_to_commit(self, counted: int) -> Progress:
        """The progress record of the Kafka transaction about to be committed."""
        full = self._batch_end if self._batch_end is not None else self.committed
        if self._pg_final_lsn is None:
            return Progress(Lsn(full))
        in_this = counted - max(self._kafka_counted, self._pg_counted)
        return Progress(Lsn(full), self._pg_final_lsn, self._done_in_txn + in_this)

    def committed_as(self, progress: Progress) -> None:
        """The Kafka transaction with ``progress`` is committed."""
        self.progress = progress
        if progress.lsn > self.committed:
            self.committed = progress.lsn
        self.open = self.committing = False
        self._batch_end = None
        if self._pg_final_lsn is not None:
            # Split inside a PostgreSQL transaction: its next events go in the next Kafka
            # transaction, which counts from its own start.
            self._done_in_txn = progress.events
