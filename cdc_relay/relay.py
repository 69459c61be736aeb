"""The run loop: stream → decode → map → produce, with acks feeding the slot's confirmed position.

One session = one replication connection and one AckTracker. Anything that breaks the pipeline
(a final delivery failure, a lost connection) ends the session; the next session replays from
the slot's confirmed position, so nothing is lost (at-least-once). Failures are logged when the
state changes, never once per event.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from cdc_relay import admin
from cdc_relay.acks import AckTracker, Transaction
from cdc_relay.copydata import Keepalive, XLogData, parse_copy_data
from cdc_relay.database import (
    DatabaseUnavailable,
    check_connection,
    describe_psycopg_error,
    open_pool,
)
from cdc_relay.errors import (
    DeliveryError,
    HaltedOnBadRow,
    PrerequisiteError,
    RelayError,
    ReplicationError,
    SlotInUse,
)
from cdc_relay.lsn import Lsn, format_lsn
from cdc_relay.mapping import (
    ColumnMapping,
    OutboxRecord,
    Rejected,
    TablePlan,
    dead_letter_record,
)
from cdc_relay.pgoutput import (
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
from cdc_relay.publisher import (
    Publisher,
    RecordRefused,
    Verdict,
    classify_delivery_error,
    is_size_error,
)
from cdc_relay.settings import Settings
from cdc_relay.stream import ReplicationStream

log = logging.getLogger(__name__)

# Outbox updates, deletes and truncates are ignored by design (cleaning the table never emits
# events; the publication only sends inserts anyway), and so are origins, types and messages.
_IGNORED = (Update, Delete, Truncate, Origin, Type, LogicalMessage)

PROTO_VERSION = 1
# Connection failures that no amount of retrying fixes.
_FATAL_CONNECT_SQLSTATES = {"28P01", "28000", "3D000"}
_FATAL_CONNECT_TEXTS = ("password authentication failed", "no pg_hba.conf entry", "does not exist")
# The server drops a silent client after wal_sender_timeout (60 s by default): send a status
# update at least this often whatever happens, including while Kafka is down and the socket is
# left unread (then reply-requested keepalives go unseen). Shortened for a shorter timeout.
MAX_SILENCE = 10.0
READ_BATCH = 2_000
BROKER_WAIT_TIMEOUT = 5.0


@dataclass(slots=True)
class RelayStats:
    """Counters a user (and the tests) can read; also logged at shutdown."""

    published: int = 0
    dead_lettered: int = 0
    sessions: int = 0
    resets: int = 0
    confirmed_lsn: int = 0
    last_error: str | None = None
    reconnects_by_cause: dict[str, int] = field(default_factory=dict)


class FailureLog:
    """Logs a failure once when it starts or changes, and once when it clears."""

    def __init__(self) -> None:
        self._current: str | None = None

    def failed(self, message: str, *, level: int = logging.WARNING) -> None:
        if message != self._current:
            log.log(level, "%s", message)
            self._current = message

    def recovered(self, what: str) -> None:
        if self._current is not None:
            log.info("recovered: %s", what)
            self._current = None


class _Delivery:
    """The delivery callback of one transaction's records (one object per transaction, not per
    event): acks feed the tracker, failures are queued for the loop to judge."""

    __slots__ = ("failures", "tracker", "txn")

    def __init__(self, tracker: AckTracker, txn: Transaction, failures: list[Any]) -> None:
        self.tracker = tracker
        self.txn = txn
        self.failures = failures

    def __call__(self, err: Any, msg: Any) -> None:
        if err is None:
            self.tracker.acked(self.txn, _size(msg.key(), msg.value()))
        else:
            self.failures.append((self, err, msg))


def _size(key: bytes | None, value: bytes | None) -> int:
    return (len(key) if key else 0) + (len(value) if value else 0)


class Relay:
    """Runs sessions until stopped; reconnects with capped exponential backoff."""

    def __init__(
        self, settings: Settings, *, stop_requested: threading.Event | None = None
    ) -> None:
        self.settings = settings
        self.stats = RelayStats()
        self._stop = stop_requested or threading.Event()
        self._mapping = ColumnMapping(
            id=settings.column_id,
            aggregate_type=settings.column_aggregate_type,
            aggregate_id=settings.column_aggregate_id,
            event_type=settings.column_event_type,
            payload=settings.column_payload,
            headers=settings.column_headers or None,
            created_at=settings.column_created_at or None,
        )
        self._producer_config = settings.producer_config()
        self._producer_config.setdefault(
            "queue.buffering.max.messages", max(100_000, 2 * settings.max_in_flight_events)
        )
        self._failure_log = FailureLog()
        self._kafka_log = FailureLog()
        # librdkafka reports the same trouble over and over (per connection attempt): log each
        # kind once until deliveries flow again.
        self._kafka_errors_logged: set[int] = set()
        self._waiting_for_broker = False
        self._publisher: Publisher | None = None

    def stop(self) -> None:
        """Ask the loop to finish: stop reading, drain acks (bounded), confirm, return."""
        self._stop.set()

    # ---------------------------------------------------------------- outer loop

    def run(self) -> None:
        """Until stop(): sessions, with backoff between failures. Raises on fatal errors."""
        settings = self.settings
        backoff = 0.5
        self._check_credentials()
        pool = open_pool(settings.database_url.get_secret_value())
        try:
            while not self._stop.is_set():
                try:
                    self._session(pool)
                    backoff = 0.5
                except SlotInUse as exc:
                    self._failure_log.failed(
                        f"slot {settings.slot_name} is held by another process ({exc}); "
                        "waiting as a hot standby, retrying every "
                        f"{settings.standby_retry_seconds:g} s",
                        level=logging.INFO,
                    )
                    self._count("slot_in_use")
                    self._stop.wait(settings.standby_retry_seconds)
                    continue
                except (HaltedOnBadRow, PrerequisiteError):
                    raise
                except (ReplicationError, DeliveryError, psycopg.Error, PoolTimeout) as exc:
                    cause = _cause(exc)
                    self._count(cause)
                    self.stats.last_error = str(exc)
                    self._failure_log.failed(
                        f"{_describe(exc)}; reconnecting from slot {settings.slot_name} "
                        f"(backoff up to {settings.reconnect_max_backoff_seconds:g} s)"
                    )
                    if isinstance(exc, DeliveryError):
                        # Its queue holds records of a pipeline that is gone.
                        self._reset_publisher()
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, settings.reconnect_max_backoff_seconds)
        finally:
            pool.close()
            if self._publisher is not None:
                remaining = self._publisher.flush(0)
                if remaining:
                    log.debug("%d records left unacknowledged at exit", remaining)

    def _check_credentials(self) -> None:
        """Fail fast on what retrying cannot fix (bad password, unknown database or role); a
        database that is merely down is waited for by the loop."""
        try:
            check_connection(self.settings.database_url.get_secret_value())
        except DatabaseUnavailable as exc:
            cause = exc.__cause__
            if getattr(cause, "sqlstate", None) in _FATAL_CONNECT_SQLSTATES or any(
                text in str(exc) for text in _FATAL_CONNECT_TEXTS
            ):
                raise
            log.warning("%s; will retry", exc)

    def _count(self, cause: str) -> None:
        by_cause = self.stats.reconnects_by_cause
        by_cause[cause] = by_cause.get(cause, 0) + 1

    def _reset_publisher(self) -> None:
        # A fresh producer after a delivery failure: a fatal idempotence error would poison the
        # old one for good.
        if self._publisher is not None:
            self._publisher.discard()
            self._publisher = None
            self.stats.resets += 1

    def _on_kafka_error(self, error: Any) -> None:
        # librdkafka reports transient broker trouble here and keeps retrying on its own.
        code = error.code()
        if self._waiting_for_broker or code in self._kafka_errors_logged:
            log.debug("Kafka: %s", error.str())
            return
        self._kafka_errors_logged.add(code)
        log.warning("Kafka: %s (librdkafka keeps retrying)", error.str())

    def kafka_flowing(self) -> None:
        """Deliveries are acknowledged again: the next Kafka trouble is news."""
        if self._kafka_errors_logged:
            log.info("recovered: Kafka acknowledges deliveries again")
            self._kafka_errors_logged.clear()

    def _ensure_publisher(self) -> Publisher:
        if self._publisher is not None and self._publisher.fatal_error:
            self._reset_publisher()
        if self._publisher is None:
            self._publisher = Publisher(self._producer_config, on_error=self._on_kafka_error)
        publisher = self._publisher
        # Do not take the slot while the broker is unreachable: a standby with a working broker
        # may take it instead, and the server keeps the WAL either way.
        self._waiting_for_broker = True
        while not self._stop.is_set():
            try:
                publisher.wait_for_broker(BROKER_WAIT_TIMEOUT)
                self._waiting_for_broker = False
                self._kafka_log.recovered("Kafka is reachable")
                break
            except DeliveryError as exc:
                log.debug("Kafka still unreachable: %s", exc)
                self._kafka_log.failed(
                    f"Kafka at {self.settings.kafka_bootstrap_servers} is unreachable; waiting "
                    "for it before taking the slot"
                )
        return publisher

    # ---------------------------------------------------------------- one session

    def _session(self, pool: ConnectionPool) -> None:
        settings = self.settings
        publisher = self._ensure_publisher()
        if self._stop.is_set():
            return
        with pool.connection() as conn:
            admin.require_ready(conn, settings)
        stream = ReplicationStream.connect(settings.database_url.get_secret_value())
        try:
            stream.start(
                slot=settings.slot_name,
                publication=settings.publication_name,
                start_lsn=Lsn(0),
                proto_version=PROTO_VERSION,
            )
            # Read the start position only now that the slot is ours: nobody else can move it,
            # and a status update below it would move the slot backwards.
            with pool.connection() as conn:
                slot = admin.require_ready(conn, settings)
                timeout = admin.wal_sender_timeout(conn)
            start = slot.confirmed or Lsn(0)
            max_silence = min(MAX_SILENCE, timeout / 4) if timeout else MAX_SILENCE
            self.stats.sessions += 1
            self._failure_log.recovered(f"streaming from slot {settings.slot_name}")
            log.info(
                "streaming slot=%s publication=%s from lsn=%s",
                settings.slot_name,
                settings.publication_name,
                format_lsn(start),
            )
            _Session(self, stream, publisher, start, max_silence=max_silence).run()
        finally:
            stream.close()


class _Session:
    """The hot loop of one replication session."""

    def __init__(
        self,
        relay: Relay,
        stream: ReplicationStream,
        publisher: Publisher,
        start: Lsn,
        *,
        max_silence: float = MAX_SILENCE,
    ) -> None:
        self.max_silence = max_silence
        self.relay = relay
        self.settings = relay.settings
        self.stats = relay.stats
        self.stream = stream
        self.publisher = publisher
        self.tracker = AckTracker(start)
        self.decoder = Decoder(PROTO_VERSION)
        self.failures: list[Any] = []
        self.plans: dict[int, TablePlan] = {}
        self.table_names: dict[int, str] = {}
        self.txn: Transaction | None = None
        self.delivery: _Delivery | None = None
        self.last_sent_lsn = start
        self.last_status_at = 0.0
        self.stats.confirmed_lsn = start
        schema, table = self.settings.table_schema, self.settings.table_name
        self.outbox_name = (schema, table)

    def run(self) -> None:
        try:
            self.stream_until_stopped()
        except HaltedOnBadRow:
            # Confirm everything before the bad row, then stop.
            self.shutdown()
            raise
        except DeliveryError:
            # Keep what was acknowledged: fewer duplicates on replay.
            with contextlib.suppress(RelayError):
                self.send_status()
            raise
        self.shutdown()

    def stream_until_stopped(self) -> None:
        # Locals: this is the hot loop.
        tracker, stream, publisher = self.tracker, self.stream, self.publisher
        handle, stop = self.handle_frame, self.relay._stop
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
        message = parse_copy_data(frame)
        if type(message) is Keepalive:
            if self.tracker.idle:
                self.tracker.observe_idle_position(message.wal_end)
            if message.reply_requested:
                self.send_status()
            return
        assert type(message) is XLogData
        decoded = self.decoder.decode(message.payload, lsn=message.start_lsn)
        if type(decoded) is Insert:
            plan = self.plans.get(decoded.relid)
            if plan is not None:
                self.publish(plan.map(decoded.new), plan)
        elif type(decoded) is Begin:
            self.txn = self.tracker.begin(decoded.final_lsn)
            self.delivery = _Delivery(self.tracker, self.txn, self.failures)
        elif type(decoded) is Commit:
            if self.txn is None:
                raise ReplicationError("Commit without Begin in the replication stream")
            self.tracker.commit(self.txn, decoded.end_lsn)
            self.txn = None
            self.delivery = None
        elif type(decoded) is Relation:
            self.on_relation(decoded)
        elif not isinstance(decoded, _IGNORED):
            raise ReplicationError(
                f"unexpected {type(decoded).__name__} message for protocol version {PROTO_VERSION}"
            )

    def on_relation(self, relation: Relation) -> None:
        self.table_names[relation.relid] = f"{relation.namespace}.{relation.name}"
        if (relation.namespace, relation.name) != self.outbox_name:
            self.plans.pop(relation.relid, None)
            return
        # A new Relation message follows every schema change: re-resolve the columns. A table
        # that lost a mapped column cannot deliver anything, so that is fatal, not per row.
        try:
            self.plans[relation.relid] = TablePlan(
                relation, self.relay._mapping, self.settings.topic_template
            )
        except RelayError as exc:
            raise PrerequisiteError(str(exc)) from None

    def publish(self, outcome: OutboxRecord | Rejected, plan: TablePlan) -> None:
        txn, delivery = self.txn, self.delivery
        assert txn is not None and delivery is not None
        if type(outcome) is Rejected:
            self.dead_letter(outcome, delivery, table=plan.table, include_value=True)
            return
        assert isinstance(outcome, OutboxRecord)
        try:
            self.publisher.produce(outcome, delivery)
        except RecordRefused as refused:
            rejected = Rejected(str(refused), outcome.key, outcome.value, outcome.headers)
            self.dead_letter(
                rejected, delivery, table=plan.table, include_value=not refused.too_large
            )
            return
        self.tracker.sent(txn, _size(outcome.key, outcome.value))
        self.stats.published += 1

    def dead_letter(
        self,
        rejected: Rejected,
        delivery: _Delivery,
        *,
        table: str,
        include_value: bool,
        replacing: int | None = None,
    ) -> None:
        """A row that can never reach its topic: dead-letter it, or halt (per policy).

        ``replacing`` is the size of the in-flight record this one stands in for (a record
        Kafka refused at delivery); its acknowledgement then counts as the original's.
        """
        txn = delivery.txn
        lsn = format_lsn(txn.final_lsn)
        event_id = _event_id(rejected.headers)
        if self.settings.dead_letter_policy == "halt":
            raise HaltedOnBadRow(
                f"event {event_id} in transaction at {lsn} cannot be delivered: "
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
            "dead-lettered event %s from %s at %s: %s", event_id, table, lsn, rejected.error
        )

    def produce_dead_letter(
        self, record: OutboxRecord, delivery: _Delivery, *, replacing: int | None
    ) -> None:
        try:
            self.publisher.produce(record, delivery)
        except RecordRefused:
            # Too large even for the dead-letter topic: send what identifies the row.
            record = OutboxRecord(record.topic, record.key, None, record.headers, 0)
            self.publisher.produce(record, delivery)
        size = _size(record.key, record.value)
        if replacing is None:
            self.tracker.sent(delivery.txn, size)
        else:
            self.tracker.resize(replacing, size)

    # ------------------------------------------------------------ delivery failures

    def judge_failures(self) -> None:
        failures, self.failures[:] = list(self.failures), []
        dead_letter_topic = self.settings.dead_letter_topic
        for delivery, err, msg in failures:
            verdict = classify_delivery_error(err.code())
            if verdict is Verdict.IGNORE:
                continue
            if verdict is Verdict.PIPELINE:
                raise DeliveryError(f"delivery to topic {msg.topic()} failed: {err.str()}")
            headers = list(msg.headers() or [])
            size = _size(msg.key(), msg.value())
            if msg.topic() != dead_letter_topic:
                # Kafka refused the record for good: it goes to the dead-letter topic instead.
                self.stats.published -= 1
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
            elif msg.value() is not None:
                # The dead-letter record itself was refused (too large): send it without value.
                stripped = OutboxRecord(msg.topic(), msg.key(), None, headers, 0)
                self.produce_dead_letter(stripped, delivery, replacing=size)
            else:
                raise HaltedOnBadRow(
                    f"event {_event_id(headers)} in transaction at "
                    f"{format_lsn(delivery.txn.final_lsn)} cannot be delivered even to the "
                    f"dead-letter topic {dead_letter_topic}: {err.str()}"
                )

    # ------------------------------------------------------------ status updates

    def maybe_send_status(self) -> None:
        now = time.monotonic()
        since = now - self.last_status_at
        if since >= self.max_silence or (
            since >= self.settings.status_interval_seconds
            and self.tracker.advance() > self.last_sent_lsn
        ):
            self.send_status()

    def send_status(self) -> None:
        position = self.tracker.advance()
        self.stream.send_status(flushed=position)
        self.last_status_at = time.monotonic()
        if position != self.last_sent_lsn:
            log.debug("confirmed slot=%s lsn=%s", self.settings.slot_name, format_lsn(position))
            if self.stats.published:
                self.relay.kafka_flowing()
        self.last_sent_lsn = position
        self.stats.confirmed_lsn = position

    def shutdown(self) -> None:
        """Stop reading; wait (bounded) for in-flight acks; confirm what was acked."""
        deadline = time.monotonic() + self.settings.shutdown_timeout_seconds
        tracker = self.tracker
        while tracker.in_flight_events and time.monotonic() < deadline:
            self.publisher.poll(0.05)
            if self.failures:
                try:
                    self.judge_failures()
                except (DeliveryError, HaltedOnBadRow) as exc:
                    log.warning("at shutdown: %s", exc)
                    break
            if time.monotonic() - self.last_status_at >= self.max_silence:
                self.send_status()
        if tracker.in_flight_events:
            log.warning(
                "shutdown: %d events still unacknowledged after %.0f s; they will be sent "
                "again on restart",
                tracker.in_flight_events,
                self.settings.shutdown_timeout_seconds,
            )
        self.send_status()
        log.info(
            "stopped slot=%s confirmed lsn=%s published=%d dead_lettered=%d",
            self.settings.slot_name,
            format_lsn(tracker.confirmed),
            self.stats.published,
            self.stats.dead_lettered,
        )


def _event_id(headers: list[tuple[str, bytes]]) -> str:
    for name, value in headers:
        if name == "id":
            return value.decode("utf-8", "replace")
    return "(no id)"


def _cause(exc: BaseException) -> str:
    if isinstance(exc, DeliveryError):
        return "kafka"
    if isinstance(exc, ReplicationError):
        return "replication"
    return "database"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error):
        return f"database error: {describe_psycopg_error(exc)}"
    return str(exc)
