"""The relay's decisions as a state machine with no I/O: frames, delivery reports, clock ticks
and a stop request go in; actions come out (produce these records, send this status update,
record this row as kept, reset and replay, finish).

Like psycopg's protocol generators, it is driven from outside (cdc_relay/runtime/session.py)
and never touches a socket, so property tests can play whole histories against it
(tests/unit/test_pipeline_properties.py). It owns the decoder, the relation cache, the mapping,
the ack tracker and the in-flight accounting.

The insert path is the hot path: ``feed`` returns the OutboxRecord itself (to be produced with
``delivery``, the open transaction's callback) and counts it in flight; anything else comes
back as an action object.

How a refusal is judged (see verdicts.py): a broker refusal of a record that was not alone in
flight sends its transaction to be replayed one record at a time (``Memory.isolate``); a record
refused alone is refused for good (``Memory.poisoned``, by its own WAL position) and goes to the
dead-letter topic (or halts the relay) on every later replay without being tried again.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from cdc_relay.core import claimcheck, verdicts
from cdc_relay.core.acks import AckTracker, Transaction, record_size
from cdc_relay.core.copydata import (
    XLOG_DATA_HEADER_SIZE,
    XLOG_DATA_TYPE,
    Keepalive,
    parse_copy_data,
    xlog_data_start,
)
from cdc_relay.core.lsn import Lsn, format_lsn
from cdc_relay.core.mapping import (
    ColumnMapping,
    Headers,
    MessagePlan,
    OutboxRecord,
    Rejected,
    RowSpec,
    TablePlan,
    dead_letter_record,
)
from cdc_relay.core.pgoutput import (
    Begin,
    Commit,
    Decoder,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    Relation,
    Truncate,
    Type,
    Update,
    Xid,
)
from cdc_relay.core.progress import Progress
from cdc_relay.core.stats import RelayStats
from cdc_relay.core.transactions import KafkaTransaction, TransactionLimits
from cdc_relay.core.verdicts import Verdict
from cdc_relay.errors import DecodeError, PrerequisiteError, RelayError, ReplicationError

PROTO_VERSION: Final = 1
_INSERT: Final = ord("I")
# Outbox updates, deletes and truncates are ignored by design (cleaning the table never emits
# events; the publication only sends inserts anyway), and so are origins and types.
_IGNORED: Final = (Update, Delete, Truncate, Origin, Type)
_NO_TOPICS: Final[frozenset[str]] = frozenset()
NON_TRANSACTIONAL: Final = (
    "a non-transactional logical decoding message (pg_logical_emit_message(false, ...)) is not "
    "tied to a commit: PostgreSQL sends it even when its transaction rolls back; emit events "
    "with transactional = true (cdc_relay.outbox.emit_event, cdc_relay_emit_event)"
)
# The dead-letter record of last resort keeps only what identifies the row.
IDENTIFYING_HEADERS: Final = ("id", "error", "source_lsn", "source_table")
# Dead-letter forms, from the fullest: with the value; without it; without the key and with
# only the identifying headers (each cut to 1 KiB). A refused form is followed by the next.
FULL, WITHOUT_VALUE, IDENTIFYING_ONLY, NONE_TAKEN = 0, 1, 2, 3
SKIPPED_BY_OPERATOR: Final = "skipped by the operator (cdc-relay skip)"
WARNING, INFO = 30, 20  # logging levels, for Notice


class RowProducer(Protocol):
    """Plain inserts decoded, mapped and produced in one call, without a Python object per
    event (adapters/_outbox_rows.c): told each table's plan, and handed each frame first by
    ``Pipeline.pump``. Its ``produce`` returns the value's size once the record is the
    producer's, or -1 for a frame it leaves to ``feed``, having done nothing. It counts each
    record in its plan's ``counts`` by the next ``fold_counts``, which each pump ends with."""

    def plan(self, relid: int, spec: RowSpec, counts: dict[str, int], /) -> None: ...

    def forget(self, relid: int, /) -> bool: ...

    def produce(self, frame: bytes | memoryview, token: Transaction, /) -> int: ...

    def fold_counts(self) -> None: ...


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class TableSource:
    """One outbox table the relay streams, with its column mapping."""

    schema: str
    name: str
    mapping: ColumnMapping = field(default_factory=ColumnMapping)


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """What the pipeline needs of the relay's settings (built by runtime from Settings).

    The sources of events: ``outbox_table`` with ``mapping`` (the one-table form), ``tables``
    (several, each with its own mapping), and logical decoding messages whose prefix is
    ``message_prefix`` ("" for none)."""

    outbox_table: tuple[str, str] | None = None
    mapping: ColumnMapping = field(default_factory=ColumnMapping)
    tables: tuple[TableSource, ...] = ()
    message_prefix: str = ""
    # Claim-check: payloads larger than this go as references (None: off).
    claim_check_over_bytes: int | None = None
    # The publication lists its tables (FOR TABLE): a table in the stream that is not a source
    # was added to it while this relay ran, and passing over its rows would confirm past them;
    # stop instead. (A FOR TABLES IN SCHEMA publication carries other tables too: ignored.)
    unlisted_tables_halt: bool = False
    topic_template: str = "outbox.event.{aggregate_type}"
    dead_letter_topic: str = "outbox.dead-letter"
    halt_on_bad_row: bool = False
    max_in_flight_events: int = 20_000
    max_in_flight_bytes: int = 64 * 1024 * 1024
    status_interval: float = 1.0
    # A status update goes out at least this often, whatever happens (wal_sender_timeout).
    max_silence: float = 10.0
    shutdown_timeout: float = 30.0
    slot_name: str = "cdc_relay"
    # Kafka acknowledged nothing for this long with records in flight: say so (once).
    stall_warning: float = 30.0
    # Nothing from the server for this long while reading: ask it for a reply (a status update
    # with reply requested); no answer within reply_timeout: the connection is dead, even if
    # TCP does not know it (a half-open connection through a proxy or a NAT that dropped it).
    probe_after: float = 10.0
    reply_timeout: float = 10.0
    # Exactly-once (core/transactions.py): Kafka transactions, and the progress topic their
    # progress records go to, keyed by the pipeline.
    exactly_once: bool = False
    transaction_limits: TransactionLimits = field(default_factory=TransactionLimits)
    progress_topic: str = "cdc-relay.progress"
    pipeline_key: bytes = b"cdc-relay"

    @property
    def table_sources(self) -> tuple[TableSource, ...]:
        one = self.outbox_table
        head = (TableSource(one[0], one[1], self.mapping),) if one is not None else ()
        return head + self.tables

    @property
    def table_name(self) -> str:
        """The source named in a dead-letter record when the event's own is not known: the
        first table, or the messages."""
        tables = self.table_sources
        if tables:
            return f"{tables[0].schema}.{tables[0].name}"
        return f"message:{self.message_prefix}"


@dataclass(slots=True)
class Memory:
    """What the relay has learnt about single events, kept across sessions (resets, reconnects)
    for as long as the process lives: nothing here is needed for correctness after a restart,
    where a refusal is simply learnt again."""

    # Event WAL position -> (its transaction's commit LSN, the broker's error, a size error).
    poisoned: dict[int, tuple[int, str, bool]] = field(default_factory=dict)
    # (transaction commit LSN, topic): replay that transaction's records for that topic alone.
    isolate: set[tuple[int, str]] = field(default_factory=set)
    # Event WAL position -> (its transaction's commit LSN, the smallest dead-letter form the
    # broker took, or will take: see DeadLetterForm).
    dead_letter_forms: dict[int, tuple[int, int]] = field(default_factory=dict)
    # Event WAL positions the operator told the relay to dead-letter (`cdc-relay skip`).
    skips: frozenset[int] = frozenset()
    # Exactly-once: the last progress record committed (the driver reads the progress topic
    # at every session start; within the process this is what the relay last wrote).
    progress: Progress | None = None

    def forget_confirmed(self, confirmed: int) -> None:
        """Entries of transactions at or before the confirmed position are history."""
        self.poisoned = {k: v for k, v in self.poisoned.items() if v[0] >= confirmed}
        self.isolate = {entry for entry in self.isolate if entry[0] >= confirmed}
        self.dead_letter_forms = {
            k: v for k, v in self.dead_letter_forms.items() if v[0] >= confirmed
        }


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Produce:
    """Produce ``record`` with ``delivery`` as its callback. ``alone``: with nothing else in
    flight before or after it (wait for the producer to drain on both sides), so that the
    broker's verdict on it is its own."""

    record: OutboxRecord
    delivery: Transaction
    alone: bool = False
    lsn: Lsn | None = None  # the event's WAL position, when it is known
    source: str | None = None  # the event's table (or message prefix), when it is known


@dataclass(frozen=True, slots=True)
class SendStatus:
    """A standby status update confirming ``lsn``; ``moved``: it is past the last one sent;
    ``reply_requested``: ask the server to answer at once (a liveness probe)."""

    lsn: Lsn
    moved: bool = False
    reply_requested: bool = False


@dataclass(frozen=True, slots=True)
class Reconnect:
    """The replication connection is dead (the server stopped answering): end the session
    without waiting for anything; the next one starts from the slot's confirmed position."""

    reason: str


@dataclass(frozen=True, slots=True)
class Keep:
    """Record that the outbox row of ``event_id`` is the only full copy of its event (its
    dead-letter record carries no payload), so that prune keeps it; then call
    ``Pipeline.kept(delivery)``: the transaction is not confirmed before."""

    event_id: str
    table: str
    source_lsn: str
    reason: str
    delivery: Transaction


@dataclass(frozen=True, slots=True)
class Reset:
    """Stop producing, purge what the producer has not sent, wait until nothing is in flight
    (``Pipeline.drained`` tells the driver), then end the session: the next one replays from
    the slot's confirmed position."""

    reason: str


@dataclass(frozen=True, slots=True)
class Finish:
    """Shutdown is over: send a last status update confirming ``lsn`` and end. ``halt``: the
    reason the relay stops (a row that cannot be delivered), with the event's WAL position."""

    lsn: Lsn
    unacknowledged: int
    halt: str | None = None
    halt_lsn: Lsn | None = None


@dataclass(frozen=True, slots=True)
class BeginTransaction:
    """Exactly-once: begin a Kafka transaction (before the records that follow)."""


@dataclass(frozen=True, slots=True)
class CommitTransaction:
    """Exactly-once: produce ``record`` (the progress record) and commit the Kafka
    transaction; then call ``Pipeline.transaction_committed(progress)``. If the commit fails,
    abort it: the session ends and the next one replays from the recorded position."""

    progress: Progress
    record: OutboxRecord


@dataclass(frozen=True, slots=True)
class Notice:
    """A line for the log (the pipeline logs nothing itself)."""

    level: int
    message: str
    lsn: Lsn | None = None


Action = (
    Produce
    | SendStatus
    | Keep
    | Reset
    | Reconnect
    | Finish
    | Notice
    | BeginTransaction
    | CommitTransaction
)
_NOTHING: Final[tuple[Action, ...]] = ()


@dataclass(frozen=True, slots=True)
class Failure:
    """A delivery report with an error, as plain values."""

    delivery: Transaction
    code: int
    reason: str
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers


class Held:
    """A frame pump() stopped at (see Pipeline.pump)."""

    __slots__ = ("error", "frame", "out")

    def __init__(
        self,
        frame: bytes | memoryview,
        out: OutboxRecord | list[Action],
        error: Exception | None,
    ) -> None:
        self.frame = frame
        self.out = out
        self.error = error


class State(enum.Enum):
    STREAMING = "streaming"
    DRAINING = "draining"  # a reset was decided: waiting for the producer to settle
    STOPPING = "stopping"  # stop or halt: no more reading, waiting for acknowledgements
    DONE = "done"


# --------------------------------------------------------------------------- the pipeline


class _Sources:
    """What the pipeline knows of its sources besides the plans of the tables it has seen.
    One attribute of the pipeline, not four: past 30 attributes CPython 3.11 gives an instance
    a dictionary of its own, and every attribute read of the hot path gets slower."""

    __slots__ = ("message_counts", "message_plan", "tables", "unlisted")

    def __init__(self, config: PipelineConfig, stats: RelayStats) -> None:
        self.tables = {(t.schema, t.name): t.mapping for t in config.table_sources}
        self.unlisted: dict[int, str] = {}  # relid -> name, of tables that are no source
        self.message_plan: MessagePlan | None = None
        self.message_counts: dict[str, int] = {}
        if config.message_prefix:
            self.message_plan = MessagePlan(config.message_prefix, config.topic_template)
            self.message_counts = stats.published_by_source.setdefault(self.message_plan.table, {})


class Pipeline:
    """One replication session's decisions, from the slot's confirmed position ``start``.

    ``now`` and ``tick(now)`` take a monotonic clock in seconds; ``wall_clock`` gives Unix time
    for the latency histogram (commit time to the last acknowledgement of a transaction).
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        start: Lsn,
        memory: Memory | None = None,
        stats: RelayStats | None = None,
        now: float = 0.0,
        wall_clock: Callable[[], float] = lambda: 0.0,
        rows: RowProducer | None = None,
    ) -> None:
        self.config = config
        self.memory = memory if memory is not None else Memory()
        self.memory.forget_confirmed(start)
        self.stats = stats if stats is not None else RelayStats()
        self.stats.confirmed_lsn = start
        self._wall_clock = wall_clock
        self.tracker = AckTracker(start, on_failure=self._on_failure, on_complete=self._completed)
        self.stats.tracker = self.tracker
        self.decoder = Decoder(PROTO_VERSION)
        self.state = State.STREAMING
        self.delivery: Transaction | None = None  # the open transaction: callback of its records
        self.reset_reason: str | None = None
        # relid -> the table's plan and its stats' per-topic counter (a tuple: reading an
        # attribute of a compiled plan from here costs more, per event, than unpacking it).
        self._plans: dict[int, tuple[TablePlan, dict[str, int]]] = {}
        # The C row path, when the producer has one: pump() offers it each frame first.
        self._rows = rows
        self._sources = _Sources(config, self.stats)
        self._failures: list[Failure] = []
        # Per transaction: whether inserts take the careful path (skips, refusals, isolation).
        self._careful = False
        self._isolated_topics: frozenset[str] = _NO_TOPICS
        self._records_at_begin = 0
        self._last_status_at = now
        self._last_sent = start
        self._deadline: float | None = None
        self._halt: str | None = None
        self._halt_lsn: Lsn | None = None
        # Liveness of the two sides: when the server last sent anything (while reading), and
        # whether Kafka acknowledges (progress = records handed over minus those in flight).
        self._last_received = now
        self._probe_sent_at: float | None = None
        self._progress = 0
        self._progress_at = now
        self._stall_reported = False
        self._now = now
        # Records counted in stats.published that never went out as one (replaced by their
        # dead-letter record, or never produced): ``_counted`` is then one record per event.
        self._uncounted = 0
        # Where pump() stopped for the driver: the frame, its outcome, and the error the
        # producer raised for that record (None when the outcome is a list of actions).
        self.held: Held | None = None
        self.kafka: KafkaTransaction | None = None
        if config.exactly_once:
            self.kafka = KafkaTransaction(config.transaction_limits, self.memory.progress, start)
            self._careful = True  # the first record needs a BeginTransaction before it

    # ------------------------------------------------------------------ what the driver reads

    @property
    def reading(self) -> bool:
        """Whether the driver may read frames: streaming, and within the in-flight bounds."""
        tracker, config = self.tracker, self.config
        return (
            self.state is State.STREAMING
            and tracker.in_flight_events < config.max_in_flight_events
            and tracker.in_flight_bytes < config.max_in_flight_bytes
        )

    @property
    def confirmed(self) -> Lsn:
        """The position the slot may be confirmed to: what Kafka acknowledged, or in
        exactly-once mode what committed Kafka transactions cover."""
        kafka = self.kafka
        return self.tracker.confirmed if kafka is None else kafka.committed

    def _counted(self) -> int:
        stats = self.stats
        return stats.published + stats.dead_lettered - self._uncounted

    # ------------------------------------------------------------------ frames

    def pump(
        self,
        read: Callable[[], bytes | memoryview | None],
        enqueue: Callable[..., object],
        limit: int,
    ) -> int:
        """The read loop's fast path, compiled with the rest of the core: feed up to ``limit``
        frames from ``read`` (None: nothing buffered) and hand each insert's record straight to
        ``enqueue``, the producer's own produce(topic, value, key, partition, callback,
        on_delivery, timestamp, headers), partition -1 for the partitioner's choice. It
        returns the number of frames read, stopping early at the in-flight bounds, when
        ``read`` has nothing, or at a frame the driver must see, left in ``held``: one whose
        outcome is a list of actions, or a record ``enqueue`` raised for (queue full, refused),
        which the driver then produces the careful way. One event costs no interpreted frame
        here, and no call through the driver's produce wrapper.

        With a RowProducer (``rows``), each frame goes to it first, while no insert needs
        care: a plain insert is then decoded, mapped and produced in C, and only counted
        here; it leaves anything else (-1) to ``feed``."""
        rows = self._rows
        if rows is None:
            return self._pump(read, enqueue, limit, None)
        try:
            return self._pump(read, enqueue, limit, rows.produce)
        finally:
            rows.fold_counts()  # the statistics hold every record produced in C by now

    def _pump(
        self,
        read: Callable[[], bytes | memoryview | None],
        enqueue: Callable[..., object],
        limit: int,
        produce_row: Callable[[bytes | memoryview, Transaction], int] | None,
    ) -> int:
        self.held = None
        tracker, config, stats = self.tracker, self.config, self.stats
        max_events, max_bytes = config.max_in_flight_events, config.max_in_flight_bytes
        processed = 0
        while processed < limit:
            frame = read()
            if frame is None:
                break
            processed += 1
            delivery = self.delivery
            size = -1
            if produce_row is not None and delivery is not None and not self._careful:
                try:
                    size = produce_row(frame, delivery)
                except Exception as exc:  # as enqueue's: the record goes the careful way
                    record = self.feed(frame)  # the same row: the same record, counted
                    if record is None:  # not reached: produce_row produced nothing else
                        raise
                    self.held = Held(frame, record, exc)
                    break
            if size >= 0:
                # Produced in C: what feed() counts for a record it returns.
                assert delivery is not None  # for mypy: produce_row ran
                tracker.in_flight_bytes += size
                tracker.in_flight_events += 1
                delivery.pending += 1
                stats.published += 1
            elif (out := self.feed(frame)) is None:
                pass
            elif type(out) is OutboxRecord:
                try:
                    enqueue(
                        out.topic,
                        out.value,
                        out.key,
                        -1,
                        self.delivery,
                        None,
                        out.timestamp_ms,
                        out.headers,
                    )
                except Exception as exc:  # the driver's produce() tells what it was
                    self.held = Held(frame, out, exc)
                    break
            else:
                self.held = Held(frame, out, None)
                break
            if tracker.in_flight_events >= max_events or tracker.in_flight_bytes >= max_bytes:
                break
        return processed

    def feed(self, frame: bytes | memoryview) -> OutboxRecord | list[Action] | None:
        """One CopyData frame of the replication stream. Returns an OutboxRecord to produce with
        ``self.delivery`` (already counted in flight), a list of actions, or None."""
        if frame[0] != XLOG_DATA_TYPE or len(frame) < XLOG_DATA_HEADER_SIZE:
            return self._control(frame)
        # One copy of the frame; the message is read in place after the XLogData header.
        buf = frame if type(frame) is bytes else bytes(frame)
        try:
            message = self.decoder.decode(buf, offset=XLOG_DATA_HEADER_SIZE)
        except DecodeError as exc:
            # The frame's start position is unpacked only here, never per event.
            raise DecodeError(exc.reason, offset=exc.offset, lsn=xlog_data_start(buf)) from None
        if type(message) is Insert:
            entry = self._plans.get(message.relid)
            if entry is None:
                self._unmapped(message.relid)
                return None
            plan, by_topic = entry
            outcome = plan.map(message.new)
            delivery = self.delivery
            if delivery is None:
                raise ReplicationError("Insert outside a transaction in the replication stream")
            if self._careful or type(outcome) is not OutboxRecord:
                return self._insert_carefully(
                    outcome, delivery, plan, by_topic, xlog_data_start(buf)
                )
            # tracker.sent() and the counters, inlined: this runs once per event.
            value = outcome.value
            tracker = self.tracker
            tracker.in_flight_bytes += len(value) if value else 0  # record_size
            tracker.in_flight_events += 1
            delivery.pending += 1
            self.stats.published += 1
            by_topic[outcome.topic] = by_topic.get(outcome.topic, 0) + 1
            return outcome
        if type(message) is Begin:
            self._begin(message)
        elif type(message) is Commit:
            return self._commit(message)
        elif type(message) is Relation:
            self._relation(message)
        elif type(message) is LogicalMessage:
            return self._message(message, buf)
        elif not isinstance(message, _IGNORED):
            raise ReplicationError(
                f"unexpected {type(message).__name__} message for protocol version {PROTO_VERSION}"
            )
        return None

    def _control(self, frame: bytes | memoryview) -> list[Action] | None:
        message = parse_copy_data(frame)  # a keepalive: any other frame raises here
        assert type(message) is Keepalive
        self.tracker.observe_idle_position(message.wal_end)
        if self.kafka is not None:
            self.kafka.idle_position(message.wal_end)
        if message.reply_requested:
            return [self._status(self._last_status_at)]
        return None

    def _begin(self, begin: Begin) -> None:
        self.delivery = self.tracker.begin(begin.final_lsn, begin.commit_time)
        self._records_at_begin = self.stats.published + self.stats.dead_lettered
        isolate = self.memory.isolate
        # Empty but after a failed delivery: no set built per transaction for nothing.
        self._isolated_topics = (
            frozenset(topic for lsn, topic in isolate if lsn == begin.final_lsn)
            if isolate
            else _NO_TOPICS
        )
        if self.kafka is not None:
            self.kafka.begin(begin.final_lsn, self._counted())
        self._careful = self._needs_care()

    def _needs_care(self) -> bool:
        """Whether the inserts from here on take the careful path (not the hot one)."""
        memory, kafka = self.memory, self.kafka
        if kafka is not None and (not kafka.open or kafka.dropping or kafka.to_skip):
            return True
        return bool(self._isolated_topics or memory.poisoned or memory.skips)

    def _commit(self, commit: Commit) -> list[Action] | None:
        txn = self.delivery
        if txn is None:
            raise ReplicationError("Commit without Begin in the replication stream")
        self.tracker.commit(txn, commit.end_lsn)
        self.stats.transaction_read(commit.end_lsn, self._records_at_begin)
        if txn.pending == 0 and (
            self.stats.published + self.stats.dead_lettered != self._records_at_begin
        ):
            # Every record was acknowledged before the Commit message was read.
            self.stats.transaction_acknowledged(txn.commit_time, self._wall_clock())
        self.delivery = None
        kafka = self.kafka
        if kafka is None:
            return None
        kafka.end(commit.end_lsn)
        self._careful = self._needs_care()
        if kafka.due(self._now, self._counted()):
            return [self._commit_kafka()]
        return None

    def _completed(self, txn: Transaction) -> None:
        self.stats.transaction_acknowledged(txn.commit_time, self._wall_clock())

    def _relation(self, relation: Relation) -> None:
        mapping = self._sources.tables.get((relation.namespace, relation.name))
        if mapping is None:
            entry = self._plans.pop(relation.relid, None)
            if self._rows is not None:
                self._rows.forget(relation.relid)
            if entry is not None:
                plan = entry[0]
                # The outbox itself under a new name: skipping its rows would confirm past
                # them, so stop before this transaction instead.
                raise PrerequisiteError(
                    f"outbox table {plan.table} was renamed to {relation.namespace}."
                    f"{relation.name} while the relay ran; its new rows are not published. "
                    "Rename it back, or point CDC_RELAY_OUTBOX_TABLE at it and run "
                    "`cdc-relay setup`"
                )
            # Not a source. A Relation alone says nothing yet: pgoutput also describes the
            # partition a row is in when it publishes the row under its root's name.
            self._sources.unlisted[relation.relid] = f"{relation.namespace}.{relation.name}"
            return
        # A new Relation message follows every schema change: re-resolve the columns. A table
        # that lost a mapped column cannot deliver anything, so that is fatal, not per row.
        try:
            plan = TablePlan(
                relation, mapping, self.config.topic_template, self.config.claim_check_over_bytes
            )
        except RelayError as exc:
            raise PrerequisiteError(str(exc)) from None
        counts = self.stats.published_by_source.setdefault(plan.table, {})
        self._plans[relation.relid] = (plan, counts)
        rows = self._rows
        if rows is not None:
            spec = plan.row_spec()
            if spec is None:
                rows.forget(relation.relid)
            else:
                rows.plan(relation.relid, spec, counts)

    def _unmapped(self, relid: int) -> None:
        """A row of a table that is no source: passed over, unless the publication lists its
        tables, where it can only be one added while this relay ran."""
        name = self._sources.unlisted.get(relid)
        if name is not None and self.config.unlisted_tables_halt:
            raise PrerequisiteError(
                f"the publication now carries {name}, which CDC_RELAY_OUTBOX_TABLE does not "
                "list: its rows would be passed over and confirmed, so the relay stops before "
                "them. Add the table to CDC_RELAY_OUTBOX_TABLE and start the relay again "
                "(README: adding a table)"
            )

    def _message(self, message: LogicalMessage, buf: bytes) -> OutboxRecord | list[Action] | None:
        """A logical decoding message: an event when its prefix is the relay's, treated
        exactly as an inserted row (one record in flight in its transaction)."""
        plan = self._sources.message_plan
        if plan is None or message.prefix != plan.prefix:
            return None  # another application's messages
        if not message.transactional:
            return self._non_transactional(message, plan, buf)
        delivery = self.delivery
        if delivery is None:
            raise ReplicationError("transactional Message outside a transaction in the stream")
        outcome = plan.map(message.content)
        counts = self._sources.message_counts
        if self._careful or type(outcome) is not OutboxRecord:
            return self._insert_carefully(outcome, delivery, plan, counts, xlog_data_start(buf))
        # As the insert path (which stays inlined: it is the hotter one).
        self.tracker.sent(delivery, record_size(outcome.value))
        self._count_published(outcome.topic, counts)
        return outcome

    def _non_transactional(
        self, message: LogicalMessage, plan: MessagePlan, buf: bytes
    ) -> list[Action]:
        """A message with the relay's prefix but not transactional: it belongs to no commit
        (PostgreSQL sends it at once, whether its transaction commits or not), so it is never
        delivered as an event; it is a bad row: dead-lettered, or a halt, by the policy. It
        gets a transaction of its own at its position, so that the slot moves past it only
        once that is done."""
        mapped = plan.map(message.content)
        error = NON_TRANSACTIONAL
        if isinstance(mapped, Rejected):
            error += f"; and its content is unreadable: {mapped.error}"
        rejected = Rejected(error, mapped.key, mapped.value, mapped.headers)
        lsn = xlog_data_start(buf)
        own = self.delivery is None
        if own:
            sent_at = int.from_bytes(buf[17:25], "big", signed=True)  # XLogData send time
            self._begin(Begin(message.lsn, sent_at, Xid(0)))
        txn = self.delivery
        assert txn is not None
        actions = self._insert_carefully(rejected, txn, plan, self._sources.message_counts, lsn)
        if own and self.state is State.STREAMING:
            actions += self._commit(Commit(0, message.lsn, message.lsn, txn.commit_time)) or []
        return actions

    def _insert_carefully(
        self,
        outcome: OutboxRecord | Rejected,
        txn: Transaction,
        plan: TablePlan | MessagePlan,
        counts: dict[str, int],
        lsn: Lsn,
    ) -> list[Action]:
        """An insert off the hot path: a row that cannot be mapped, an operator skip, an event
        refused before, a transaction replayed one record at a time, or in exactly-once mode
        an event committed before, or the first of a Kafka transaction."""
        kafka = self.kafka
        if kafka is not None:
            if kafka.dropping:
                return []
            if kafka.to_skip:
                kafka.skipped()
                self._careful = self._needs_care()
                return []
            if not kafka.open:
                kafka.began(self._now, self._counted())
                self._careful = self._needs_care()
                return [BeginTransaction(), *self._insert(outcome, txn, plan, counts, lsn)]
        return self._insert(outcome, txn, plan, counts, lsn)

    def _insert(
        self,
        outcome: OutboxRecord | Rejected,
        txn: Transaction,
        plan: TablePlan | MessagePlan,
        counts: dict[str, int],
        lsn: Lsn,
    ) -> list[Action]:
        memory = self.memory
        if lsn in memory.skips:
            rejected = Rejected(SKIPPED_BY_OPERATOR, outcome.key, outcome.value, outcome.headers)
            return self._dead_letter(
                rejected, txn, lsn, plan.table, include_value=True, forced=True
            )
        if isinstance(outcome, Rejected):
            return self._dead_letter(outcome, txn, lsn, plan.table, include_value=True)
        poisoned = memory.poisoned.get(lsn)
        if poisoned is not None:
            _, error, size_error = poisoned
            rejected = Rejected(error, outcome.key, outcome.value, outcome.headers)
            if size_error and self._by_reference_possible(rejected, plan.table):
                self._count_published(outcome.topic, counts)
            return self._dead_letter(
                rejected,
                txn,
                lsn,
                plan.table,
                include_value=not size_error,
                topic=outcome.topic,
            )
        self.tracker.sent(txn, record_size(outcome.value))
        self._count_published(outcome.topic, counts)
        alone = outcome.topic in self._isolated_topics
        return [Produce(outcome, txn, alone=alone, lsn=lsn, source=plan.table)]

    def _by_reference_possible(self, rejected: Rejected, table: str) -> bool:
        """Claim-check is on, and the row is a table's (a message has no row to fetch from)
        with a payload, not already a reference (whose refusal takes the dead-letter path)."""
        return (
            self.config.claim_check_over_bytes is not None
            and rejected.value is not None
            and any(".".join(name) == table for name in self._sources.tables)
            and all(name != claimcheck.HEADER for name, _ in rejected.headers)
        )

    def _by_reference(
        self,
        rejected: Rejected,
        topic: str,
        txn: Transaction,
        event_lsn: Lsn | None,
        table: str,
        replacing: int | None,
    ) -> list[Action]:
        """Kafka refused the row as too large: publish it on its topic as a claim-check
        reference (core/claimcheck.py), and keep the row from prune for good, as a dead-lettered
        row without its payload is kept: the reference points at it."""
        assert rejected.value is not None
        event, size = event_id(rejected.headers), len(rejected.value)
        record = OutboxRecord(
            topic,
            rejected.key,
            claimcheck.reference_value(event, size, table),
            [*rejected.headers, *claimcheck.reference_headers(size)],
            0,  # the row's timestamp is not known here: Kafka stamps it
        )
        reference_size = record_size(record.value)
        if replacing is None:
            self.tracker.sent(txn, reference_size)
        else:
            self.tracker.resize(replacing, reference_size)
            self._uncounted += 1  # the event was counted when its record was produced
        self.tracker.hold(txn)  # for the Keep, released once carried out
        lsn = format_lsn(txn.final_lsn)
        return [
            Notice(
                WARNING,
                f"event {event} from {table} at {lsn} is too large for Kafka ({size} bytes, "
                f"{rejected.error}): published by reference (claim-check)",
            ),
            Produce(record, txn, alone=True, lsn=event_lsn, source=table),
            Keep(event, table, lsn, claimcheck.KEPT_REASON, txn),
        ]

    def _count_published(self, topic: str, counts: dict[str, int]) -> None:
        self.stats.published += 1
        counts[topic] = counts.get(topic, 0) + 1

    def _source_of(self, frame: bytes | memoryview | None, source: str | None) -> str:
        """The table (or message source) of an event, off the hot path: as a Produce action
        named it, or decoded again from its frame."""
        if source is not None:
            return source
        if frame is not None:
            buf = frame if type(frame) is bytes else bytes(frame)
            with contextlib.suppress(DecodeError):
                message = Decoder(PROTO_VERSION).decode(buf, offset=XLOG_DATA_HEADER_SIZE)
                if type(message) is Insert and message.relid in self._plans:
                    return self._plans[message.relid][0].table
                if type(message) is LogicalMessage and self._sources.message_plan is not None:
                    return self._sources.message_plan.table
        return self.config.table_name

    # ------------------------------------------------------------------ dead letters

    def _dead_letter(
        self,
        rejected: Rejected,
        txn: Transaction,
        event_lsn: Lsn | None,
        table: str,
        *,
        include_value: bool,
        replacing: int | None = None,
        forced: bool = False,
        topic: str | None = None,
    ) -> list[Action]:
        """A row that can never reach its topic: a dead-letter record, or a halt (per policy;
        ``forced``: the operator asked for it, whatever the policy). ``replacing`` is the size
        of the in-flight record it stands in for (it takes that record's place in ``txn``).
        With claim-check on, a row too large for Kafka (``include_value`` False) goes to its
        ``topic`` by reference instead."""
        lsn = format_lsn(txn.final_lsn)
        if (
            not include_value
            and not forced
            and topic is not None
            and self._by_reference_possible(rejected, table)
        ):
            return self._by_reference(rejected, topic, txn, event_lsn, table, replacing)
        event = event_id(rejected.headers)
        form = FULL if include_value else WITHOUT_VALUE
        if event_lsn is not None:
            known = self.memory.dead_letter_forms.get(event_lsn)
            form = max(form, known[1]) if known is not None else form
        if form == NONE_TAKEN or (self.config.halt_on_bad_row and not forced):
            if replacing is not None:
                self.tracker.abandon(txn, replacing)
                self._uncounted += 1
            if form == NONE_TAKEN:
                return self._halt_on(
                    f"event {event} in transaction at {lsn} cannot be delivered even to the "
                    f"dead-letter topic {self.config.dead_letter_topic}: {rejected.error}",
                    event_lsn,
                )
            return self._halt_on(
                f"event {event} in transaction at {lsn} cannot be delivered: {rejected.error}; "
                "policy is halt, so the slot stays before it",
                event_lsn,
            )
        record = dead_letter_form(
            dead_letter_record(
                rejected,
                topic=self.config.dead_letter_topic,
                source_lsn=lsn,
                source_table=table,
            ),
            form,
        )
        size = record_size(record.value)
        if replacing is None:
            self.tracker.sent(txn, size)
        else:
            self.tracker.resize(replacing, size)
            self._uncounted += 1  # counted as published already
        self.stats.dead_lettered += 1
        actions: list[Action] = [
            Notice(WARNING, f"dead-lettered event {event} from {table} at {lsn}: {rejected.error}"),
            # Alone: the broker's verdict on a dead-letter record must be its own.
            Produce(record, txn, alone=True, lsn=event_lsn),
        ]
        if record.value is None and rejected.value is not None:
            # Its payload is not in Kafka: the outbox row stays the only full copy, and prune
            # must know. The transaction waits for that record as for an acknowledgement.
            self.tracker.hold(txn)
            actions.append(Keep(event, table, lsn, rejected.error, txn))
        return actions

    def _next_form(self, failure: Failure, event_lsn: Lsn | None) -> int:
        """The dead-letter form after the refused one (remembered for replays)."""
        headers = failure.headers
        smallest = failure.key is None and all(name in IDENTIFYING_HEADERS for name, _ in headers)
        refused = (
            FULL if failure.value is not None else IDENTIFYING_ONLY if smallest else WITHOUT_VALUE
        )
        if event_lsn is not None:
            self.memory.dead_letter_forms[event_lsn] = (failure.delivery.final_lsn, refused + 1)
        return refused + 1

    def _shrink_dead_letter(self, failure: Failure, event_lsn: Lsn | None) -> list[Action]:
        """The dead-letter record itself was refused: try the next smaller form; halt when even
        the smallest is refused."""
        txn = failure.delivery
        size = record_size(failure.value)
        form = self._next_form(failure, event_lsn)
        if form == NONE_TAKEN:
            self.tracker.abandon(txn, size)
            return self._halt_on(
                f"event {event_id(failure.headers)} in transaction at "
                f"{format_lsn(txn.final_lsn)} cannot be delivered even to the dead-letter "
                f"topic {failure.topic}: {failure.reason}",
                event_lsn,
            )
        smaller = dead_letter_form(
            OutboxRecord(failure.topic, failure.key, failure.value, failure.headers, 0), form
        )
        self.tracker.resize(size, record_size(smaller.value))
        return [Produce(smaller, txn, alone=True, lsn=event_lsn)]

    def _halt_on(self, message: str, event_lsn: Lsn | None) -> list[Action]:
        """Stop before this row: wait for what was produced before it, confirm, then Finish."""
        if event_lsn is not None:
            message += f"; to skip it: cdc-relay skip --lsn {format_lsn(event_lsn)}"
        self._halt, self._halt_lsn = message, event_lsn
        self.state = State.STOPPING
        return []

    # ------------------------------------------------------------------ the producer's answers

    def refused(
        self,
        record: OutboxRecord,
        delivery: Transaction,
        reason: str,
        *,
        too_large: bool,
        frame: bytes | memoryview | None = None,
        lsn: Lsn | None = None,
        source: str | None = None,
    ) -> list[Action]:
        """produce() refused ``record`` outright (too large for the client, invalid), before
        any network: a verdict on this record alone. Its event's WAL position and source:
        ``lsn`` and ``source`` (of a Produce action), or read from ``frame``, the CopyData
        frame it came from."""
        self.stats.count_delivery_error("refused")
        event_lsn = xlog_data_start(frame) if frame is not None else lsn
        if record.topic == self.config.dead_letter_topic:
            failure = Failure(
                delivery, 0, reason, record.topic, record.key, record.value, record.headers
            )
            return self._shrink_dead_letter(failure, event_lsn)
        rejected = Rejected(reason, record.key, record.value, record.headers)
        return self._dead_letter(
            rejected,
            delivery,
            event_lsn,
            self._source_of(frame, source),
            include_value=not too_large,
            replacing=record_size(record.value),
            topic=record.topic,
        )

    def not_produced(self, record: OutboxRecord, delivery: Transaction) -> None:
        """produce() gave up on ``record`` (stop requested while the queue was full): it is not
        in flight, and its transaction will not be confirmed."""
        self.tracker.abandon(delivery, record_size(record.value))
        self._uncounted += 1

    def kept(self, delivery: Transaction) -> None:
        """A Keep action was carried out."""
        self.tracker.release(delivery)

    def _on_failure(self, txn: Transaction, err: Any, msg: Any) -> None:
        """A delivery callback with an error (from inside the producer's poll)."""
        self._failures.append(
            Failure(
                txn,
                err.code(),
                err.str(),
                msg.topic(),
                msg.key(),
                msg.value(),
                list(msg.headers() or ()),
            )
        )

    @property
    def has_failures(self) -> bool:
        return bool(self._failures)

    def judge(self, alone: Produce | None = None) -> list[Action]:
        """Verdicts on the failed deliveries reported since the last call. ``alone``: the
        record the driver produced alone and waited for, whose verdict these reports are."""
        failures, self._failures = self._failures, []
        event_lsn = alone.lsn if alone is not None else None
        actions: list[Action] = []
        resets: list[str] = []
        for failure in failures:
            verdict = verdicts.judge(failure.code, alone=alone is not None)
            if verdict is Verdict.IGNORE or self.state is State.DRAINING:
                continue  # purge echoes; and after a reset nothing more is decided
            self.stats.count_delivery_error(verdict.value)
            if verdict is Verdict.REFUSED and self.kafka is not None:
                # A failed record dooms its Kafka transaction: remember the verdict, abort, and
                # let the replay dead-letter the event (or halt) in a new one.
                if failure.topic == self.config.dead_letter_topic:
                    self._next_form(failure, event_lsn)
                else:
                    self._remember_refusal(failure, event_lsn)
                resets.append(
                    f"topic {failure.topic} refused a record for good ({failure.reason}); "
                    "aborting the Kafka transaction to dead-letter it in the next one"
                )
            elif verdict is Verdict.REFUSED:
                actions += self._refused_for_good(
                    failure, event_lsn, alone.source if alone is not None else None
                )
            elif verdict is Verdict.ISOLATE:
                self.memory.isolate.add((failure.delivery.final_lsn, failure.topic))
                resets.append(
                    f"topic {failure.topic} refused a batch ({failure.reason}); replaying the "
                    f"transaction at {format_lsn(failure.delivery.final_lsn)} one record at a "
                    "time to find the record it refuses"
                )
            else:
                resets.append(_describe_reset(failure))
        if resets:
            if self.state is State.STREAMING:
                self.state = State.DRAINING
                self.reset_reason = resets[0]
                actions.append(Reset(resets[0]))
            elif self.state is State.STOPPING:
                # Stopping anyway: what failed will not be acknowledged, so stop waiting.
                self._deadline = float("-inf")
                actions.append(Notice(WARNING, f"at shutdown: {resets[0]}"))
        return actions

    def _remember_refusal(self, failure: Failure, event_lsn: Lsn | None) -> tuple[str, bool]:
        size_error = verdicts.is_size_error(failure.code)
        error = f"topic {failure.topic} refused it: {failure.reason}"
        if event_lsn is not None:
            self.memory.poisoned[event_lsn] = (failure.delivery.final_lsn, error, size_error)
        return error, size_error

    def _refused_for_good(
        self, failure: Failure, event_lsn: Lsn | None, source: str | None
    ) -> list[Action]:
        if failure.topic == self.config.dead_letter_topic:
            return self._shrink_dead_letter(failure, event_lsn)
        txn = failure.delivery
        error, size_error = self._remember_refusal(failure, event_lsn)
        rejected = Rejected(error, failure.key, failure.value, failure.headers)
        return self._dead_letter(
            rejected,
            txn,
            event_lsn,
            self._source_of(None, source),
            include_value=not size_error,
            replacing=record_size(failure.value),
            topic=failure.topic,
        )

    # ------------------------------------------------------------------ time and stopping

    def received(self, now: float) -> None:
        """The driver read at least one frame (called once per batch, not per frame)."""
        self._last_received = now
        self._probe_sent_at = None

    def tick(self, now: float) -> list[Action]:
        """The clock moved: status updates, liveness of the server and of Kafka, commits of
        Kafka transactions, and the end of a shutdown or halt."""
        self._now = now
        if self.state is State.DONE:
            return []
        actions = self._kafka_liveness(now)
        if self.state is State.STOPPING:
            return actions + self._stopping(now)
        kafka = self.kafka
        if kafka is not None and self.state is State.STREAMING and kafka.due(now, self._counted()):
            actions.append(self._commit_kafka())
        probe = self._server_liveness(now)
        if probe is not None:
            return [*actions, probe]
        since = now - self._last_status_at
        config = self.config
        if since >= config.max_silence or (
            since >= config.status_interval and self.confirmed > self._last_sent
        ):
            actions.append(self._status(now))
        return actions

    def _server_liveness(self, now: float) -> Action | None:
        if not self.reading:
            # The socket is left unread (backpressure, a reset): silence tells nothing.
            self._last_received = now
            self._probe_sent_at = None
            return None
        config = self.config
        if self._probe_sent_at is not None:
            if now - self._probe_sent_at >= config.reply_timeout:
                return Reconnect(
                    f"the server has not answered for {now - self._last_received:.0f} s, not "
                    f"even to a request for a reply: the replication connection is presumed dead"
                )
            return None
        if now - self._last_received >= config.probe_after:
            self._probe_sent_at = now
            return self._status(now, reply_requested=True)
        return None

    def _kafka_liveness(self, now: float) -> list[Action]:
        stats, tracker = self.stats, self.tracker
        progress = stats.published + stats.dead_lettered - tracker.in_flight_events
        if progress != self._progress or tracker.in_flight_events == 0:
            self._progress, self._progress_at = progress, now
            stats.stalled_since = None
            if self._stall_reported:
                self._stall_reported = False
                return [Notice(INFO, "recovered: Kafka acknowledges deliveries again")]
            return []
        stats.stalled_since = self._progress_at
        stalled = now - self._progress_at
        if stalled < self.config.stall_warning or self._stall_reported:
            return []
        self._stall_reported = True
        head = tracker.oldest
        where = f" (the oldest in the transaction at {format_lsn(head)})" if head else ""
        return [
            Notice(
                WARNING,
                f"Kafka has acknowledged nothing for {stalled:.0f} s with "
                f"{tracker.in_flight_events} events in flight{where}: holding back, nothing "
                "past them is confirmed (brokers down, min.insync.replicas not met, a topic "
                "missing? see the Kafka lines above and cdc_relay_delivery_stalled_seconds)",
            )
        ]

    def _status(self, now: float, *, reply_requested: bool = False) -> SendStatus:
        confirmed = self.confirmed
        moved = confirmed > self._last_sent
        self._last_status_at = now
        self._last_sent = confirmed
        self.stats.confirmed_lsn = confirmed
        return SendStatus(confirmed, moved, reply_requested)

    def idle(self, now: float) -> list[Action]:
        """The stream has nothing more for now: in exactly-once mode, commit what is complete
        (latency) rather than wait for more."""
        self._now = now
        kafka = self.kafka
        if (
            kafka is not None
            and self.state is State.STREAMING
            and kafka.due(now, self._counted(), idle=True)
        ):
            return [self._commit_kafka()]
        return []

    def _commit_kafka(self) -> CommitTransaction:
        kafka = self.kafka
        assert kafka is not None
        kafka.committing = True
        progress = kafka.progress_to_commit(self._counted())
        config = self.config
        value = progress.encode(slot=config.slot_name)
        return CommitTransaction(
            progress, OutboxRecord(config.progress_topic, config.pipeline_key, value, [], 0)
        )

    def transaction_committed(self, progress: Progress) -> None:
        """The driver committed the Kafka transaction of ``progress``."""
        kafka = self.kafka
        assert kafka is not None and self.state is not State.DRAINING
        kafka.committed_as(progress)
        self.memory.progress = progress
        self._careful = self._needs_care()

    def stop(self) -> None:
        """Stop reading; finish once every record in flight is acknowledged (or the shutdown
        timeout has passed)."""
        if self.state is State.STREAMING:
            self.state = State.STOPPING

    def _stopping(self, now: float) -> list[Action]:
        if self._deadline is None:
            self._deadline = now + self.config.shutdown_timeout
        kafka = self.kafka
        if kafka is not None and kafka.open:
            # Commit what was produced (a part of a transaction, if need be): the commit waits
            # for every record, and the next session goes on from its progress record.
            return [] if kafka.committing else [self._commit_kafka()]
        unacked = self.tracker.in_flight_events
        if unacked > 0 and now < self._deadline:
            since = now - self._last_status_at
            if since >= self.config.max_silence or (
                since >= self.config.status_interval and self.confirmed > self._last_sent
            ):
                return [self._status(now)]
            return []
        self.state = State.DONE
        status = self._status(now)
        return [Finish(status.lsn, unacked, self._halt, self._halt_lsn)]


def dead_letter_form(record: OutboxRecord, form: int) -> OutboxRecord:
    """``record`` (a dead-letter record) in the given form (FULL, WITHOUT_VALUE,
    IDENTIFYING_ONLY)."""
    if form == FULL:
        return record
    if form == WITHOUT_VALUE:
        return OutboxRecord(record.topic, record.key, None, record.headers, 0)
    kept = [(k, v[:1024]) for k, v in record.headers if k in IDENTIFYING_HEADERS]
    return OutboxRecord(record.topic, None, None, kept, 0)


def event_id(headers: Headers) -> str:
    for name, value in headers:
        if name == "id":
            return value.decode("utf-8", "replace")
    return "(no id)"


def _describe_reset(failure: Failure) -> str:
    if failure.code in verdicts.MISSING_TOPIC:
        return (
            f"topic {failure.topic} does not exist ({failure.reason}); create it or enable "
            "auto-creation: nothing past it is confirmed, and the relay retries"
        )
    return f"delivery to topic {failure.topic} failed: {failure.reason}"
