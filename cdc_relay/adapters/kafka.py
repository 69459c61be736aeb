"""The Kafka side: a confluent-kafka idempotent producer and the classification of its errors.

Delivery reports are served by ``poll``; what a report means for the pipeline is decided by
``classify_delivery_error``: a verdict about one record (dead-letter or halt), a pipeline
failure (reset and replay from the slot), or the echo of our own purge (ignore).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from cdc_relay.core.mapping import OutboxRecord
from cdc_relay.errors import ConfigError, DeliveryError

log = logging.getLogger(__name__)

DeliveryCallback = Callable[[Any, Any], None]
LIBRDKAFKA_LOGGER = "cdc_relay.librdkafka"

# Errors that say "this record can never be accepted", whatever the retries.
_RECORD_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.INVALID_RECORD,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError._INVALID_DIFFERENT_RECORD,
    }
)
# Errors that produce() raises before any network for a record it will never take.
_PRODUCE_RECORD_ERRORS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError._INVALID_ARG})
_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})


class Verdict(enum.Enum):
    RECORD = "record"  # this record only: dead-letter it or halt
    PIPELINE = "pipeline"  # reset the pipeline and replay from the slot
    IGNORE = "ignore"  # our own purge during a reset


_SIZE_ERRORS = frozenset(
    {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG_SIZE}
)


def is_size_error(code: int) -> bool:
    """Kafka refused the record for its size: resending the value anywhere is pointless."""
    return code in _SIZE_ERRORS


def classify_delivery_error(code: int) -> Verdict:
    if code in _PURGED:
        return Verdict.IGNORE
    if code in _RECORD_ERRORS:
        return Verdict.RECORD
    return Verdict.PIPELINE


class ProduceInterrupted(Exception):
    """Stop was requested while produce() waited for room in librdkafka's queue."""


class RecordRefused(Exception):
    """produce() refused a record outright (too large for the client, invalid)."""

    def __init__(self, reason: str, *, too_large: bool) -> None:
        super().__init__(reason)
        self.too_large = too_large


class Publisher:
    """One producer; recreated by the relay after a pipeline failure."""

    def __init__(self, config: dict[str, Any], *, on_error: Callable[[Any], None]) -> None:
        self.fatal_error: str | None = None
        self._on_error = on_error
        try:
            # librdkafka's own log repeats what error_cb reports (per connection attempt), so
            # it goes to a logger that is shown with --debug only (see logs.configure_logging).
            self._producer = Producer(
                {**config, "error_cb": self._error_cb}, logger=logging.getLogger(LIBRDKAFKA_LOGGER)
            )
        except KafkaException as exc:
            raise ConfigError(f"CDC_RELAY_KAFKA_CONFIG: {exc.args[0].str()}") from None

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
        producer = self._producer
        while True:
            try:
                producer.produce(
                    record.topic,
                    record.value,
                    record.key,
                    headers=record.headers,  # type: ignore[arg-type]  # list is invariant
                    timestamp=record.timestamp_ms,
                    on_delivery=on_delivery,
                )
                return
            except BufferError:
                producer.poll(0.05)
                if not while_waiting():
                    raise ProduceInterrupted from None
            except KafkaException as exc:
                error = exc.args[0]
                code = error.code()
                if code in _PRODUCE_RECORD_ERRORS:
                    raise RecordRefused(error.str(), too_large=is_size_error(code)) from None
                raise DeliveryError(f"produce failed: {error.str()}") from exc

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery reports and error callbacks."""
        return int(self._producer.poll(timeout))

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` for outstanding deliveries; returns how many remain."""
        return int(self._producer.flush(timeout))

    def wait_for_broker(self, timeout: float) -> None:
        """Raise DeliveryError unless a broker answers a metadata request within ``timeout``."""
        try:
            self._producer.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise DeliveryError(f"Kafka is unreachable: {exc.args[0].str()}") from None

    def discard(self) -> None:
        """Drop everything queued or in flight (a reset replays it from the slot)."""
        try:
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.poll(0)
            self._producer.flush(0)
        except KafkaException:
            log.debug("purge failed", exc_info=True)
