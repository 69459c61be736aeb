"""How the run loop judges delivery reports: a refused record is dead-lettered (its ack standing
in for the original's) or halts; anything else resets the pipeline. The producer is faked; the
tracker and the verdicts are the real ones."""

from __future__ import annotations

import struct
import threading
from typing import Any

import pytest
from confluent_kafka import KafkaError

from cdc_relay.adapters.kafka import RecordRefused
from cdc_relay.core.lsn import Lsn
from cdc_relay.core.mapping import ColumnMapping, OutboxRecord, Rejected
from cdc_relay.core.stats import RelayStats
from cdc_relay.errors import DecodeError, DeliveryError, HaltedOnBadRow
from cdc_relay.runtime.session import Delivery, Session
from cdc_relay.settings import Settings


class FakePublisher:
    """Refuses records larger than ``limit`` bytes (key, value and headers), like produce()."""

    def __init__(self, limit: int | None = None) -> None:
        self.produced: list[OutboxRecord] = []
        self.limit = limit

    def produce(self, record: OutboxRecord, on_delivery: Any, while_waiting: Any = None) -> None:
        size = len(record.key or b"") + len(record.value or b"")
        size += sum(len(k) + len(v) for k, v in record.headers)
        if self.limit is not None and size > self.limit:
            raise RecordRefused("Message size too large", too_large=True)
        self.produced.append(record)


class FakeMessage:
    def __init__(self, topic: str, key: bytes | None, value: bytes | None, headers: list) -> None:
        self._topic, self._key, self._value, self._headers = topic, key, value, headers

    def topic(self) -> str:
        return self._topic

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list:
        return self._headers


def session(policy: str = "dead-letter", publisher: FakePublisher | None = None) -> Session:
    settings = Settings(
        database_url="postgresql://x@127.0.0.1/x",  # type: ignore[arg-type]
        kafka_bootstrap_servers="127.0.0.1:9",
        dead_letter_policy=policy,  # type: ignore[arg-type]
    )
    return Session(
        settings=settings,
        mapping=ColumnMapping(),
        stats=RelayStats(),
        stop=threading.Event(),
        stream=None,  # type: ignore[arg-type]
        publisher=publisher or FakePublisher(),  # type: ignore[arg-type]
        start=Lsn(100),
    )


def in_flight_record(s: Session, value: bytes = b'{"a":1}') -> tuple[Delivery, FakeMessage]:
    txn = s.tracker.begin(Lsn(150))
    delivery = Delivery(s.tracker, txn, s.failures)
    s.tracker.sent(txn, 3 + len(value))
    s.tracker.commit(txn, Lsn(200))
    s.stats.published += 1
    return delivery, FakeMessage("outbox.event.order", b"k-1", value, [("id", b"e-1")])


def test_a_record_refused_for_good_goes_to_the_dead_letter_topic_and_holds_the_slot():
    s = session()
    delivery, msg = in_flight_record(s)
    s.failures.append((delivery, KafkaError(KafkaError.TOPIC_EXCEPTION), msg))
    s.judge_failures()
    (dead,) = s.publisher.produced  # type: ignore[attr-defined]
    assert dead.topic == "outbox.dead-letter"
    assert dead.key == b"k-1" and dead.value == b'{"a":1}'
    headers = dict(dead.headers)
    assert headers["id"] == b"e-1"
    assert b"refused it" in headers["error"]
    assert headers["source_lsn"] == b"0/96"
    assert s.tracker.in_flight_events == 1  # the replacement stands in for the original
    assert s.tracker.advance() == 100
    delivery(None, FakeMessage(dead.topic, dead.key, dead.value, dead.headers))
    assert s.tracker.advance() == 200
    assert (s.stats.published, s.stats.dead_lettered) == (0, 1)
    assert s.tracker.in_flight_bytes == 0


def test_a_record_too_large_for_kafka_is_dead_lettered_without_its_value():
    s = session()
    delivery, msg = in_flight_record(s, value=b"x" * 5000)
    s.failures.append((delivery, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), msg))
    s.judge_failures()
    (dead,) = s.publisher.produced  # type: ignore[attr-defined]
    assert dead.value is None and dead.key == b"k-1"
    assert s.tracker.in_flight_bytes == 3


def test_a_refused_dead_letter_record_shrinks_step_by_step_then_halts():
    s = session()
    delivery, _ = in_flight_record(s)
    dead = FakeMessage("outbox.dead-letter", b"k-1", b"{}", [("id", b"e-1"), ("big", b"x")])
    s.failures.append((delivery, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), dead))
    s.judge_failures()
    last = s.publisher.produced[-1]  # type: ignore[attr-defined]
    assert (last.key, last.value) == (b"k-1", None)
    stripped = FakeMessage("outbox.dead-letter", b"k-1", None, [("id", b"e-1"), ("big", b"x")])
    s.failures.append((delivery, KafkaError(KafkaError.TOPIC_EXCEPTION), stripped))
    s.judge_failures()
    last = s.publisher.produced[-1]  # type: ignore[attr-defined]
    assert (last.key, last.value, last.headers) == (None, None, [("id", b"e-1")])
    smallest = FakeMessage("outbox.dead-letter", None, None, [("id", b"e-1")])
    s.failures.append((delivery, KafkaError(KafkaError.TOPIC_EXCEPTION), smallest))
    with pytest.raises(HaltedOnBadRow, match="even to the dead-letter topic"):
        s.judge_failures()
    assert s.abandoned == 1  # shutdown will not wait for it


def test_oversized_key_and_headers_still_reach_the_dead_letter_topic():
    # The review found a row whose headers alone exceed the limit crashing the relay.
    s = session(publisher=FakePublisher(limit=2_000))
    txn = s.tracker.begin(Lsn(150))
    s.delivery = Delivery(s.tracker, txn, s.failures)
    record = OutboxRecord(
        "outbox.event.order", b"k" * 3_000, b"{}", [("id", b"e-9"), ("h", b"y" * 5_000)], 0
    )
    s.dead_letter(
        Rejected("too large", record.key, record.value, record.headers),
        s.delivery,
        table="public.outbox",
        include_value=False,
    )
    (dead,) = s.publisher.produced  # type: ignore[attr-defined]
    assert dead.key is None and dead.value is None
    assert [name for name, _ in dead.headers] == ["id", "error", "source_lsn", "source_table"]
    assert s.tracker.in_flight_events == 1


def test_halt_policy_stops_on_a_refused_record():
    s = session("halt")
    delivery, msg = in_flight_record(s)
    s.failures.append((delivery, KafkaError(KafkaError.TOPIC_EXCEPTION), msg))
    with pytest.raises(
        HaltedOnBadRow, match=r"event e-1 in transaction at 0/96 cannot be delivered"
    ):
        s.judge_failures()
    assert s.tracker.advance() == 100


@pytest.mark.parametrize(
    "code", [KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT, KafkaError.NOT_ENOUGH_REPLICAS]
)
def test_other_failures_reset_the_pipeline(code):
    s = session()
    delivery, msg = in_flight_record(s)
    s.failures.append((delivery, KafkaError(code), msg))
    with pytest.raises(DeliveryError, match=r"delivery to topic outbox\.event\.order failed"):
        s.judge_failures()


def test_purge_echoes_are_ignored():
    s = session()
    delivery, msg = in_flight_record(s)
    s.failures.append((delivery, KafkaError(KafkaError._PURGE_QUEUE), msg))
    s.judge_failures()
    assert s.publisher.produced == []  # type: ignore[attr-defined]


class RecordingStream:
    def __init__(self) -> None:
        self.statuses: list[Lsn] = []

    def send_status(self, *, flushed: Lsn, reply_requested: bool = False) -> None:
        self.statuses.append(flushed)


def test_frames_other_than_xlogdata_take_the_checked_path():
    """The hot path reads XLogData in place; keepalives and malformed frames still go through
    parse_copy_data, with its errors."""
    s = session()
    stream = RecordingStream()
    s.stream = stream  # type: ignore[assignment]
    s.handle_frame(b"k" + struct.pack(">QqB", 0x500, 0, 1))  # idle keepalive, reply requested
    assert s.tracker.confirmed == Lsn(0x500) and stream.statuses == [Lsn(0x500)]
    with pytest.raises(DecodeError, match="truncated XLogData header"):
        s.handle_frame(b"w" + bytes(10))
    with pytest.raises(DecodeError, match="unknown CopyData message type"):
        s.handle_frame(b"x" + bytes(40))
    # A malformed pgoutput message in a well-formed frame names the frame's start position.
    with pytest.raises(DecodeError) as caught:
        s.handle_frame(b"w" + struct.pack(">QQq", 0x1234, 0x1234, 0) + b"I\x00")
    assert caught.value.lsn == Lsn(0x1234)
