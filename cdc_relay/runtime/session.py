"""One replication session: the hot loop from CopyData frames to produced records, the
judging of delivery reports, dead-lettering, status updates and a draining shutdown.

A session owns one AckTracker; when it ends for any reason the tracker goes with it and the
next session replays from the slot's confirmed position.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cdc_relay.adapters.kafka import (
    ProduceInterrupted,
    Publisher,
    RecordRefused,
    Verdict,
    classify_delivery_error,
    is_size_error,
)
from cdc_relay.adapters.replication import ReplicationStream
from cdc_relay.core.acks import AckTracker, Transaction
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
    OutboxRecord,
    Rejected,
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
)
from cdc_relay.core.stats import RelayStats
from cdc_relay.errors import (
    DecodeError,
    DeliveryError,
    HaltedOnBadRow,
    PrerequisiteError,
    RelayError,
    ReplicationError,
)
from cdc_relay.settings import Settings

log = logging.getLogger(__name__)

PROTO_VERSION = 1
# The server drops a silent client after wal_sender_timeout (60 s by default): send a status
# update at least this often whatever happens, including while Kafka is down and the socket is
# left unread (then reply-requested keepalives go unseen). Shortened for a shorter timeout.
MAX_SILENCE = 10.0
READ_BATCH = 2_000

# Outbox updates, deletes and truncates are ignored by design (cleaning the table never emits
# events; the publication only sends inserts anyway), and so are origins, types and messages.
_IGNORED = (Update, Delete, Truncate, Origin, Type, LogicalMessage)
# The dead-letter record of last resort keeps only what identifies the row.
_IDENTIFYING_HEADERS = ("id", "error", "source_lsn", "source_table")


class Delivery:
    """The delivery callback of one transaction's records (one object per transaction, not per
    event): acks feed the tracker, failures are queued for the loop to judge. The ack that
    completes a committed transaction is its one latency observation."""

    __slots__ = ("commit_time", "failures", "stats", "tracker", "txn")

    def __init__(
        self,
        tracker: AckTracker,
        txn: Transaction,
        failures: list[Any],
        stats: RelayStats | None = None,
        commit_time: int = 0,
    ) -> None:
        self.tracker = tracker
        self.txn = txn
        self.failures = failures
        self.stats = stats
        self.commit_time = commit_time

    def __call__(self, err: Any, msg: Any) -> None:
        if err is None:
            txn = self.txn
            self.tracker.acked(txn, record_size(msg.key(), msg.value()))
            if txn.pending == 0 and txn.committed and self.stats is not None:
                self.stats.transaction_acknowledged(self.commit_time)
        else:
            self.failures.append((self, err, msg))


def record_size(key: bytes | None, value: bytes | None) -> int:
    return (len(key) if key else 0) + (len(value) if value else 0)


def event_id(headers: list[tuple[str, bytes]]) -> str:
    for name, value in headers:
        if name == "id":
            return value.decode("utf-8", "replace")
    return "(no id)"


class Session:
    """The hot loop of one replication session."""

    def __init__(
        self,
        *,
        settings: Settings,
        mapping: ColumnMapping,
        stats: RelayStats,
        stop: threading.Event,
        stream: ReplicationStream,
        publisher: Publisher,
        start: Lsn,
        max_silence: float = MAX_SILENCE,
        on_acks_flowing: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.mapping = mapping
        self.stats = stats
        self.stop = stop
        self.stream = stream
        self.publisher = publisher
        self.max_silence = max_silence
        self.on_acks_flowing = on_acks_flowing
        self.tracker = AckTracker(start)
        self.decoder = Decoder(PROTO_VERSION)
        self.failures: list[Any] = []
        self.plans: dict[int, TablePlan] = {}
        self.delivery: Delivery | None = None
        # Records that will never be acknowledged (the cause of a halt): shutdown does not wait
        # for them.
        self.abandoned = 0
        self.last_status_at = 0.0
        self.stats.confirmed_lsn = start
        self.stats.tracker = self.tracker
        # Records produced or dead-lettered before the open transaction began: tells at Commit
        # whether the transaction carried any (only those are latency observations).
        self.records_at_begin = 0
        self.outbox_name = (settings.table_schema, settings.table_name)

    def run(self) -> None:
        try:
            self.stream_until_stopped()
        except HaltedOnBadRow:
            # Confirm everything before the bad row, then stop.
            self.shutdown()
            raise
        except ProduceInterrupted:
            # Stopped while Kafka's queue was full: the open transaction stays unconfirmed.
            self.shutdown()
            return
        except Exception:
            # Keep what was acknowledged (fewer duplicates on replay), if the server still
            # listens; the original error is what matters.
            with contextlib.suppress(Exception):
                self.send_status()
            raise
        self.shutdown()

    def stream_until_stopped(self) -> None:
        # Locals: this is the hot loop.
        tracker, stream, publisher = self.tracker, self.stream, self.publisher
        handle, stop = self.handle_frame, self.stop
        max_events = self.settings.max_in_flight_events
        max_bytes = self.settings.max_in_flight_bytes
        while not stop.is_set():
            publisher.poll(0)
            if self.failures:
                self.judge_failures()
            self.maybe_send_status()

            if tracker.in_flight_events >= max_events or tracker.in_flight_bytes >= max_bytes:
                # Backpressure: leave the socket unread until acks drain (the server buffers).
                publisher.poll(0.01)
                continue

            processed = 0
            while processed < READ_BATCH:
                frame = stream.read()
                if frame is None:
                    break
                handle(frame)
                processed += 1
                if tracker.in_flight_events >= max_events or tracker.in_flight_bytes >= max_bytes:
                    break
            if processed == 0:
                stream.wait(0.005 if tracker.in_flight_events else 0.1)

    # ------------------------------------------------------------ frames and messages

    def handle_frame(self, frame: bytes | memoryview) -> None:
        if len(frame) >= XLOG_DATA_HEADER_SIZE and frame[0] == XLOG_DATA_TYPE:
            # Nearly every frame: XLogData, read in place (parse_copy_data would build an
            # object per event). Its start position is only quoted in decoding errors.
            try:
                decoded = self.decoder.decode(frame[XLOG_DATA_HEADER_SIZE:])
            except DecodeError as exc:
                lsn = xlog_data_start(frame)
                raise DecodeError(exc.reason, offset=exc.offset, lsn=lsn) from None
        else:
            message = parse_copy_data(frame)  # a keepalive: any other frame raises here
            assert type(message) is Keepalive
            self.tracker.observe_idle_position(message.wal_end)
            if message.reply_requested:
                self.send_status()
            return
        if type(decoded) is Insert:
            plan = self.plans.get(decoded.relid)
            if plan is not None:
                self.publish(plan.map(decoded.new), plan)
        elif type(decoded) is Begin:
            self.delivery = Delivery(
                self.tracker,
                self.tracker.begin(decoded.final_lsn),
                self.failures,
                self.stats,
                decoded.commit_time,
            )
            self.records_at_begin = self.stats.published + self.stats.dead_lettered
        elif type(decoded) is Commit:
            delivery = self.delivery
            if delivery is None:
                raise ReplicationError("Commit without Begin in the replication stream")
            txn = delivery.txn
            self.tracker.commit(txn, decoded.end_lsn)
            if txn.pending == 0 and (
                self.stats.published + self.stats.dead_lettered != self.records_at_begin
            ):
                # Every record was acknowledged before the Commit message was read.
                self.stats.transaction_acknowledged(delivery.commit_time)
            self.delivery = None
        elif type(decoded) is Relation:
            self.on_relation(decoded)
        elif not isinstance(decoded, _IGNORED):
            raise ReplicationError(
                f"unexpected {type(decoded).__name__} message for protocol version {PROTO_VERSION}"
            )

    def on_relation(self, relation: Relation) -> None:
        if (relation.namespace, relation.name) != self.outbox_name:
            plan = self.plans.pop(relation.relid, None)
            if plan is not None:
                # The outbox itself under a new name: skipping its rows would confirm past
                # them, so stop before this transaction instead.
                raise PrerequisiteError(
                    f"outbox table {plan.table} was renamed to {relation.namespace}."
                    f"{relation.name} while the relay ran; its new rows are not published. "
                    "Rename it back, or point CDC_RELAY_OUTBOX_TABLE at it and run "
                    "`cdc-relay setup`"
                )
            return
        # A new Relation message follows every schema change: re-resolve the columns. A table
        # that lost a mapped column cannot deliver anything, so that is fatal, not per row.
        try:
            self.plans[relation.relid] = TablePlan(
                relation, self.mapping, self.settings.topic_template
            )
        except RelayError as exc:
            raise PrerequisiteError(str(exc)) from None

    def publish(self, outcome: OutboxRecord | Rejected, plan: TablePlan) -> None:
        delivery = self.delivery
        assert delivery is not None
        if isinstance(outcome, Rejected):
            self.dead_letter(outcome, delivery, table=plan.table, include_value=True)
            return
        try:
            self.publisher.produce(outcome, delivery, self.while_queue_full)
        except RecordRefused as refused:
            self.stats.count_delivery_error("refused")
            rejected = Rejected(str(refused), outcome.key, outcome.value, outcome.headers)
            self.dead_letter(
                rejected, delivery, table=plan.table, include_value=not refused.too_large
            )
            return
        self.tracker.sent(delivery.txn, record_size(outcome.key, outcome.value))
        stats = self.stats
        stats.published += 1
        by_topic = stats.published_by_topic
        by_topic[outcome.topic] = by_topic.get(outcome.topic, 0) + 1

    def while_queue_full(self) -> bool:
        """Called while produce() waits for room: keep the server informed; False to give up."""
        self.maybe_send_status()
        return not self.stop.is_set()

    # ------------------------------------------------------------ dead letters

    def dead_letter(
        self,
        rejected: Rejected,
        delivery: Delivery,
        *,
        table: str,
        include_value: bool,
        replacing: int | None = None,
    ) -> None:
        """A row that can never reach its topic: dead-letter it, or halt (per policy).

        ``replacing`` is the size of the in-flight record this one stands in for (a record
        Kafka refused at delivery); its acknowledgement then counts as the original's.
        """
        lsn = format_lsn(delivery.txn.final_lsn)
        event = event_id(rejected.headers)
        if self.settings.dead_letter_policy == "halt":
            if replacing is not None:
                self.abandoned += 1
            raise HaltedOnBadRow(
                f"event {event} in transaction at {lsn} cannot be delivered: "
                f"{rejected.error}; policy is halt, so the slot stays before it"
            )
        record = dead_letter_record(
            rejected,
            topic=self.settings.dead_letter_topic,
            source_lsn=lsn,
            source_table=table,
            include_value=include_value,
        )
        self.produce_dead_letter(record, delivery, replacing=replacing)
        self.stats.dead_lettered += 1
        log.warning(
            "dead-lettered event %s from %s at %s: %s",
            event,
            table,
            lsn,
            rejected.error,
            extra={"slot": self.settings.slot_name, "lsn": lsn},
        )

    def produce_dead_letter(
        self, record: OutboxRecord, delivery: Delivery, *, replacing: int | None, shrink: int = 0
    ) -> None:
        """Produce a dead-letter record. When Kafka refuses it, shrink it and retry: without
        the value, then with only the identifying headers and no key; halt if even that fails.
        ``shrink`` skips forms already refused."""
        forms = [
            record,
            OutboxRecord(record.topic, record.key, None, record.headers, 0),
            OutboxRecord(
                record.topic,
                None,
                None,
                [(k, v[:1024]) for k, v in record.headers if k in _IDENTIFYING_HEADERS],
                0,
            ),
        ]
        error = "refused"
        for form in forms[shrink:]:
            try:
                self.publisher.produce(form, delivery, self.while_queue_full)
            except RecordRefused as refused:
                error = str(refused)
                continue
            size = record_size(form.key, form.value)
            if replacing is None:
                self.tracker.sent(delivery.txn, size)
            else:
                self.tracker.resize(replacing, size)
            return
        if replacing is not None:
            self.abandoned += 1
        raise HaltedOnBadRow(
            f"event {event_id(record.headers)} in transaction at "
            f"{format_lsn(delivery.txn.final_lsn)} cannot be delivered even to the dead-letter "
            f"topic {record.topic}: {error}"
        )

    # ------------------------------------------------------------ delivery failures

    def judge_failures(self) -> None:
        failures, self.failures[:] = list(self.failures), []
        dead_letter_topic = self.settings.dead_letter_topic
        for delivery, err, msg in failures:
            verdict = classify_delivery_error(err.code())
            if verdict is Verdict.IGNORE:
                continue
            self.stats.count_delivery_error(verdict.value)
            if verdict is Verdict.PIPELINE:
                raise DeliveryError(f"delivery to topic {msg.topic()} failed: {err.str()}")
            headers = list(msg.headers() or [])
            size = record_size(msg.key(), msg.value())
            if msg.topic() != dead_letter_topic:
                # Kafka refused the record for good: it goes to the dead-letter topic instead.
                self.stats.published -= 1
                by_topic = self.stats.published_by_topic
                by_topic[msg.topic()] = by_topic.get(msg.topic(), 1) - 1
                rejected = Rejected(
                    f"topic {msg.topic()} refused it: {err.str()}", msg.key(), msg.value(), headers
                )
                self.dead_letter(
                    rejected,
                    delivery,
                    table=self.settings.outbox_table,
                    include_value=not is_size_error(err.code()),
                    replacing=size,
                )
            else:
                # The dead-letter record itself was refused: retry the smaller forms.
                record = OutboxRecord(msg.topic(), msg.key(), msg.value(), headers, 0)
                shrink = 1 if msg.value() is not None else 2
                smallest = all(name in _IDENTIFYING_HEADERS for name, _ in headers)
                if shrink == 2 and msg.key() is None and smallest:
                    shrink = 3  # already the smallest form: halt
                self.produce_dead_letter(record, delivery, replacing=size, shrink=shrink)

    # ------------------------------------------------------------ status updates

    def maybe_send_status(self) -> None:
        now = time.monotonic()
        self.stats.heartbeat = now  # the loop is alive (endpoint.py /healthz)
        since = now - self.last_status_at
        if since >= self.max_silence or (
            since >= self.settings.status_interval_seconds
            and self.tracker.advance() > self.stats.confirmed_lsn
        ):
            self.send_status()

    def send_status(self) -> None:
        position = self.tracker.advance()
        self.stream.send_status(flushed=position)
        self.last_status_at = time.monotonic()
        if position != self.stats.confirmed_lsn:
            slot, lsn = self.settings.slot_name, format_lsn(position)
            log.debug("confirmed slot=%s lsn=%s", slot, lsn, extra={"slot": slot, "lsn": lsn})
            if self.stats.published:
                self.on_acks_flowing()
        self.stats.confirmed_lsn = position

    def shutdown(self) -> None:
        """Stop reading; wait (bounded) for in-flight acks; confirm what was acked."""
        deadline = time.monotonic() + self.settings.shutdown_timeout_seconds
        tracker = self.tracker
        while tracker.in_flight_events > self.abandoned and time.monotonic() < deadline:
            self.stats.beat()
            self.publisher.poll(0.05)
            if self.failures:
                try:
                    self.judge_failures()
                except (DeliveryError, HaltedOnBadRow) as exc:
                    log.warning("at shutdown: %s", exc)
                    break
            if time.monotonic() - self.last_status_at >= self.max_silence:
                self.send_status()
        unacked = tracker.in_flight_events - self.abandoned
        if unacked > 0:
            log.warning(
                "shutdown: %d events still unacknowledged after %.0f s; they will be sent "
                "again on restart",
                unacked,
                self.settings.shutdown_timeout_seconds,
                extra={"slot": self.settings.slot_name, "lsn": format_lsn(tracker.confirmed)},
            )
        self.send_status()
        slot, lsn = self.settings.slot_name, format_lsn(tracker.confirmed)
        log.info(
            "stopped slot=%s confirmed lsn=%s published=%d dead_lettered=%d",
            slot,
            lsn,
            self.stats.published,
            self.stats.dead_lettered,
            extra={"slot": slot, "lsn": lsn},
        )
