"""The progress topic of exactly-once mode: created if missing (compacted, one partition), and
read back (read_committed) at the start of every session to find the pipeline's last progress
record (core/progress.py).

The topic may be shared by several pipelines (keyed by transactional.id) and is compacted only
now and then, so it is read from its end backwards, in growing steps, until a record of this
pipeline is found or the beginning is reached.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from cdc_relay.adapters.replication import system_identifier
from cdc_relay.core.progress import Progress, transactional_id
from cdc_relay.errors import ConfigError, DeliveryError

log = logging.getLogger(__name__)

# Producer properties a consumer or an admin client of the same cluster needs too.
_SHARED = (
    "bootstrap.servers",
    "security.protocol",
    "client.dns.lookup",
    "socket.",
    "sasl.",
    "ssl.",
)
_FIRST_STEP = 1_000


def pipeline_id(configured: str, database_url: str, slot: str) -> str:
    """The pipeline's transactional.id (CDC_RELAY_TRANSACTIONAL_ID), or the one derived from
    the cluster's system identifier and the slot."""
    return configured or transactional_id(system_identifier(database_url), slot)


def client_config(producer_config: dict[str, Any]) -> dict[str, Any]:
    """The connection settings of ``producer_config`` (servers, security), for other clients."""
    return {
        key: value
        for key, value in producer_config.items()
        if key.startswith(_SHARED) and not callable(value)
    }


def ensure_topic(producer_config: dict[str, Any], topic: str, timeout: float = 30.0) -> None:
    """Create the progress topic if it does not exist: one partition (one order of progress
    records per pipeline), compacted (only the last record per pipeline matters)."""
    admin = AdminClient({**client_config(producer_config), "log_level": 0})
    try:
        # All topics: a metadata request naming one makes a broker with auto-creation on
        # create it, with its default partitions and cleanup policy.
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise DeliveryError(f"Kafka is unreachable: {exc.args[0].str()}") from None
    described = metadata.topics.get(topic)
    if described is not None and described.error is None:
        if len(described.partitions) != 1:
            raise ConfigError(
                f"the progress topic {topic} has {len(described.partitions)} partitions: it "
                "must have one (the relay reads its progress records in order), and "
                "cleanup.policy=compact; choose another CDC_RELAY_PROGRESS_TOPIC"
            )
        return
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=1, config={"cleanup.policy": "compact"})],
        operation_timeout=timeout,
    )
    for future in futures.values():
        try:
            future.result(timeout)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            if error.code() in (
                KafkaError.TOPIC_AUTHORIZATION_FAILED,
                KafkaError.CLUSTER_AUTHORIZATION_FAILED,
            ):
                raise ConfigError(
                    f"cannot create the progress topic {topic} ({error.str()}): create it "
                    "yourself (one partition, cleanup.policy=compact) or grant the relay Create"
                ) from None
            raise DeliveryError(
                f"cannot create the progress topic {topic}: {error.str()}"
            ) from None
    log.info("created the progress topic %s (1 partition, compacted)", topic)


def read_latest(
    producer_config: dict[str, Any], topic: str, key: bytes, timeout: float = 30.0
) -> Progress | None:
    """The last committed progress record of the pipeline ``key``, or None if it has none."""
    consumer = Consumer(
        {
            **client_config(producer_config),
            "group.id": f"cdc-relay-progress-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            # An offset compaction already removed reads from the first one left.
            "auto.offset.reset": "earliest",
            "log_level": 0,
        }
    )
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=timeout)
        step = _FIRST_STEP
        end = high
        while end > low:
            start = max(low, end - step)
            found = _last_of(consumer, topic, key, start, end, timeout)
            if found is not None:
                return found
            end, step = start, step * 10
        return None
    except KafkaException as exc:
        raise DeliveryError(
            f"cannot read the progress topic {topic}: {exc.args[0].str()}"
        ) from None
    finally:
        consumer.close()


def _last_of(
    consumer: Consumer, topic: str, key: bytes, start: int, end: int, timeout: float
) -> Progress | None:
    """The last record of ``key`` between offsets ``start`` and ``end`` (read_committed)."""
    consumer.assign([TopicPartition(topic, 0, start)])
    last: bytes | None = None
    while True:
        msg = consumer.poll(timeout)
        if msg is None:
            raise DeliveryError(f"the progress topic {topic} did not answer in {timeout:g} s")
        error = msg.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                break
            raise KafkaException(error)
        offset = msg.offset()
        if offset is not None and offset >= end:
            break
        if msg.key() == key:
            value = msg.value()
            last = value if isinstance(value, bytes) else None
    if last is None:
        return None
    try:
        return Progress.decode(last)
    except ValueError as exc:
        raise DeliveryError(f"the progress topic {topic} holds a bad record: {exc}") from None
