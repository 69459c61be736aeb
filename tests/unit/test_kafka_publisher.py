"""The publisher hands records to librdkafka as they are: checked end to end against librdkafka's
in-process mock cluster (no broker to start), because produce() is called positionally."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, Message, TopicPartition

from cdc_relay.adapters.kafka import Publisher
from cdc_relay.core.lsn import Lsn
from cdc_relay.core.mapping import OutboxRecord
from cdc_relay.core.pipeline import Pipeline, PipelineConfig
from tests import frames


def _mock_publisher() -> tuple[Publisher, str]:
    publisher = Publisher({"test.mock.num.brokers": 1}, on_error=lambda error: None)
    metadata = publisher._producer.list_topics(timeout=10)
    return publisher, ",".join(f"{b.host}:{b.port}" for b in metadata.brokers.values())


def _consume_one(bootstrap: str, topic: str) -> Message:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "t", "enable.auto.commit": False}
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    deadline = time.monotonic() + 20
    message = None
    while message is None and time.monotonic() < deadline:
        polled = consumer.poll(0.5)
        if polled is not None and polled.error() is None:
            message = polled
    consumer.close()
    assert message is not None
    return message


def test_a_record_arrives_with_its_key_value_headers_timestamp_and_callback() -> None:
    publisher, bootstrap = _mock_publisher()
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
    message = _consume_one(bootstrap, record.topic)
    assert (message.key(), message.value()) == (record.key, record.value)
    assert message.headers() == record.headers
    assert message.timestamp()[1] == record.timestamp_ms


def test_the_pipeline_pump_hands_records_to_librdkafka_as_produce_does() -> None:
    """Pipeline.pump calls confluent-kafka's produce() itself, positionally (Publisher.enqueue):
    the record arrives whole and its delivery report confirms its transaction."""
    publisher, bootstrap = _mock_publisher()
    pipeline = Pipeline(PipelineConfig(outbox_table=("public", "outbox")), start=Lsn(0x100))
    stream = iter(
        [
            frames.relation(),
            frames.begin(0x2F0, commit_time=0),
            frames.insert(frames.outbox_row("a-1", b'{"total": "12.50"}', event_id="e-1"), 0x201),
            frames.commit(0x2F0, 0x300),
        ]
    )
    assert pipeline.pump(lambda: next(stream, None), publisher.enqueue, 100) == 4
    assert pipeline.held is None and pipeline.tracker.in_flight_events == 1
    assert publisher.flush(10) == 0
    tracker = pipeline.tracker
    assert (tracker.in_flight_events, tracker.in_flight_bytes, pipeline.confirmed) == (0, 0, 0x300)
    message = _consume_one(bootstrap, "outbox.event.order")
    assert (message.key(), message.value()) == (b"a-1", b'{"total": "12.50"}')
    assert dict(message.headers())["id"] == b"e-1"
