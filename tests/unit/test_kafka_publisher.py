"""The publisher hands records to librdkafka as they are: checked end to end against librdkafka's
in-process mock cluster (no broker to start), because produce() is called positionally."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, TopicPartition

from cdc_relay.adapters.kafka import Publisher
from cdc_relay.core.mapping import OutboxRecord


def test_a_record_arrives_with_its_key_value_headers_timestamp_and_callback() -> None:
    publisher = Publisher({"test.mock.num.brokers": 1}, on_error=lambda error: None)
    metadata = publisher._producer.list_topics(timeout=10)
    bootstrap = ",".join(f"{b.host}:{b.port}" for b in metadata.brokers.values())
    record = OutboxRecord(
        "outbox.event.order",
        b"a-1",
        b'{"total": "12.50"}',
        [("id", b"e-1"), ("event_type", b"OrderPlaced"), ("aggregate_type", b"order")],
        1_700_000_000_123,
    )
    reports: list[tuple[object, bytes | None, bytes | None]] = []
    publisher.produce(record, lambda err, msg: reports.append((err, msg.key(), msg.value())))
    assert publisher.flush(10) == 0
    assert reports == [(None, b"a-1", b'{"total": "12.50"}')]

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "t", "enable.auto.commit": False}
    )
    partitions = consumer.list_topics(record.topic, timeout=10).topics[record.topic].partitions
    consumer.assign([TopicPartition(record.topic, p, 0) for p in partitions])
    deadline = time.monotonic() + 20
    message = None
    while message is None and time.monotonic() < deadline:
        polled = consumer.poll(0.5)
        if polled is not None and polled.error() is None:
            message = polled
    consumer.close()
    assert message is not None
    assert (message.key(), message.value()) == (record.key, record.value)
    assert message.headers() == record.headers
    assert message.timestamp()[1] == record.timestamp_ms
