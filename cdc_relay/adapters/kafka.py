"""The Kafka side: one confluent-kafka idempotent producer.

Delivery reports are served by ``poll``; what a report means is the pipeline's to decide
(cdc_relay/core/verdicts.py). This module only wraps librdkafka's calls and errors.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from cdc_relay.adapters import native_acks
from cdc_relay.core.acks import settle
from cdc_relay.core.mapping import OutboxRecord
from cdc_relay.core.pipeline import RowProducer
from cdc_relay.core.verdicts import is_size_error
from cdc_relay.errors import (
    ConfigError,
    DeliveryError,
    ProduceInterrupted,
    ProducerFatal,
    ProducerFenced,
    RecordRefused,
    TransactionAborted,
)

log = logging.getLogger(__name__)

DeliveryCallback = Callable[[Any, Any], None]
LIBRDKAFKA_LOGGER = "cdc_relay.librdkafka"

_ANY_PARTITION = -1  # RD_KAFKA_PARTITION_UA: the partitioner chooses (by key)

# Errors that produce() raises before any network for a record it will never take.
_PRODUCE_RECORD_ERRORS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError._INVALID_ARG})
# Another producer with our transactional.id: we are the zombie.
_FENCED = frozenset(
    {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
)
# How long one transactional call may block before the relay gets a turn (status updates).
TRANSACTION_CALL_TIMEOUT = 5.0


class Publisher:
    """One producer; recreated by the relay after a fatal error."""

    def __init__(self, config: dict[str, Any], *, on_error: Callable[[Any], None]) -> None:
        self.fatal_error: str | None = None
        self.in_transaction = False  # a Kafka transaction is open (exactly-once)
        self._on_error = on_error
        acks_module, _ = native_acks.load()
        config = {**config, "error_cb": self._error_cb}
        if acks_module is not None:
            config["plugin.library.paths"] = ";".join(
                p for p in (config.get("plugin.library.paths"), acks_module.__file__) if p
            )
        try:
            # librdkafka's own log repeats what error_cb reports (per connection attempt), so
            # it goes to a logger that is shown with --debug only (see logs.configure_logging).
            self._producer = Producer(config, logger=logging.getLogger(LIBRDKAFKA_LOGGER))
        except KafkaException as exc:
            raise ConfigError(f"CDC_RELAY_KAFKA_CONFIG: {exc.args[0].str()}") from None
        # What Pipeline.pump hands its plain records to, positionally, in the order of
        # confluent-kafka's produce() (see produce() below): the C path's produce, whose
        # records' acknowledgements collect() brings back, or confluent-kafka's own. Whatever
        # it raises (queue full, a refusal) sends the record through produce() below, which
        # knows what it means.
        self._acks_module = acks_module
        self._acks = acks_module.Acks() if acks_module is not None else None
        self.enqueue: Callable[..., object] = (
            self._acks.produce if self._acks is not None else self._producer.produce
        )
        # What the C path raises for a record librdkafka refused (code, text).
        self._produce_failed: type[Exception] | tuple[()] = (
            acks_module.ProduceFailed if acks_module is not None else ()
        )

    def rows(self) -> RowProducer | None:
        """A new C row path on this producer (adapters/_outbox_rows.c), for one pipeline, when
        the C acknowledgement path runs and CDC_RELAY_ROWS_IN_PYTHON is not set; else None."""
        module = self._acks_module
        if module is None or not native_acks.rows_in_c():
            return None
        rows: RowProducer = module.Rows(self._acks)
        return rows

    def _error_cb(self, error: Any) -> None:
        if error.fatal():
            self.fatal_error = error.str()
        self._on_error(error)

    def produce(
        self,
        record: OutboxRecord,
        on_delivery: DeliveryCallback,
        while_waiting: Callable[[], bool] = lambda: True,
    ) -> None:
        """Hand one record to librdkafka. While its queue is full, serve callbacks and call
        ``while_waiting`` (which keeps the replication connection informed); when that returns
        False, give up with ProduceInterrupted."""
        producer, enqueue = self._producer, self.enqueue
        while True:
            try:
                # Positionally, in the order of confluent-kafka's produce() C signature (the C
                # path takes the same): its keyword parsing cost ~4,500 instructions per
                # record (docs/performance.md, "The compiled core").
                # tests/unit/test_kafka_publisher.py pins the order.
                enqueue(
                    record.topic,
                    record.value,
                    record.key,
                    _ANY_PARTITION,
                    on_delivery,  # "callback"
                    None,  # "on_delivery", an alias of "callback"
                    record.timestamp_ms,
                    record.headers,
                )
                return
            except BufferError:
                producer.poll(0.05)
                self._collect()
                if not while_waiting():
                    raise ProduceInterrupted from None
            except KafkaException as exc:
                raise self._refused(exc.args[0]) from None
            except self._produce_failed as exc:
                code, text = exc.args
                raise self._refused(KafkaError(code, text)) from None

    def _refused(self, error: Any) -> RecordRefused | DeliveryError:
        if error.code() in _PRODUCE_RECORD_ERRORS:
            return RecordRefused(error.str(), too_large=is_size_error(error.code()))
        return self._failed(error, "produce failed")

    def _failed(self, error: Any, what: str) -> DeliveryError:
        if error.code() in _FENCED:
            self.fatal_error = error.str()
            return ProducerFenced(
                f"{what}: {error.str()}: another relay with this transactional.id took over"
            )
        if error.fatal():
            self.fatal_error = error.str()
            return ProducerFatal(f"{what}: {error.str()}")
        return DeliveryError(f"{what}: {error.str()}")

    # ------------------------------------------------------------------ transactions

    def init_transactions(self, while_waiting: Callable[[], bool]) -> None:
        """Register the transactional.id with the coordinator: this fences any earlier
        producer with the same id and aborts the transaction it left open."""
        self._transactional(self._producer.init_transactions, while_waiting, "init")

    def begin_transaction(self) -> None:
        try:
            self._producer.begin_transaction()
        except KafkaException as exc:
            raise self._failed(exc.args[0], "cannot begin a Kafka transaction") from None
        self.in_transaction = True

    def commit_transaction(self, while_waiting: Callable[[], bool]) -> None:
        """Flush and commit; retriable errors are retried (``while_waiting`` between tries
        keeps the server informed), an abortable one is aborted and raised as
        TransactionAborted."""
        try:
            self._transactional(self._producer.commit_transaction, while_waiting, "commit")
        finally:
            self.in_transaction = False

    def abort_transaction(self, while_waiting: Callable[[], bool]) -> None:
        try:
            self._transactional(self._producer.abort_transaction, while_waiting, "abort")
        finally:
            self.in_transaction = False

    def _transactional(
        self, call: Callable[[float], None], while_waiting: Callable[[], bool], what: str
    ) -> None:
        while True:
            try:
                call(TRANSACTION_CALL_TIMEOUT)
                return
            except KafkaException as exc:
                error = exc.args[0]
                if error.code() in _FENCED or error.fatal():
                    raise self._failed(error, f"Kafka transaction {what} failed") from None
                if error.txn_requires_abort():
                    if what != "abort":
                        self._transactional(
                            self._producer.abort_transaction, while_waiting, "abort"
                        )
                    raise TransactionAborted(
                        f"Kafka transaction {what} failed and was aborted: {error.str()}"
                    ) from None
                if not error.retriable() and error.code() != KafkaError._TIMED_OUT:
                    raise self._failed(error, f"Kafka transaction {what} failed") from None
                if not while_waiting():
                    raise ProduceInterrupted from None
            finally:
                self._collect()  # commit flushes: its delivery reports are served

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery reports and error callbacks. A fatal error is raised once, from the
        poll that meets it (ProducerFatal); the reports of the records it failed come after."""
        try:
            served = int(self._producer.poll(timeout))
        except KafkaException as exc:
            raise self._failed(exc.args[0], "the producer failed") from None
        finally:
            self._collect()
        return served

    def outstanding(self) -> int:
        """Records queued or in flight, whose delivery report has not been served yet."""
        count = len(self._producer)
        # Then collected: the C path files each acknowledgement before its record leaves the
        # count, so none of the records counted out is left uncollected.
        self._collect()
        return count

    def purge_queue(self) -> None:
        """Drop what librdkafka has not sent yet (its reports come back as purged). What is in
        flight is left to be answered: purging it would leave records that may still land."""
        try:
            self._producer.purge(in_queue=True, in_flight=False, blocking=False)
        except KafkaException:
            log.debug("purge failed", exc_info=True)

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` for outstanding deliveries; returns how many remain. A fatal
        error met meanwhile is raised as poll() raises it."""
        try:
            return int(self._producer.flush(timeout))
        except KafkaException as exc:
            raise self._failed(exc.args[0], "the producer failed") from None
        finally:
            self._collect()

    def wait_for_broker(self, timeout: float) -> None:
        """Raise DeliveryError unless a broker answers a metadata request within ``timeout``."""
        try:
            self._producer.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise DeliveryError(f"Kafka is unreachable: {exc.args[0].str()}") from None

    def discard(self) -> None:
        """Drop everything queued or in flight: only for a producer that is being replaced
        after a fatal error (which fails every record anyway) or at exit."""
        try:
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.poll(0)
            self._producer.flush(0)
        except KafkaException:
            log.debug("purge failed", exc_info=True)
        self._collect()

    def _collect(self) -> None:
        """Hand the acknowledgements the C path counted since the last call to their
        transactions (after every call that serves delivery reports): successes a run at a
        time, failures one by one, as confluent-kafka's callbacks would have."""
        acks = self._acks
        if acks is None:
            return
        reports = acks.collect()
        if reports is None:
            return
        acknowledged, failed = reports
        settle(acknowledged)
        for token, code, text, topic, key, value, headers in failed:
            token(_FailedReport(code, text), _FailedRecord(topic, key, value, headers))


class _FailedReport:
    """What a failed delivery report's error says (the part of KafkaError the pipeline reads)."""

    __slots__ = ("_code", "_text")

    def __init__(self, code: int, text: str) -> None:
        self._code, self._text = code, text

    def __repr__(self) -> str:
        return f"KafkaError({self._code}, {self._text!r})"

    def code(self) -> int:
        return self._code

    def str(self) -> builtins.str:  # KafkaError's name for it
        return self._text


class _FailedRecord:
    """The failed record of a report (the part of confluent-kafka's Message the pipeline reads)."""

    __slots__ = ("_headers", "_key", "_topic", "_value")

    def __init__(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[Any] | None
    ) -> None:
        self._topic, self._key, self._value, self._headers = topic, key, value, headers

    def topic(self) -> str:
        return self._topic

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[Any] | None:
        return self._headers
