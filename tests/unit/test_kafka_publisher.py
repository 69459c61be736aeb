"""The publisher hands records to librdkafka as they are: checked end to end against librdkafka's
in-process mock cluster (no broker to start), because produce() is called positionally."""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from cdc_relay.adapters import native_acks
from cdc_relay.adapters.kafka import Publisher
from cdc_relay.core.lsn import Lsn
from cdc_relay.core.mapping import OutboxRecord
from cdc_relay.core.pipeline import Pipeline, PipelineConfig
from cdc_relay.errors import ProducerFenced, RecordRefused
from tests import frames


def _mock_publisher() -> tuple[Publisher, str]:
    publisher = Publisher({"test.mock.num.brokers": 1}, on_error=lambda error: None)
    metadata = publisher._producer.list_topics(timeout=10)
    return publisher, ",".join(f"{b.host}:{b.port}" for b in metadata.brokers.values())


# The pump hands records to Publisher.enqueue, or, with the C row path (adapters/_outbox_rows.c,
# Publisher.rows(); None on the callbacks path), produces plain inserts itself: both must give
# librdkafka and the pipeline the same.
PATHS = pytest.mark.parametrize("path", ["enqueue", "rows"])


def _pipeline(publisher: Publisher, path: str) -> Pipeline:
    rows = publisher.rows() if path == "rows" else None
    if path == "rows":
        assert (rows is not None) == (native_acks.load()[0] is not None)
    return Pipeline(PipelineConfig(outbox_table=("public", "outbox")), start=Lsn(0x100), rows=rows)


def _by_rows(pipeline: Pipeline) -> int | None:
    """How many records the pipeline's C row path produced; None without one."""
    rows: Any = pipeline._rows
    return None if rows is None else int(rows.produced())


def _consume(bootstrap: str, topic: str, count: int = 1) -> list[Message]:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "t", "enable.auto.commit": False}
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    deadline = time.monotonic() + 20
    messages: list[Message] = []
    while len(messages) < count and time.monotonic() < deadline:
        polled = consumer.poll(0.5)
        if polled is not None and polled.error() is None:
            messages.append(polled)
    consumer.close()
    assert len(messages) == count
    return messages


def test_a_record_arrives_with_its_key_value_headers_timestamp_and_callback() -> None:
    publisher, bootstrap = _mock_publisher()
    record = OutboxRecord(
        "outbox.event.order",
        b"a-1",
        b'{"total": "12.50"}',
        [("id", b"e-1"), ("event_type", b"OrderPlaced"), ("aggregate_type", b"order")],
        1_700_000_000_123,
    )
    reports: list[object] = []
    # A success is reported with no error (and, on the C path, no message: the relay's
    # callbacks read a delivered record's size, which the C path counts for them).
    publisher.produce(record, lambda err, msg: reports.append(err))
    assert publisher.flush(10) == 0
    assert reports == [None]
    (message,) = _consume(bootstrap, record.topic)
    assert (message.key(), message.value()) == (record.key, record.value)
    assert message.headers() == record.headers
    assert message.timestamp()[1] == record.timestamp_ms


@PATHS
def test_the_pipeline_pump_hands_records_to_librdkafka_as_produce_does(path: str) -> None:
    """Pipeline.pump calls confluent-kafka's produce() itself, positionally (Publisher.enqueue),
    or the C row path produces the insert (its first row, whose topic the plan does not know
    yet, goes through enqueue): each record arrives whole and its delivery report confirms
    its transaction."""
    publisher, bootstrap = _mock_publisher()
    pipeline = _pipeline(publisher, path)
    rows = [frames.outbox_row(f"a-{i}", b'{"total": "12.50"}', event_id=f"e-{i}") for i in range(3)]
    rows[2][6] = b"2026-11-22 13:00:00.5+01"  # created_at: a new one, with an offset
    stream = iter(
        [
            frames.relation(),
            frames.begin(0x2F0, commit_time=0),
            *(frames.insert(row, 0x201 + i) for i, row in enumerate(rows)),
            frames.commit(0x2F0, 0x300),
        ]
    )
    assert pipeline.pump(lambda: next(stream, None), publisher.enqueue, 100) == 6
    assert pipeline.held is None and pipeline.tracker.in_flight_events == 3
    assert pipeline.tracker.in_flight_bytes == 3 * len(b'{"total": "12.50"}')
    assert publisher.flush(10) == 0
    tracker = pipeline.tracker
    assert (tracker.in_flight_events, tracker.in_flight_bytes, pipeline.confirmed) == (0, 0, 0x300)
    assert pipeline.stats.published == 3
    assert pipeline.stats.published_by_source == {"public.outbox": {"outbox.event.order": 3}}
    messages = sorted(_consume(bootstrap, "outbox.event.order", 3), key=lambda m: m.key())
    for i, message in enumerate(messages):
        assert (message.key(), message.value()) == (f"a-{i}".encode(), b'{"total": "12.50"}')
        assert message.headers() == [
            ("id", f"e-{i}".encode()),
            ("event_type", b"Tested"),
            ("aggregate_type", b"order"),
        ]
    assert [m.timestamp()[1] for m in messages] == [1_795_348_800_123] * 2 + [1_795_348_800_500]
    assert _by_rows(pipeline) == (None if pipeline._rows is None else 2)


# Both ways of counting acknowledgements (cdc_relay/adapters/native_acks.py) must give the
# pipeline the same: the C path with the compiled core, confluent-kafka's callbacks with the
# pure-Python one (`make test` runs this file in both).


def _transaction_frames(first: int, events: int) -> list[bytes]:
    """One transaction of ``events`` inserts, keys cycling over 7 aggregates."""
    base = 0x1000 + first * 0x100
    end = base + events + 0x10
    return [
        frames.begin(end, commit_time=0),
        *(
            frames.insert(
                frames.outbox_row(f"a-{i % 7}", b'{"n": %d}' % i, event_id=f"e-{first}-{i}"),
                base + i,
            )
            for i in range(events)
        ),
        frames.commit(end, end + 1),
    ]


@PATHS
def test_acknowledgements_of_many_transactions_confirm_the_last_one(path: str) -> None:
    publisher, _ = _mock_publisher()
    pipeline = _pipeline(publisher, path)
    stream = iter(
        [frames.relation(), *(f for t in range(3) for f in _transaction_frames(t, 1_000))]
    )
    assert pipeline.pump(lambda: next(stream, None), publisher.enqueue, 10_000) == 3 * 1_002 + 1
    assert pipeline.tracker.in_flight_events == 3_000
    assert publisher.flush(20) == 0
    tracker = pipeline.tracker
    assert (tracker.in_flight_events, tracker.in_flight_bytes) == (0, 0)
    assert pipeline.confirmed == 0x1000 + 2 * 0x100 + 1_000 + 0x11
    assert not pipeline.has_failures
    assert _by_rows(pipeline) == (None if pipeline._rows is None else 2_999)
    assert pipeline.stats.published_by_source == {"public.outbox": {"outbox.event.order": 3_000}}


@PATHS
def test_a_failed_delivery_comes_back_with_its_record(path: str) -> None:
    """Records purged before they were sent: each report carries the record, as the pipeline
    needs it to judge (and, for a refusal, to dead-letter) it."""
    publisher = Publisher(
        {"test.mock.num.brokers": 1, "linger.ms": 60_000}, on_error=lambda error: None
    )
    pipeline = _pipeline(publisher, path)
    stream = iter([frames.relation(), *_transaction_frames(0, 2)])
    assert pipeline.pump(lambda: next(stream, None), publisher.enqueue, 100) == 5
    publisher.purge_queue()
    deadline = time.monotonic() + 10
    while publisher.outstanding() and time.monotonic() < deadline:
        publisher.poll(0.05)
    failures = pipeline._failures
    assert [(f.code, f.topic, f.key, f.value) for f in failures] == [
        (KafkaError._PURGE_QUEUE, "outbox.event.order", b"a-0", b'{"n": 0}'),
        (KafkaError._PURGE_QUEUE, "outbox.event.order", b"a-1", b'{"n": 1}'),
    ]
    assert failures[0].reason == KafkaError(KafkaError._PURGE_QUEUE).str()
    # The C path gives the record's headers back too; confluent-kafka's Message of a delivery
    # report has none, so with the callbacks a dead-lettered record loses them.
    with_headers = native_acks.load()[0] is not None
    assert [dict(f.headers).get("id") for f in failures] == (
        [b"e-0-0", b"e-0-1"] if with_headers else [None, None]
    )
    assert all(f.delivery is failures[0].delivery for f in failures)
    assert pipeline.tracker.in_flight_events == 2  # a failure is the verdict's to settle


@PATHS
def test_a_full_queue_holds_the_record_for_the_careful_way(path: str) -> None:
    publisher = Publisher(
        {"test.mock.num.brokers": 1, "queue.buffering.max.messages": 3, "linger.ms": 100},
        on_error=lambda error: None,
    )
    pipeline = _pipeline(publisher, path)
    stream = iter([frames.relation(), *_transaction_frames(0, 5)])
    read, frames_read, full = (lambda: next(stream, None)), 0, 0
    while True:
        frames_read += pipeline.pump(read, publisher.enqueue, 100)
        held = pipeline.held
        if held is None:
            break
        assert type(held.error) is BufferError
        if full == 0:  # three records fit: the fourth is read, counted in flight, and held
            assert pipeline.tracker.in_flight_events == 4
        full += 1
        delivery = pipeline.delivery
        assert delivery is not None
        publisher.produce(held.out, delivery)  # waits for room, serving reports meanwhile
    assert (frames_read, full >= 1) == (8, True)
    assert publisher.flush(20) == 0
    assert (pipeline.tracker.in_flight_events, pipeline.confirmed) == (0, 0x1000 + 5 + 0x11)


@PATHS
def test_a_record_produced_with_another_callback_is_reported_once(path: str) -> None:
    """The exactly-once progress record comes with a plain callback, beside the pump's records
    (whose callbacks are their transactions) on the same producer."""
    publisher, _ = _mock_publisher()
    pipeline = _pipeline(publisher, path)
    stream = iter([frames.relation(), *_transaction_frames(0, 3)])
    reports: list[object] = []
    record = OutboxRecord("other", b"k", b"v", [("id", b"x")], 0)
    assert pipeline.pump(lambda: next(stream, None), publisher.enqueue, 3) == 3
    publisher.produce(record, lambda err, msg: reports.append(err))
    assert pipeline.pump(lambda: next(stream, None), publisher.enqueue, 100) == 3
    assert publisher.flush(20) == 0
    assert reports == [None]
    assert (pipeline.tracker.in_flight_events, pipeline.confirmed) == (0, 0x1000 + 3 + 0x11)


def test_a_record_too_large_for_the_producer_is_refused_as_too_large() -> None:
    publisher = Publisher(
        {"test.mock.num.brokers": 1, "message.max.bytes": 10_000}, on_error=lambda error: None
    )
    record = OutboxRecord("outbox.event.order", b"a-1", b"x" * 20_000, [("id", b"e-1")], 0)
    with pytest.raises(RecordRefused) as refused:
        publisher.produce(record, lambda err, msg: None)
    assert refused.value.too_large
    assert publisher.flush(10) == 0
    acks = publisher._acks
    assert acks is None or acks.in_flight() == 0  # nothing left filed for a record not taken


def test_a_fatal_error_met_by_a_flush_is_raised_as_the_relays_error() -> None:
    """CI caught a fenced relay exiting 1 with an "unexpected error: KafkaException": the
    fatal error, queued behind the abort that had already reported it, came out of the flush
    at exit."""

    class FencedProducer:
        def flush(self, timeout: float) -> int:
            raise KafkaException(KafkaError(KafkaError._FENCED, "fenced", fatal=True))

    publisher, _ = _mock_publisher()
    publisher._producer = FencedProducer()  # type: ignore[assignment]
    with pytest.raises(ProducerFenced):
        publisher.flush(0)


@PATHS
def test_records_of_interleaved_topics_are_counted_per_topic_by_the_end_of_each_pump(
    path: str,
) -> None:
    """The C row path counts a run of one topic's records with one dict update at the run's
    end (fold_counts, which each pump ends with): the statistics must still hold every record
    per topic when the pump returns, however the topics interleave, and a pump stopped early
    must not lose what it counted."""
    publisher, _ = _mock_publisher()
    pipeline = _pipeline(publisher, path)
    kinds = ["order", "order", "payment", "order", "invoice", "invoice", "invoice", "payment"]
    rows = [
        frames.outbox_row(f"a-{i}", aggregate_type=kind, event_id=f"e-{i}")
        for i, kind in enumerate(kinds * 50)
    ]
    inserts = [frames.insert(row, 0x201 + i) for i, row in enumerate(rows)]
    stream = iter(
        [frames.relation(), frames.begin(0x2F00), *inserts, frames.commit(0x2F00, 0x3000)]
    )
    read = lambda: next(stream, None)  # noqa: E731
    expected = {"order": 150, "payment": 100, "invoice": 150}
    pumped = pipeline.pump(read, publisher.enqueue, 123)  # stops mid-run of a topic
    counted = pipeline.stats.published_by_source["public.outbox"]
    assert sum(counted.values()) == pipeline.stats.published == pumped - 2
    while pipeline.pump(read, publisher.enqueue, 123):
        pass
    assert pipeline.stats.published_by_source == {
        "public.outbox": {f"outbox.event.{kind}": n for kind, n in expected.items()}
    }
    assert publisher.flush(10) == 0
    assert pipeline.confirmed == 0x3000
    # Each topic's first row goes through enqueue, which tells the plan its topic.
    assert _by_rows(pipeline) == (None if pipeline._rows is None else 400 - 3)
