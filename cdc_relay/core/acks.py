"""Which WAL position may be confirmed: transactions in commit order with their unacked counts.

Pure bookkeeping, no I/O. Invariants it keeps (DESIGN.md 1, 2, 4):
- the confirmed position is the end LSN of the newest transaction that is committed and fully
  acknowledged and whose predecessors are too; never past an unacknowledged event;
- it only moves forward;
- memory holds one small object per transaction that still has events in flight, not per event
  and not per transaction read: a transaction that completes behind an unfinished one is folded
  into it at once, so the queue is never longer than the number of events in flight.

A Transaction is also the delivery callback of its records (confluent-kafka calls it once per
record), so an acknowledgement costs one call and a few integer updates; where the relay's C
acknowledgement path runs (cdc_relay/adapters/_kafka_acks.c), it is the records' token instead,
and ``settle`` hands it its acknowledgements a run at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from cdc_relay.core.lsn import Lsn

# What a delivery callback is handed for a failed record, as plain values (see Failure).
FailureSink = Callable[["Transaction", Any, Any], None]


def record_size(value: bytes | None) -> int:
    """The bytes of a record that count against the in-flight bound: its value's, which is
    what a delivery report gives without a call (``len(msg)``); keys are short ids."""
    return len(value) if value else 0


class Transaction:
    """One source transaction: how many of its records Kafka has yet to acknowledge.

    Queued transactions form a doubly linked list in commit order (``prev``/``next``), so a
    transaction that completes in the middle is unlinked in O(1) and its end position handed
    to its predecessor (``confirm_to``).
    """

    __slots__ = (
        "commit_time",
        "committed",
        "confirm_to",
        "end_lsn",
        "final_lsn",
        "next",
        "pending",
        "prev",
        "tracker",
    )

    def __init__(self, tracker: AckTracker, final_lsn: Lsn, commit_time: int = 0) -> None:
        self.tracker = tracker
        self.final_lsn = final_lsn
        self.commit_time = commit_time
        self.end_lsn = Lsn(0)
        # What completing this transaction confirms: its own end, or a later one folded in.
        self.confirm_to = Lsn(0)
        self.pending = 0
        self.committed = False
        self.prev: Transaction | None = None
        self.next: Transaction | None = None

    def __call__(self, err: Any, msg: Any) -> None:
        """librdkafka's delivery report of one of this transaction's records."""
        tracker = self.tracker
        if err is None:
            tracker.in_flight_bytes -= len(msg)  # the value's length (record_size)
            tracker.in_flight_events -= 1
            self.pending -= 1
            if self.pending == 0 and self.committed:
                tracker._completed(self)
        else:
            tracker.on_failure(self, err, msg)

    def acked(self, events: int, size: int) -> None:
        """``events`` of this transaction's records acknowledged, ``size`` bytes of values in
        all: the reports counted outside Python (``settle``)."""
        tracker = self.tracker
        tracker.in_flight_bytes -= size
        tracker.in_flight_events -= events
        self.pending -= events
        if self.pending == 0 and self.committed:
            tracker._completed(self)

    def __repr__(self) -> str:
        return (
            f"Transaction(final_lsn={self.final_lsn}, end_lsn={self.end_lsn}, "
            f"pending={self.pending}, committed={self.committed})"
        )


def settle(acknowledged: list[tuple[object, int, int]]) -> None:
    """Acknowledgements counted in C by cdc_relay/adapters/_kafka_acks.c, which calls no
    callback per record: one (token, events, bytes) per token with records acknowledged, the
    token being the delivery callback the record was produced with. Compiled with the core, so
    the loop costs no interpreted frame either."""
    for token, events, size in acknowledged:
        if type(token) is Transaction:
            token.acked(events, size)
        else:  # another callback (the exactly-once progress record's): once per record
            callback = cast(Callable[[Any, Any], None], token)
            for _ in range(events):
                callback(None, None)


def _ignore_failure(txn: Transaction, err: Any, msg: Any) -> None:
    raise AssertionError("a delivery failure reached a tracker with no failure sink")


class AckTracker:
    """Tracks in-flight records per transaction and derives the confirmable position."""

    __slots__ = (
        "_confirmed",
        "_head",
        "_open",
        "_tail",
        "in_flight_bytes",
        "in_flight_events",
        "on_complete",
        "on_failure",
        "queued",
    )

    def __init__(
        self,
        confirmed: Lsn,
        *,
        on_failure: FailureSink = _ignore_failure,
        on_complete: Callable[[Transaction], None] | None = None,
    ) -> None:
        self._confirmed = confirmed
        self._open: Transaction | None = None
        # Committed transactions with records in flight, oldest first (a linked list).
        self._head: Transaction | None = None
        self._tail: Transaction | None = None
        self.queued = 0
        self.in_flight_events = 0
        self.in_flight_bytes = 0
        self.on_failure = on_failure
        # Called once per committed transaction whose last record is acknowledged after its
        # Commit was read (a latency observation); not for transactions without records.
        self.on_complete = on_complete

    @property
    def confirmed(self) -> Lsn:
        return self._confirmed

    @property
    def open(self) -> Transaction | None:
        return self._open

    @property
    def oldest(self) -> Lsn | None:
        """The commit position of the oldest transaction with records in flight, if any."""
        if self._head is not None:
            return self._head.final_lsn
        return self._open.final_lsn if self._open is not None and self._open.pending else None

    @property
    def idle(self) -> bool:
        """Nothing open, nothing in flight: the stream position itself may be confirmed."""
        return self._open is None and self._head is None

    def begin(self, final_lsn: Lsn, commit_time: int = 0) -> Transaction:
        if self._open is not None:
            raise ValueError("begin while a transaction is open")
        self._open = txn = Transaction(self, final_lsn, commit_time)
        return txn

    def sent(self, txn: Transaction, nbytes: int) -> None:
        """A record of ``txn`` was handed to the producer."""
        txn.pending += 1
        self.in_flight_events += 1
        self.in_flight_bytes += nbytes

    def acked(self, txn: Transaction, nbytes: int) -> None:
        """Kafka acknowledged one record of ``txn`` (the callback's path, for callers that
        have sizes rather than a message)."""
        if txn.pending <= 0:
            raise ValueError("more acknowledgements than records sent")
        self.in_flight_bytes -= nbytes
        self.in_flight_events -= 1
        txn.pending -= 1
        if txn.pending == 0 and txn.committed:
            self._completed(txn)

    def hold(self, txn: Transaction) -> None:
        """``txn`` waits for something that is not a Kafka record (a row kept from prune):
        it is pending like a record, but takes no room in the in-flight bounds, which count
        what the producer holds."""
        txn.pending += 1

    def release(self, txn: Transaction) -> None:
        """What ``hold`` waited for is done."""
        if txn.pending <= 0:
            raise ValueError("released more than was held")
        txn.pending -= 1
        if txn.pending == 0 and txn.committed:
            self._completed(txn)

    def resize(self, old_nbytes: int, new_nbytes: int) -> None:
        """A record in flight was replaced by one of another size (a dead-letter record)."""
        self.in_flight_bytes += new_nbytes - old_nbytes

    def abandon(self, txn: Transaction, nbytes: int) -> None:
        """A record of ``txn`` will never be acknowledged (refused, and the relay halts; or
        never produced): it no longer counts as in flight, but it stays pending in ``txn``,
        which therefore never completes: nothing from ``txn`` on is ever confirmed."""
        self.in_flight_events -= 1
        self.in_flight_bytes -= nbytes

    def commit(self, txn: Transaction, end_lsn: Lsn) -> None:
        if txn is not self._open:
            raise ValueError("commit of a transaction that is not open")
        self._open = None
        txn.end_lsn = txn.confirm_to = end_lsn
        txn.committed = True
        if txn.pending:
            self._append(txn)
            return
        tail = self._tail
        if tail is None:
            # Nothing in flight before or in it: confirmable now.
            if end_lsn > self._confirmed:
                self._confirmed = end_lsn
        else:
            # Done, but behind an unfinished one: completing that one confirms this too.
            tail.confirm_to = end_lsn

    def advance(self) -> Lsn:
        """The confirmable position (kept current as acknowledgements arrive)."""
        return self._confirmed

    def observe_idle_position(self, wal_end: Lsn) -> Lsn:
        """Idle advance: with nothing open or in flight, everything before ``wal_end`` that the
        server decoded has been handled, so the slot may move there (DESIGN.md, idle advance)."""
        if self._open is None and self._head is None and wal_end > self._confirmed:
            self._confirmed = wal_end
        return self._confirmed

    # ------------------------------------------------------------------ the queue

    def _append(self, txn: Transaction) -> None:
        tail = self._tail
        txn.prev = tail
        if tail is None:
            self._head = txn
        else:
            tail.next = txn
        self._tail = txn
        self.queued += 1

    def _completed(self, txn: Transaction) -> None:
        """``txn`` (queued) has its last record acknowledged."""
        prev, nxt = txn.prev, txn.next
        if prev is None:
            # The oldest unfinished transaction: everything up to what it carries is done.
            if txn.confirm_to > self._confirmed:
                self._confirmed = txn.confirm_to
            self._head = nxt
        else:
            prev.confirm_to = txn.confirm_to
            prev.next = nxt
        if nxt is None:
            self._tail = prev
        else:
            nxt.prev = prev
        txn.prev = txn.next = None
        self.queued -= 1
        if self.on_complete is not None:
            self.on_complete(txn)
