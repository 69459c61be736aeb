"""Simulated I/O for the pipeline's property tests: a walsender that streams a WAL of outbox
transactions, and a producer that behaves like librdkafka's idempotent producer with the
relay's settings, with a broker behind it. The real Session (the driver) and the real Pipeline
run against them, restarted the way runtime/relay.py restarts them.

What the producer model assumes of librdkafka (the relay's configuration makes it so):
- per partition, records are sent in produce order, in batches; a batch lands whole or fails
  whole (broker-side size limits apply to the batch);
- ``enable.gapless.guarantee``: a batch that fails for good makes the producer fatal, and
  every record it still holds fails too, so no later record of the partition lands after a gap;
- ``message.timeout.ms=0``: nothing times out; retriable errors are retried inside librdkafka,
  invisible to the relay (here: a response that simply has not come yet);
- purge(in_queue) drops what was not sent (reported as purged); what is in flight is answered;
- a delivery report is served by poll(), which counts in len() until then.
"""

from __future__ import annotations

import contextlib
import random
import uuid
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cdc_relay.core import verdicts
from cdc_relay.core.mapping import Headers, OutboxRecord
from cdc_relay.core.pipeline import Memory, Pipeline, PipelineConfig
from cdc_relay.core.progress import Progress
from cdc_relay.core.stats import RelayStats
from cdc_relay.errors import (
    DeliveryError,
    HaltedOnBadRow,
    PrerequisiteError,
    ProducerFatal,
    RecordRefused,
    ReplicationError,
    TransactionAborted,
)
from cdc_relay.runtime.session import Session
from tests import frames

DEAD_LETTER_TOPIC = "outbox.dead-letter"
PROGRESS_TOPIC = "cdc-relay.progress"
TOPIC = "outbox.event.order"
PARTITIONS = 3
CLIENT_LIMIT = 4_000  # produce() refuses a record larger than this (message.max.bytes)
BROKER_LIMIT = 2_000  # the topic's max.message.bytes: a batch larger than this is refused


# --------------------------------------------------------------------------- the WAL


@dataclass
class Event:
    lsn: int
    key: str
    seq: int  # the event's place in commit order, over the whole WAL
    event_id: str
    size: (
        int  # payload bytes: above BROKER_LIMIT the topic refuses it; above CLIENT_LIMIT, produce()
    )
    message: bool = False  # written as a logical decoding message, not an outbox row


@dataclass
class Txn:
    final_lsn: int
    end_lsn: int
    events: list[Event]


@dataclass
class KeepaliveMark:
    wal_end: int
    reply: bool


class Server:
    """The walsender's side: the WAL, the slot's confirmed position, and checks on every status
    update the relay sends."""

    def __init__(self) -> None:
        self.items: list[Txn | KeepaliveMark] = []
        self.txns: list[Txn] = []
        self.slot_confirmed = 0x100
        self.next_lsn = 0x200
        self.seq = 0
        self.events: dict[str, Event] = {}
        self.statuses: list[int] = []
        self.landed: Callable[[Event], bool] = lambda event: False

    def write(self, keys: list[str], sizes: list[int], messages: list[bool] | None = None) -> Txn:
        begin = self.next_lsn
        events = []
        as_message = messages or [False] * len(keys)
        for i, (key, size) in enumerate(zip(keys, sizes, strict=True)):
            event_id = str(uuid.UUID(int=self.seq + 1))
            event = Event(begin + 1 + i, key, self.seq, event_id, size, as_message[i])
            self.seq += 1
            events.append(event)
            self.events[event.event_id] = event
        commit_lsn = begin + len(keys) + 1
        txn = Txn(commit_lsn, commit_lsn + 1, events)
        self.next_lsn = txn.end_lsn + 16
        self.items.append(txn)
        self.txns.append(txn)
        return txn

    def keepalive(self, reply: bool) -> None:
        wal_end = self.txns[-1].end_lsn if self.txns else self.slot_confirmed
        self.items.append(KeepaliveMark(wal_end, reply))

    def status(self, flushed: int) -> None:
        """A standby status update: the invariants of confirmation."""
        assert flushed >= (self.statuses[-1] if self.statuses else 0), (
            f"the confirmed position moved back: {flushed:#x} after {self.statuses[-1]:#x}"
        )
        for txn in self.txns:
            if txn.end_lsn > flushed:
                break
            for event in txn.events:
                assert self.landed(event), (
                    f"confirmed {flushed:#x} past event {event.seq} (txn ending {txn.end_lsn:#x}), "
                    "which is neither on its topic nor dead-lettered"
                )
        self.statuses.append(flushed)
        self.slot_confirmed = max(self.slot_confirmed, flushed)


def payload(event: Event) -> bytes:
    body = b'{"seq": %d}' % event.seq
    return body + b" " * max(0, event.size - len(body))


class Stream:
    """One replication session's stream: frames of everything after ``start`` (a Relation
    message first, as after START_REPLICATION), visible as soon as the server has it."""

    def __init__(self, server: Server, start: int) -> None:
        self.server = server
        self.start = start
        self._item = 0
        self._pending: deque[bytes] = deque([frames.relation()])
        self.broken = False

    def read(self) -> bytes | None:
        if self.broken:
            raise ReplicationError("replication connection lost (simulated)")
        while not self._pending and self._item < len(self.server.items):
            self._pending.extend(self._frames_of(self.server.items[self._item]))
            self._item += 1
        return self._pending.popleft() if self._pending else None

    def _frames_of(self, item: Txn | KeepaliveMark) -> list[bytes]:
        if isinstance(item, KeepaliveMark):
            return (
                [frames.keepalive(item.wal_end, reply=item.reply)]
                if item.wal_end >= self.start
                else []
            )
        if item.end_lsn <= self.start:
            return []  # confirmed before this session: the server does not send it again
        out = [frames.begin(item.final_lsn, lsn=item.final_lsn - len(item.events) - 1)]
        for event in item.events:
            if event.message:
                content = frames.message_event(
                    event.key, payload(event), event_id=event.event_id, aggregate_type="order"
                )
                out.append(frames.message(content, event.lsn))
                continue
            row = frames.outbox_row(event.key, payload(event), event_id=event.event_id)
            out.append(frames.insert(row, event.lsn))
        out.append(frames.commit(item.final_lsn, item.end_lsn))
        return out

    def wait(self, timeout: float) -> None:
        pass

    def send_status(self, *, flushed: int, reply_requested: bool = False) -> None:
        if self.broken:
            raise ReplicationError("replication connection lost (simulated)")
        self.server.status(flushed)


# --------------------------------------------------------------------------- Kafka


@dataclass
class Message:
    record: OutboxRecord
    callback: Callable[[Any, Any], None]
    partition: int

    def topic(self) -> str:
        return self.record.topic

    def key(self) -> bytes | None:
        return self.record.key

    def value(self) -> bytes | None:
        return self.record.value

    def __len__(self) -> int:  # confluent-kafka's: the value's length
        return len(self.record.value or b"")

    def headers(self) -> list[tuple[str, bytes]]:
        return self.record.headers

    def size(self) -> int:
        return len(self.record.key or b"") + len(self.record.value or b"")


@dataclass
class Error:
    code_: int
    text: str

    def code(self) -> int:
        return self.code_

    def str(self) -> str:
        return self.text


@dataclass
class Broker:
    """What landed, per (topic, partition), in order, as a read_committed consumer sees it:
    the evidence the checks read. (Records of an open Kafka transaction wait in their
    producer until it commits.)"""

    logs: dict[tuple[str, int], list[Message]] = field(default_factory=dict)
    progress: list[bytes] = field(default_factory=list)  # committed progress records

    def append(self, message: Message) -> None:
        if message.topic() == PROGRESS_TOPIC:
            self.progress.append(message.value() or b"")
        else:
            self.logs.setdefault((message.topic(), message.partition), []).append(message)


Partition = tuple[str, int]  # (topic, partition)


class Producer:
    """librdkafka's idempotent, gapless producer, with the broker's answers driven by the test
    (``send``/``respond``) or by time passing in ``poll(timeout)``."""

    def __init__(self, broker: Broker, rng: random.Random, clock: Clock) -> None:
        self.broker = broker
        self.rng = rng
        self.clock = clock
        self.queued: dict[Partition, deque[Message]] = {}
        self.inflight: dict[Partition, deque[list[Message]]] = {}
        self.reports: deque[tuple[Message, Error | None]] = deque()
        self.fatal_error: str | None = None
        self._fatal_raised = False
        # Exactly-once: a Kafka transaction is open; one of its records failed (it must abort).
        self.transactional = False  # exactly-once: records only inside a transaction
        self.in_transaction = False
        self.transaction_failed = False
        self.transaction_records: list[Message] = []  # landed, not visible before the commit

    def produce(
        self,
        record: OutboxRecord,
        on_delivery: Callable[[Any, Any], None],
        while_waiting: Any = None,
    ) -> None:
        if self.fatal_error:
            raise DeliveryError(f"produce failed: {self.fatal_error}")
        if self.transactional and not self.in_transaction:
            raise DeliveryError("produce failed: Local: Erroneous state (no transaction)")
        message = Message(record, on_delivery, partition_of(record))
        if message.size() > CLIENT_LIMIT:
            raise RecordRefused("Message size too large", too_large=True)
        self.queued.setdefault((record.topic, message.partition), deque()).append(message)

    def enqueue(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        partition: int,
        callback: Callable[[Any, Any], None],
        on_delivery: None,
        timestamp: int,
        headers: Headers,
    ) -> None:
        """confluent-kafka's produce(), positionally, as Pipeline.pump calls it: raises for
        anything produce() above would not take at once, which the driver then sends there."""
        assert partition == -1 and on_delivery is None
        record = OutboxRecord(topic, key, value, headers, timestamp)
        message = Message(record, callback, partition_of(record))
        if (
            self.fatal_error
            or (self.transactional and not self.in_transaction)
            or message.size() > CLIENT_LIMIT
        ):
            raise BufferError("not taken at once (simulated)")
        self.queued.setdefault((record.topic, message.partition), deque()).append(message)

    def poll(self, timeout: float = 0.0) -> int:
        if self.fatal_error and not self._fatal_raised:
            # As confluent-kafka does: the poll that meets a fatal error raises it, once.
            self._fatal_raised = True
            raise ProducerFatal(f"the producer failed: {self.fatal_error}")
        if timeout > 0:
            self.clock.now += timeout
            self.progress()  # time passes: the broker gets on with it
        served = 0
        while self.reports:
            message, error = self.reports.popleft()
            message.callback(error, message)
            served += 1
        return served

    def outstanding(self) -> int:
        return (
            sum(len(q) for q in self.queued.values())
            + sum(len(b) for batches in self.inflight.values() for b in batches)
            + len(self.reports)
        )

    def purge_queue(self) -> None:
        for queue in self.queued.values():
            while queue:
                self.reports.append((queue.popleft(), Error(verdicts.PURGE_QUEUE, "Purged")))

    # -- the broker's side
    def partitions(self) -> list[Partition]:
        return sorted(
            {p for p, q in self.queued.items() if q} | {p for p, b in self.inflight.items() if b}
        )

    def send(self, partition: Partition, max_batch: int) -> None:
        queue = self.queued.get(partition)
        if queue:
            batch = [queue.popleft() for _ in range(min(max_batch, len(queue)))]
            self.inflight.setdefault(partition, deque()).append(batch)

    def respond(self, partition: Partition) -> None:
        batches = self.inflight.get(partition)
        if not batches:
            return
        batch = batches.popleft()
        if sum(m.size() for m in batch) > BROKER_LIMIT:
            for message in batch:
                self.reports.append((message, Error(verdicts.MSG_SIZE_TOO_LARGE, "too large")))
            if self.in_transaction:
                self.transaction_failed = True  # abortable, not fatal (no gapless guarantee)
            else:
                self.fail_everything("gapless guarantee: a batch failed for good")
            return
        for message in batch:
            self._land(message)
            self.reports.append((message, None))

    def _land(self, message: Message) -> None:
        if self.in_transaction:
            self.transaction_records.append(message)
        else:
            self.broker.append(message)

    # -- transactions (exactly-once)
    def begin_transaction(self) -> None:
        assert not self.in_transaction, "a Kafka transaction is open already"
        self.in_transaction = True
        self.transaction_failed = False

    def commit_transaction(self, while_waiting: Any) -> None:
        """Flush (the broker answers everything), serve the reports, then commit; a
        transaction with a failed record is aborted instead (TransactionAborted)."""
        while self.partitions():
            self.progress()
        self.poll(0)
        if self.transaction_failed:
            self.abort_transaction(while_waiting)
            raise TransactionAborted("Kafka transaction commit failed and was aborted (simulated)")
        for message in self.transaction_records:
            self.broker.append(message)
        self.transaction_records.clear()
        self.in_transaction = False

    def abort_transaction(self, while_waiting: Any) -> None:
        self.purge_queue()
        while self.partitions():
            self.progress()
        with contextlib.suppress(DeliveryError):
            self.poll(0)
        self.transaction_records.clear()
        self.in_transaction = self.transaction_failed = False

    def fail_everything(self, reason: str) -> None:
        """A fatal error: every record still held fails (and an open Kafka transaction is
        aborted by the next producer of the transactional.id)."""
        self.fatal_error = reason
        self.transaction_records.clear()
        for queue in self.queued.values():
            while queue:
                self.reports.append((queue.popleft(), Error(verdicts.FATAL, reason)))
        for batches in self.inflight.values():
            while batches:
                for message in batches.popleft():
                    self.reports.append((message, Error(verdicts.FATAL, reason)))

    def progress(self) -> None:
        """One random step of the broker: send a batch, or answer one."""
        busy = self.partitions()
        if not busy:
            return
        partition = self.rng.choice(busy)
        queued = self.queued.get(partition)
        if self.inflight.get(partition) and (not queued or self.rng.random() < 0.6):
            self.respond(partition)
        else:
            self.send(partition, self.rng.randint(1, 6))

    def crash(self) -> None:
        """The relay process died: of what was in flight, each partition's oldest batches may
        have landed (a prefix: the broker refuses a batch after a missing one); nothing is
        reported."""
        for batches in self.inflight.values():
            for batch in batches:
                if self.rng.random() < 0.5 or sum(m.size() for m in batch) > BROKER_LIMIT:
                    break
                for message in batch:
                    self._land(message)
        # The next producer with the transactional.id aborts what this one left open.
        self.transaction_records.clear()
        self.queued.clear()
        self.inflight.clear()
        self.reports.clear()


def partition_of(record: OutboxRecord) -> int:
    if record.topic == DEAD_LETTER_TOPIC:
        return 0
    return zlib.crc32(record.key or b"") % PARTITIONS


# --------------------------------------------------------------------------- the relay


class StopFlag:
    def __init__(self) -> None:
        self.value = False

    def is_set(self) -> bool:
        return self.value


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Relay:
    """runtime/relay.py's outer loop, over the simulated I/O: sessions from the slot's
    confirmed position, the producer settled before every replay and replaced when fatal,
    the pipeline's memory kept across sessions (not across crashes)."""

    def __init__(self, server: Server, config: PipelineConfig, rng: random.Random) -> None:
        self.server = server
        self.config = config
        self.rng = rng
        self.broker = Broker()
        self.clock = Clock()
        self.memory = Memory()
        self.stats = RelayStats()
        self.producer = Producer(self.broker, rng, self.clock)
        self.stop = StopFlag()
        self.halted: HaltedOnBadRow | None = None
        self.kept: list[str] = []
        self.skipped_ever: set[int] = set()
        self.sessions = 0
        self.session = self._new_session()

    def _new_session(self) -> Session:
        producer = self.producer
        if producer.fatal_error:
            with contextlib.suppress(DeliveryError):  # its reports go to the old pipeline
                producer.poll(0)
            self.producer = Producer(self.broker, self.rng, self.clock)
        else:
            if producer.in_transaction:
                producer.abort_transaction(None)  # as the relay's _settle_publisher does
            producer.purge_queue()
            while producer.outstanding():
                producer.poll(0.05)
        self.producer.transactional = self.config.exactly_once
        self.sessions += 1
        self.stop.value = False
        if self.config.exactly_once:
            # As the relay does at every session start: where Kafka says we are.
            progress = self.broker.progress
            self.memory.progress = Progress.decode(progress[-1]) if progress else None
        self.stream = Stream(self.server, self.server.slot_confirmed)
        self.pipeline = Pipeline(
            self.config,
            start=self.server.slot_confirmed,
            memory=self.memory,
            stats=self.stats,
            now=self.clock.now,
        )
        return Session(
            pipeline=self.pipeline,
            stream=self.stream,
            publisher=self.producer,
            stop=self.stop,
            clock=self.clock,
            keeper=lambda action: self.kept.append(action.event_id),
        )

    def step(self) -> None:
        if self.halted is not None:
            return
        try:
            more = self.session.step()
        except (DeliveryError, ReplicationError):
            self.session = self._new_session()
            return
        except HaltedOnBadRow as exc:
            self.halted = exc
            return
        except PrerequisiteError:
            raise
        if not more:  # a clean stop: start again, as a restarted relay would
            self.session = self._new_session()

    def crash(self) -> None:
        self.producer.crash()
        self.producer = Producer(self.broker, self.rng, self.clock)
        self.memory = Memory()
        self.session = self._new_session()

    def skip_halted(self) -> None:
        """The operator's `cdc-relay skip --lsn` for the event that halted the relay."""
        assert self.halted is not None and self.halted.lsn is not None
        self.memory.skips = self.memory.skips | {self.halted.lsn}
        self.skipped_ever.add(self.halted.lsn)
        self.halted = None
        self.session = self._new_session()
