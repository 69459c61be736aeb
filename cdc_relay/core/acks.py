"""Which WAL position may be confirmed: transactions in commit order with their unacked counts.

Pure bookkeeping, no I/O. Invariants it keeps (DESIGN.md 1, 2, 4):
- the confirmed position is the end LSN of the newest transaction that is committed and fully
  acknowledged and whose predecessors are too; never past an unacknowledged event;
- it only moves forward;
- memory holds one small object per transaction with events in flight, not per event.
"""

from __future__ import annotations

from collections import deque

from cdc_relay.core.lsn import Lsn


class Transaction:
    """One source transaction: how many of its records Kafka has yet to acknowledge."""

    __slots__ = ("committed", "end_lsn", "final_lsn", "pending")

    def __init__(self, final_lsn: Lsn) -> None:
        self.final_lsn = final_lsn
        self.end_lsn = Lsn(0)
        self.pending = 0
        self.committed = False

    def __repr__(self) -> str:
        return (
            f"Transaction(final_lsn={self.final_lsn}, end_lsn={self.end_lsn}, "
            f"pending={self.pending}, committed={self.committed})"
        )


class AckTracker:
    """Tracks in-flight records per transaction and derives the confirmable position."""

    __slots__ = ("_confirmed", "_open", "_queue", "in_flight_bytes", "in_flight_events")

    def __init__(self, confirmed: Lsn) -> None:
        self._confirmed = confirmed
        self._open: Transaction | None = None
        # Committed transactions that still have records in flight, oldest first.
        self._queue: deque[Transaction] = deque()
        self.in_flight_events = 0
        self.in_flight_bytes = 0

    @property
    def confirmed(self) -> Lsn:
        return self._confirmed

    @property
    def idle(self) -> bool:
        """Nothing open, nothing in flight: the stream position itself may be confirmed."""
        return self._open is None and not self._queue

    def begin(self, final_lsn: Lsn) -> Transaction:
        if self._open is not None:
            raise ValueError("begin while a transaction is open")
        self._open = Transaction(final_lsn)
        return self._open

    def sent(self, txn: Transaction, nbytes: int) -> None:
        """A record of ``txn`` was handed to the producer."""
        txn.pending += 1
        self.in_flight_events += 1
        self.in_flight_bytes += nbytes

    def acked(self, txn: Transaction, nbytes: int) -> None:
        """Kafka acknowledged one record of ``txn`` (on its topic or on the dead-letter topic)."""
        if txn.pending <= 0:
            raise ValueError("more acknowledgements than records sent")
        txn.pending -= 1
        self.in_flight_events -= 1
        self.in_flight_bytes -= nbytes

    def resize(self, old_nbytes: int, new_nbytes: int) -> None:
        """A record in flight was replaced by one of another size (a dead-letter record)."""
        self.in_flight_bytes += new_nbytes - old_nbytes

    def commit(self, txn: Transaction, end_lsn: Lsn) -> None:
        if txn is not self._open:
            raise ValueError("commit of a transaction that is not open")
        self._open = None
        txn.end_lsn = end_lsn
        txn.committed = True
        if txn.pending == 0 and not self._queue:
            # Nothing in flight before or in it: confirmable now, no need to queue it.
            self._confirmed = max(self._confirmed, end_lsn)
            return
        self._queue.append(txn)

    def advance(self) -> Lsn:
        """Confirm every leading transaction that is fully acknowledged; return the position."""
        queue = self._queue
        while queue and queue[0].pending == 0:
            end = queue.popleft().end_lsn
            if end > self._confirmed:
                self._confirmed = end
        return self._confirmed

    def observe_idle_position(self, wal_end: Lsn) -> Lsn:
        """Idle advance: with nothing open or in flight, everything before ``wal_end`` that the
        server decoded has been handled, so the slot may move there (DESIGN.md, idle advance)."""
        if self.idle and wal_end > self._confirmed:
            self._confirmed = wal_end
        return self._confirmed
