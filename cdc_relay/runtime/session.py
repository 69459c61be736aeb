"""One replication session: the driver of the pipeline. It reads CopyData frames from the
replication stream, feeds them to the pipeline (cdc_relay/core/pipeline.py), and carries out
what the pipeline decides: produce records, send status updates, record kept rows, purge and
drain for a reset, finish. It decides nothing itself.

The stream and the publisher are duck-typed (the real adapters, or the simulations of the
property tests), and so are the stop flag and the clock.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from cdc_relay.core.acks import Transaction
from cdc_relay.core.lsn import Lsn, format_lsn
from cdc_relay.core.mapping import OutboxRecord
from cdc_relay.core.pipeline import (
    Action,
    BeginTransaction,
    CommitTransaction,
    Finish,
    Keep,
    Notice,
    Pipeline,
    Produce,
    Reconnect,
    Reset,
    SendStatus,
    State,
)
from cdc_relay.errors import (
    DeliveryError,
    HaltedOnBadRow,
    ProduceInterrupted,
    RecordRefused,
    ReplicationError,
)

log = logging.getLogger(__name__)

READ_BATCH = 2_000
# How long a quiet stream is waited on (seconds). With records in flight the wait is short:
# librdkafka's acknowledgements cannot wake the select, so they are served only after it.
# 5 ms cost 3.4 ms of median latency at 1,000 events/s against 2 ms, and no measurable CPU
# (docs/performance.md, "Latency").
WAIT_IN_FLIGHT = 0.002
WAIT_IDLE = 0.1


class Stream(Protocol):
    def read(self) -> memoryview | bytes | None: ...

    def wait(self, timeout: float) -> None: ...

    def send_status(self, *, flushed: Lsn, reply_requested: bool = False) -> None: ...


class Producer(Protocol):
    def produce(
        self,
        record: OutboxRecord,
        on_delivery: Callable[[Any, Any], None],
        while_waiting: Callable[[], bool] = ...,
    ) -> None: ...

    # The producer's own produce(topic, value, key, partition, callback, on_delivery,
    # timestamp, headers), which raises when it cannot take a record at once: what
    # Pipeline.pump hands plain records to (adapters/kafka.py, Publisher.enqueue).
    @property
    def enqueue(self) -> Callable[..., object]: ...

    def poll(self, timeout: float = 0.0) -> int: ...

    def outstanding(self) -> int: ...

    def purge_queue(self) -> None: ...

    # Exactly-once only (adapters/kafka.py, Publisher with a transactional.id).
    def begin_transaction(self) -> None: ...

    def commit_transaction(self, while_waiting: Callable[[], bool]) -> None: ...

    def abort_transaction(self, while_waiting: Callable[[], bool]) -> None: ...


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


# The cause of a ReplicationError for a connection the pipeline presumed dead.
_PRESUMED_DEAD = ConnectionAbortedError("no answer from the server")


def _ignore_report(err: Any, msg: Any) -> None:
    """The progress record's delivery report: its fate is the commit's."""


def _no_keeper(action: Keep) -> None:
    raise RuntimeError("this session cannot record kept rows")


class Session:
    """Drives one Pipeline over one replication connection until it finishes or fails."""

    def __init__(
        self,
        *,
        pipeline: Pipeline,
        stream: Stream,
        publisher: Producer,
        stop: StopFlag,
        clock: Callable[[], float] = time.monotonic,
        keeper: Callable[[Keep], None] = _no_keeper,
        on_acks_flowing: Callable[[], None] = lambda: None,
    ) -> None:
        self.pipeline = pipeline
        self.stream = stream
        self.publisher = publisher
        self.stop = stop
        self.clock = clock
        self.keeper = keeper
        self.on_acks_flowing = on_acks_flowing
        self.finished = False
        self._todo: deque[Action] = deque()
        self._performing = False
        # The record produced alone and not yet judged (its verdict is its own).
        self._alone: Produce | None = None
        self._slot = pipeline.config.slot_name

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        try:
            while self.step():
                pass
        except (HaltedOnBadRow, DeliveryError):
            raise
        except ReplicationError as exc:
            if exc.__cause__ is _PRESUMED_DEAD:
                raise  # nobody listens: no last status update
            with contextlib.suppress(Exception):
                self.stream.send_status(flushed=self.pipeline.confirmed)
            raise
        except Exception:
            # Keep what was acknowledged (fewer duplicates on replay), if the server still
            # listens; the original error is what matters.
            with contextlib.suppress(Exception):
                self.stream.send_status(flushed=self.pipeline.confirmed)
            raise

    def step(self) -> bool:
        """One turn: serve delivery reports, act on the pipeline's decisions, read a batch of
        frames. False once the session is over."""
        try:
            return self._step()
        except DeliveryError:
            self._learn_from_what_is_left()
            raise

    def _step(self) -> bool:
        pipeline, publisher = self.pipeline, self.publisher
        self.perform(())  # anything queued while waiting for room in the producer
        publisher.poll(0)
        if pipeline.has_failures:
            self.perform(pipeline.judge())
        now = self.clock()
        pipeline.stats.heartbeat = now  # the loop is alive (adapters/http.py, /healthz)
        if self.stop.is_set():
            pipeline.stop()
        self.perform(pipeline.tick(now))
        if self.finished:
            return False
        if pipeline.state is State.DRAINING:
            if publisher.outstanding() == 0:
                raise DeliveryError(pipeline.reset_reason)
            publisher.poll(0.01)
            return True
        if not pipeline.reading:
            # Backpressure, or stopping: leave the socket unread (the server buffers).
            publisher.poll(0.01)
            return True
        self.read_batch()
        return True

    def read_batch(self) -> None:
        """Read and handle up to READ_BATCH frames: Pipeline.pump does the plain inserts; what
        it stops at (actions, a record the producer did not take at once) is done here."""
        pipeline, stream = self.pipeline, self.stream
        pump, read, enqueue = pipeline.pump, stream.read, self.publisher.enqueue
        tracker, config = pipeline.tracker, pipeline.config
        processed = 0
        while processed < READ_BATCH:
            processed += pump(read, enqueue, READ_BATCH - processed)
            held = pipeline.held
            if held is None:
                break  # nothing buffered, the in-flight bounds, or the batch is full
            out = held.out
            if type(out) is OutboxRecord:
                # The producer did not take it at once: the careful way (waiting for room,
                # judging a refusal).
                delivery = pipeline.delivery
                assert delivery is not None
                self._produce_record(out, delivery, frame=held.frame)
            else:
                self.perform(out)  # type: ignore[arg-type]
            if pipeline.state is not State.STREAMING:
                return  # a halt or a stop: not one frame more
            if (
                tracker.in_flight_events >= config.max_in_flight_events
                or tracker.in_flight_bytes >= config.max_in_flight_bytes
            ):
                break
        if processed:
            pipeline.received(self.clock())
            return
        # Nothing buffered: commit what is complete (exactly-once) before waiting.
        idle = pipeline.idle(self.clock())
        if idle:
            self.perform(idle)
            return
        stream.wait(WAIT_IN_FLIGHT if tracker.in_flight_events else WAIT_IDLE)

    def while_queue_full(self) -> bool:
        """Called while produce() waits for room (and while settling): keep the server
        informed; anything else the clock brings is done after. False to give up."""
        now = self.clock()
        self.pipeline.stats.heartbeat = now
        for action in self.pipeline.tick(now):
            if type(action) is SendStatus:
                self._send_status(action)
            else:
                self._todo.append(action)
        return not self.stop.is_set()

    # ------------------------------------------------------------------ actions

    def perform(self, actions: Iterable[Action]) -> None:
        """Carry out ``actions`` in order (and whatever they lead to)."""
        todo = self._todo
        for action in actions:
            todo.append(action)
        if self._performing:
            return
        self._performing = True
        try:
            while todo:
                self._do(todo.popleft())
        finally:
            self._performing = False

    def _do(self, action: Action) -> None:
        pipeline = self.pipeline
        if type(action) is Produce:
            if action.alone:
                self._produce_alone(action)
            else:
                self._produce(action)
        elif type(action) is SendStatus:
            self._send_status(action)
        elif type(action) is Notice:
            lsn = format_lsn(action.lsn) if action.lsn is not None else None
            log.log(action.level, "%s", action.message, extra=self._fields(lsn))
        elif type(action) is Keep:
            self.keeper(action)
            pipeline.kept(action.delivery)
        elif type(action) is Reset:
            log.debug("reset: %s", action.reason, extra=self._fields(None))
            # Whatever was decided before the reset (a commit, a produce) is void: the session
            # ends as soon as the producer is settled.
            self._todo.clear()
            if pipeline.kafka is not None:
                # Exactly-once: abort the Kafka transaction, so that nothing of it is visible.
                self.publisher.abort_transaction(self.while_queue_full)
            else:
                # Nothing queued may reach Kafka after the replay starts: purge what librdkafka
                # has not sent; what is in flight is waited for (step) before the session ends.
                self.publisher.purge_queue()
        elif type(action) is BeginTransaction:
            self.publisher.begin_transaction()
        elif type(action) is CommitTransaction:
            self._commit_transaction(action)
        elif type(action) is Finish:
            self._finish(action)
        elif type(action) is Reconnect:
            raise ReplicationError(action.reason) from _PRESUMED_DEAD
        else:  # pragma: no cover - the union is exhaustive
            raise TypeError(f"unknown action {action!r}")

    def _produce(self, action: Produce) -> None:
        self._produce_record(action.record, action.delivery, lsn=action.lsn, source=action.source)

    def _produce_record(
        self,
        record: OutboxRecord,
        delivery: Transaction,
        *,
        frame: bytes | memoryview | None = None,
        lsn: Lsn | None = None,
        source: str | None = None,
    ) -> bool:
        """Hand ``record`` to the producer, waiting for room; a refusal goes to the pipeline
        (its event's position: ``lsn`` and ``source``, or read from ``frame``), a stop request
        while waiting stops it. True if the record is in flight."""
        pipeline = self.pipeline
        try:
            self.publisher.produce(record, delivery, self.while_queue_full)
        except RecordRefused as refused:
            self.perform(
                pipeline.refused(
                    record,
                    delivery,
                    str(refused),
                    too_large=refused.too_large,
                    frame=frame,
                    lsn=lsn,
                    source=source,
                )
            )
            return False
        except ProduceInterrupted:
            pipeline.not_produced(record, delivery)
            pipeline.stop()
            return False
        return True

    def _produce_alone(self, action: Produce) -> None:
        """Produce with nothing else in flight before or after, so that the broker's verdict on
        it is its own (pipeline.py, isolation)."""
        pipeline = self.pipeline
        if not self.settle() or pipeline.state is State.DRAINING:
            pipeline.not_produced(action.record, action.delivery)
            return
        if pipeline.has_failures:
            # Reports of earlier records came in while waiting: judge them first (not alone).
            self._todo.appendleft(action)
            self._todo.extendleft(reversed(pipeline.judge()))
            return
        if not self._produce_record(
            action.record, action.delivery, lsn=action.lsn, source=action.source
        ):
            return
        self._alone = action
        self.settle()
        self._alone = None
        self._todo.extendleft(reversed(pipeline.judge(alone=action)))

    def _learn_from_what_is_left(self, deadline_s: float = 30.0) -> None:
        """The session ends on a producer failure: serve the reports still to come (a fatal
        error fails every record the producer holds, at once) and judge them, so that what they
        say about single records (a batch refused, a record refused alone) is remembered for
        the replay. What the verdicts would produce now is dropped with the session."""
        publisher, pipeline = self.publisher, self.pipeline
        deadline = self.clock() + deadline_s
        while publisher.outstanding() > 0 and self.clock() < deadline:
            with contextlib.suppress(DeliveryError):
                publisher.poll(0.05)
        if pipeline.has_failures:
            for action in pipeline.judge(alone=self._alone):
                if type(action) is Reset:
                    log.warning("%s", action.reason, extra=self._fields(None))

    def _commit_transaction(self, action: CommitTransaction) -> None:
        """Exactly-once: the progress record, then the commit (which waits for every record of
        the transaction). A failed commit is aborted (TransactionAborted, a DeliveryError): the
        session ends and the next one replays from the recorded position."""
        publisher = self.publisher
        publisher.produce(action.record, _ignore_report, self.while_queue_full)
        publisher.commit_transaction(self.while_queue_full)
        self.pipeline.transaction_committed(action.progress)
        if self.pipeline.has_failures:
            # Reports that came with the commit: a committed transaction had none that failed.
            self.perform(self.pipeline.judge())

    def settle(self) -> bool:
        """Serve delivery reports until nothing is in flight, keeping the server informed.
        False if stop was requested meanwhile."""
        publisher = self.publisher
        while publisher.outstanding() > 0:
            if self.stop.is_set():
                return False
            publisher.poll(0.05)
            self.while_queue_full()
        return True

    def _send_status(self, action: SendStatus) -> None:
        self.stream.send_status(flushed=action.lsn, reply_requested=action.reply_requested)
        if action.moved:
            lsn = format_lsn(action.lsn)
            log.debug("confirmed slot=%s lsn=%s", self._slot, lsn, extra=self._fields(lsn))
            if self.pipeline.stats.published:
                self.on_acks_flowing()

    def _finish(self, action: Finish) -> None:
        self.finished = True
        self.stream.send_status(flushed=action.lsn)
        stats = self.pipeline.stats
        lsn = format_lsn(action.lsn)
        if action.unacknowledged > 0 and action.halt is None:
            log.warning(
                "shutdown: %d events still unacknowledged after %.0f s; they will be sent "
                "again on restart",
                action.unacknowledged,
                self.pipeline.config.shutdown_timeout,
                extra=self._fields(lsn),
            )
        log.info(
            "stopped slot=%s confirmed lsn=%s published=%d dead_lettered=%d",
            self._slot,
            lsn,
            stats.published,
            stats.dead_lettered,
            extra=self._fields(lsn),
        )
        if action.halt is not None:
            raise HaltedOnBadRow(action.halt, lsn=action.halt_lsn)

    def _fields(self, lsn: str | None) -> dict[str, str]:
        return {"slot": self._slot} if lsn is None else {"slot": self._slot, "lsn": lsn}


def settle_publisher(
    publisher: Producer, stop: StopFlag, beat: Callable[[], None], *, purge: bool = True
) -> None:
    """Before a replay (a new session after a failure): nothing queued in the producer may
    reach Kafka after the replay's records. Purge what it has not sent and wait until what it
    sent is answered (acknowledged or failed), or stop is requested."""
    if purge:
        publisher.purge_queue()
    while publisher.outstanding() > 0 and not stop.is_set():
        beat()
        publisher.poll(0.05)
