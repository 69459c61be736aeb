"""The outer loop of `cdc-relay run`: sessions, reconnects with capped exponential backoff,
waiting for the broker and for the slot (hot standby), and which failures are fatal.

Anything that breaks the pipeline (a final delivery failure, a lost connection) ends the
session; the next one replays from the slot's confirmed position, so nothing is lost
(at-least-once). Failures are logged when the state changes, never once per event.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg
from confluent_kafka import KafkaError
from psycopg_pool import ConnectionPool, PoolTimeout

from cdc_relay.adapters import progress
from cdc_relay.adapters.database import check_connection, describe_psycopg_error, open_pool
from cdc_relay.adapters.kafka import Publisher
from cdc_relay.adapters.lag import LagSampler
from cdc_relay.adapters.replication import ReplicationStream
from cdc_relay.core.lsn import Lsn, format_lsn
from cdc_relay.core.pipeline import (
    PROTO_VERSION,
    Keep,
    Memory,
    Pipeline,
    PipelineConfig,
    TableSource,
)
from cdc_relay.core.schedule import ScheduledStats
from cdc_relay.core.stats import RelayStats
from cdc_relay.core.transactions import TransactionLimits
from cdc_relay.errors import (
    ConfigError,
    DatabaseUnavailable,
    DeliveryError,
    HaltedOnBadRow,
    PrerequisiteError,
    ProducerFenced,
    ReplicationError,
    SlotInUse,
    SlotLost,
)
from cdc_relay.ops import admin, control, skip
from cdc_relay.runtime.resume import ResumeCheck
from cdc_relay.runtime.scheduler import ScheduledMover
from cdc_relay.runtime.session import Session, settle_publisher
from cdc_relay.settings import Settings, redact_kafka_config

log = logging.getLogger(__name__)

# The server drops a silent client after wal_sender_timeout (60 s by default): send a status
# update at least this often whatever happens, including while Kafka is down and the socket is
# left unread (then reply-requested keepalives go unseen). Shortened for a shorter timeout.
MAX_SILENCE = 10.0

# Connection failures that no amount of retrying fixes.
_FATAL_CONNECT_SQLSTATES = {"28P01", "28000", "3D000"}
_FATAL_CONNECT_TEXTS = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    # An unknown host at start is a configuration error; a database that is down is waited for.
    "could not translate host name",
    "failed to resolve host",
)
BROKER_WAIT_TIMEOUT = 5.0
# librdkafka errors that say the broker refuses this client: its credentials or its TLS setup.
# At start they are configuration errors (exit 2); later (rotated credentials) they are waited
# out like an outage, and named in the log.
_REFUSED_CLIENT = {
    KafkaError._AUTHENTICATION: "Kafka refused the relay's credentials",
    KafkaError.SASL_AUTHENTICATION_FAILED: "Kafka refused the relay's credentials",
    KafkaError._SSL: "the TLS handshake with Kafka failed",
}


class FailureLog:
    """Logs a failure once when it starts or changes, and once when it clears."""

    def __init__(self) -> None:
        self._current: str | None = None

    def failed(
        self,
        message: str,
        *,
        kind: str | None = None,
        level: int = logging.WARNING,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """``kind`` names the failure when ``message`` quotes details that vary while it lasts
        (librdkafka words one outage as "Connection refused", then as "1/1 brokers are
        down"): a new kind is a change, new details are not."""
        current = kind if kind is not None else message
        if current != self._current:
            log.log(level, "%s", message, extra=extra)
            self._current = current

    def recovered(self, what: str, *, extra: dict[str, Any] | None = None) -> None:
        if self._current is not None:
            log.info("recovered: %s", what, extra=extra)
            self._current = None


class Relay:
    """Runs sessions until stopped; reconnects with capped exponential backoff."""

    def __init__(
        self, settings: Settings, *, stop_requested: threading.Event | None = None
    ) -> None:
        self.settings = settings
        self.stats = RelayStats()
        self._stop = stop_requested or threading.Event()
        # What the pipeline learnt about single events (refusals, isolation): kept across
        # sessions, so that a replay does not try a refused record again.
        self._memory = Memory()
        self._producer_config = settings.producer_config()
        self._failure_log = FailureLog()
        self._kafka_log = FailureLog()
        # librdkafka reports the same trouble over and over (per connection attempt): log each
        # kind once until deliveries flow again.
        self._kafka_errors_logged: set[int] = set()
        self._waiting_for_broker = False
        self._publisher: Publisher | None = None
        self._last_kafka_error: tuple[int, str] | None = None
        # Exactly-once: the pipeline's transactional.id (derived once from the cluster's
        # system identifier), and whether the current producer has registered it.
        self._transactional_id: str | None = None
        self._transactions_ready = False
        # Failover: what each session resumes (same cluster? a new timeline? phantoms?).
        self._resume = ResumeCheck(settings.slot_name, self.stats)
        # Scheduled events: one ScheduledStats for all sessions (its counters never go down).
        self.scheduled_stats = ScheduledStats()

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
        sampler = LagSampler(
            pool,
            settings.slot_name,
            self.stats,
            interval=settings.lag_sample_interval_seconds,
            probe_broker=self._probe_broker,
        )
        sampler.start()
        slot_field = {"slot": settings.slot_name}
        try:
            while not self._stop.is_set():
                sessions_before = self.stats.sessions
                try:
                    self._session(pool)
                except SlotInUse as exc:
                    self._failure_log.failed(
                        f"slot {settings.slot_name} is held by another process ({exc}); "
                        "waiting as a hot standby, retrying every "
                        f"{settings.standby_retry_seconds:g} s",
                        level=logging.INFO,
                        extra=slot_field,
                    )
                    self.stats.count_reconnect("slot_in_use")
                    self._wait(settings.standby_retry_seconds)
                    continue
                except (HaltedOnBadRow, PrerequisiteError, SlotLost):
                    raise
                except ProducerFenced as exc:
                    self._fenced(exc)
                    return
                except (ReplicationError, DeliveryError, psycopg.Error, PoolTimeout) as exc:
                    if self.stats.sessions > sessions_before:
                        # It had been streaming: a fresh failure, not one more failed retry.
                        backoff = 0.5
                    self.stats.count_reconnect(_cause(exc))
                    self._failure_log.failed(
                        f"{_describe(exc)}; reconnecting from slot {settings.slot_name} "
                        f"(backoff up to {settings.reconnect_max_backoff_seconds:g} s)",
                        extra=slot_field,
                    )
                    if self._settle_publisher():
                        return  # fenced: another relay holds this pipeline now
                    self._wait(backoff)
                    backoff = min(backoff * 2, settings.reconnect_max_backoff_seconds)
        finally:
            sampler.stop()
            pool.close()
            if self._publisher is not None:
                try:
                    remaining = self._publisher.flush(0)
                except DeliveryError as exc:
                    # The fatal error that ended the run, met once more on the way out (a
                    # fenced producer's, queued behind the abort that reported it).
                    log.debug("at exit: %s", exc)
                else:
                    if remaining:
                        log.debug("%d records left unacknowledged at exit", remaining)
            stats = self.stats
            log.debug(
                "exiting: sessions=%d producer_resets=%d reconnects=%s",
                stats.sessions,
                stats.resets,
                stats.reconnects_by_cause,
            )

    def _wait(self, seconds: float) -> None:
        """Wait (until stopped) in slices, so the heartbeat shows the loop alive meanwhile."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            self.stats.beat()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._stop.wait(min(left, 1.0))

    def _probe_broker(self) -> None:
        """From the sampler thread: after Kafka was reported down (all brokers down), whether
        it answers again. The loop's own signs of recovery are not enough: with nothing in flight
        it sees no acks. librdkafka is thread-safe; the loop may meanwhile replace the
        publisher, which this reference keeps alive."""
        publisher = self._publisher
        if self.stats.broker_reachable or publisher is None or self._waiting_for_broker:
            return
        try:
            publisher.wait_for_broker(2.0)
        except DeliveryError:
            return
        self.stats.broker_reachable = True

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

    def _settle_publisher(self) -> bool:
        """Before any replay: nothing the old session produced may land after the replayed
        records (per-key order). Purge what was not sent, wait for what was; a producer in a
        fatal state is replaced (a fatal error fails everything it holds). True if the
        producer was fenced (exactly-once: another relay took over): the relay must stop."""
        publisher = self._publisher
        if publisher is None:
            return False
        if publisher.fatal_error:
            self._reset_publisher()
            return False
        if publisher.in_transaction:
            # Exactly-once: what the failed session had open must never become visible.
            try:
                publisher.abort_transaction(lambda: not self._stop.is_set())
            except ProducerFenced as exc:
                self._fenced(exc)
                return True
            except DeliveryError as exc:
                log.warning("cannot abort the Kafka transaction: %s; replacing the producer", exc)
                self._reset_publisher()
                return False
        settle_publisher(publisher, self._stop, self.stats.beat)
        return False

    def _fenced(self, exc: ProducerFenced) -> None:
        # Another relay took this pipeline over and aborted what we had open: anything more
        # from us would be rejected anyway. Stop, cleanly.
        log.warning(
            "stopping: %s; this relay publishes nothing more (exactly-once)",
            exc,
            extra={"slot": self.settings.slot_name},
        )

    def _reset_publisher(self) -> None:
        self._transactions_ready = False
        if self._publisher is not None:
            self._publisher.discard()
            self._publisher = None
            self.stats.resets += 1

    def _on_kafka_error(self, error: Any) -> None:
        # librdkafka reports transient broker trouble here and keeps retrying on its own.
        code = error.code()
        self._last_kafka_error = (code, error.str())
        if code == KafkaError._ALL_BROKERS_DOWN:
            self.stats.broker_reachable = False
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
            config = self._producer_config
            if self.settings.exactly_once:
                config = {**config, "transactional.id": self._pipeline_id()}
            log.debug("producer config: %s", redact_kafka_config(config))
            self._publisher = Publisher(config, on_error=self._on_kafka_error)
        publisher = self._publisher
        # Do not take the slot while the broker is unreachable: a standby with a working broker
        # may take it instead, and the server keeps the WAL either way.
        self._waiting_for_broker = True
        self.stats.broker_reachable = False
        while not self._stop.is_set():
            self.stats.beat()
            try:
                publisher.wait_for_broker(BROKER_WAIT_TIMEOUT)
                self._waiting_for_broker = False
                self.stats.broker_reachable = True
                self._kafka_log.recovered("Kafka is reachable")
                break
            except DeliveryError as exc:
                log.debug("Kafka still unreachable: %s", exc)
                publisher.poll(0)  # error callbacks: why it is unreachable
                kind, message = self._unreachable()
                self._kafka_log.failed(message, kind=kind)
        return publisher

    def _unreachable(self) -> tuple[str, str]:
        """What kind of failure keeps Kafka from answering, and what to say; raise
        ConfigError if, at start, it refuses this client (credentials, TLS): waiting cannot
        fix that."""
        servers = self.settings.kafka_bootstrap_servers
        code, text = self._last_kafka_error or (0, "")
        refused = _REFUSED_CLIENT.get(code)
        if refused is not None:
            hint = "check security.protocol, sasl.* and ssl.* in CDC_RELAY_KAFKA_CONFIG"
            if self.stats.sessions == 0:
                raise ConfigError(f"{refused} at {servers}: {text} ({hint})")
            return (
                refused,
                f"{refused} at {servers}: {text}; waiting before taking the slot ({hint})",
            )
        why = f" ({text})" if text else ""
        return "unreachable", (
            f"Kafka at {servers} is unreachable{why}; waiting for it before taking the slot"
        )

    # ---------------------------------------------------------------- exactly-once

    def _pipeline_id(self) -> str:
        """The transactional.id: the setting, or derived from the cluster's system identifier
        and the slot (stable across restarts and standbys, unique per pipeline)."""
        if self._transactional_id is None:
            self._transactional_id = progress.pipeline_id(
                self.settings.transactional_id,
                self.settings.database_url.get_secret_value(),
                self.settings.slot_name,
            )
        return self._transactional_id

    def _resume_transactions(
        self, publisher: Publisher, stream: ReplicationStream, start: Lsn
    ) -> None:
        """Exactly-once, once the slot is ours: register the transactional.id (fencing any
        earlier holder and aborting what it left open), then read where Kafka says we are."""
        settings = self.settings

        def informed() -> bool:
            self.stats.beat()
            stream.send_status(flushed=start)  # keep the walsender from timing us out
            return not self._stop.is_set()

        if not self._transactions_ready:
            progress.ensure_topic(self._producer_config, settings.progress_topic)
            publisher.init_transactions(informed)
            self._transactions_ready = True
        key = self._pipeline_id().encode()
        self._memory.progress = progress.read_latest(
            self._producer_config, settings.progress_topic, key
        )
        recorded = self._memory.progress
        log.info(
            "exactly-once: transactional.id=%s, recorded position %s",
            self._pipeline_id(),
            format_lsn(recorded.lsn) if recorded else "none yet",
            extra={"slot": settings.slot_name},
        )

    # ---------------------------------------------------------------- one session

    def _pipeline_config(self, max_silence: float, *, unlisted_tables_halt: bool) -> PipelineConfig:
        settings = self.settings
        return PipelineConfig(
            tables=tuple(
                TableSource(schema, name, settings.table_mapping(f"{schema}.{name}"))
                for schema, name in settings.tables
            ),
            message_prefix=settings.message_prefix,
            claim_check_over_bytes=settings.claim_check_over_bytes,
            unlisted_tables_halt=unlisted_tables_halt,
            topic_template=settings.topic_template,
            dead_letter_topic=settings.dead_letter_topic,
            halt_on_bad_row=settings.dead_letter_policy == "halt",
            max_in_flight_events=settings.max_in_flight_events,
            max_in_flight_bytes=settings.max_in_flight_bytes,
            status_interval=settings.status_interval_seconds,
            max_silence=max_silence,
            shutdown_timeout=settings.shutdown_timeout_seconds,
            slot_name=settings.slot_name,
            exactly_once=settings.exactly_once,
            transaction_limits=TransactionLimits(
                settings.transaction_max_events, settings.transaction_max_seconds
            ),
            progress_topic=settings.progress_topic,
            pipeline_key=self._pipeline_id().encode() if settings.exactly_once else b"",
        )

    def _keep(self, pool: ConnectionPool, action: Keep) -> None:
        """The pipeline's Keep: prune must never delete this row (its payload is nowhere else)."""
        with pool.connection() as conn:
            control.record_kept(conn, self.settings, action)

    def _session(self, pool: ConnectionPool) -> None:
        settings = self.settings
        publisher = self._ensure_publisher()
        if self._stop.is_set():
            return
        with pool.connection() as conn:
            admin.require_ready(conn, settings)
            lists_tables = admin.publication_lists_tables(conn, settings.publication_name)
        stream = ReplicationStream.connect(settings.database_url.get_secret_value())
        mover: ScheduledMover | None = None
        try:
            self._resume.identify(stream)  # failover check, before START_REPLICATION
            stream.start(
                slot=settings.slot_name,
                publication=settings.publication_name,
                start_lsn=Lsn(0),
                proto_version=PROTO_VERSION,
                messages=settings.messages,
            )
            # Read the start position only now that the slot is ours: nobody else can move it,
            # and a status update below it would move the slot backwards.
            with pool.connection() as conn:
                slot = admin.require_slot(conn, settings)
                timeout = admin.wal_sender_timeout(conn)
                self._resume.resumed(conn, slot)  # failover: what was resumed, phantoms
            start = slot.confirmed or Lsn(0)
            max_silence = min(MAX_SILENCE, timeout / 4) if timeout else MAX_SILENCE
            if settings.exactly_once:
                self._resume_transactions(publisher, stream, start)
            self.stats.sessions += 1
            self.stats.streaming = True
            self._failure_log.recovered(
                f"streaming from slot {settings.slot_name}",
                extra={"slot": settings.slot_name, "lsn": format_lsn(start)},
            )
            log.info(
                "streaming slot=%s publication=%s from lsn=%s",
                settings.slot_name,
                settings.publication_name,
                format_lsn(start),
                extra={"slot": settings.slot_name, "lsn": format_lsn(start)},
            )
            with pool.connection() as conn:
                self._memory.skips = skip.pending(conn, settings, start)
            # Only the relay that holds the slot moves due scheduled events (a hot standby
            # never gets here); their rows then come back through the slot like any other.
            mover = self._scheduled_mover()
            pipeline = Pipeline(
                self._pipeline_config(max_silence, unlisted_tables_halt=lists_tables),
                start=start,
                memory=self._memory,
                stats=self.stats,
                now=time.monotonic(),
                wall_clock=time.time,
                rows=publisher.rows(),
            )
            Session(
                pipeline=pipeline,
                stream=stream,
                publisher=publisher,
                stop=self._stop,
                keeper=lambda action: self._keep(pool, action),
                on_acks_flowing=self.kafka_flowing,
            ).run()
        finally:
            if mover is not None and not mover.close(timeout=10):
                log.warning("the scheduled-events mover did not stop within 10 s")
            self.stats.streaming = False
            self.stats.tracker = None
            stream.close()

    def _scheduled_mover(self) -> ScheduledMover | None:
        settings = self.settings
        scheduled = settings.scheduled
        if scheduled is None:
            return None
        target = settings.tables[0]
        mover = ScheduledMover(
            settings.database_url.get_secret_value(),
            scheduled,
            target,
            settings.scheduled_interval_seconds,
            settings.scheduled_batch,
            threading.Event(),
            columns=settings.table_mapping(".".join(target)),
            overdue_after=settings.scheduled_overdue_seconds,
            stats=self.scheduled_stats,
        )
        mover.start()
        return mover


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
