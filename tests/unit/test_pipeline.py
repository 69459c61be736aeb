"""The pipeline's decisions, one behaviour per test: frames in, actions out, no I/O.

Delivery reports are played through the transactions' callbacks with small fakes of
confluent-kafka's Message and KafkaError; the codes are librdkafka's.
"""

from __future__ import annotations

import struct

import pytest

from cdc_relay.core import claimcheck, verdicts
from cdc_relay.core.acks import Transaction
from cdc_relay.core.lsn import Lsn
from cdc_relay.core.mapping import OutboxRecord, RowSpec
from cdc_relay.core.pipeline import (
    SKIPPED_BY_OPERATOR,
    Finish,
    Keep,
    Memory,
    Notice,
    Pipeline,
    PipelineConfig,
    Produce,
    Reconnect,
    Reset,
    RowProducer,
    SendStatus,
    State,
)
from cdc_relay.core.verdicts import Verdict
from cdc_relay.errors import DecodeError
from tests import frames

DLQ = "outbox.dead-letter"


class Msg:
    def __init__(self, record: OutboxRecord) -> None:
        self.record = record

    def topic(self) -> str:
        return self.record.topic

    def key(self) -> bytes | None:
        return self.record.key

    def value(self) -> bytes | None:
        return self.record.value

    def __len__(self) -> int:  # confluent-kafka's: the value's length
        return len(self.record.value or b"")

    def headers(self) -> list[tuple[str, bytes]]:
        return self.record.headers


class Err:
    def __init__(self, code: int, text: str = "refused") -> None:
        self._code, self._text = code, text

    def code(self) -> int:
        return self._code

    def str(self) -> str:
        return self._text


def pipeline(
    policy: str = "dead-letter",
    memory: Memory | None = None,
    rows: RowProducer | None = None,
    **config: object,
) -> Pipeline:
    p = Pipeline(
        PipelineConfig(
            outbox_table=("public", "outbox"),
            dead_letter_topic=DLQ,
            halt_on_bad_row=policy == "halt",
            **config,  # type: ignore[arg-type]
        ),
        start=Lsn(0x100),
        memory=memory,
        rows=rows,
    )
    assert p.feed(frames.relation()) is None
    return p


def one_event_txn(p: Pipeline, *, key: str = "k-1", payload: bytes = b'{"a":1}', lsn: int = 0x201):
    """Begin, one insert, Commit: returns (record, transaction)."""
    p.feed(frames.begin(0x2F0))
    record = p.feed(frames.insert(frames.outbox_row(key, payload, event_id="e-1"), lsn))
    txn = p.delivery
    p.feed(frames.commit(0x2F0, 0x300))
    assert isinstance(record, OutboxRecord) and txn is not None
    return record, txn


def produced(actions: list) -> list[Produce]:
    return [a for a in actions if type(a) is Produce]


# --------------------------------------------------------------------------- the hot path


def test_an_insert_comes_back_as_a_record_counted_in_flight_and_confirmed_after_its_ack():
    p = pipeline()
    record, txn = one_event_txn(p)
    assert record.topic == "outbox.event.order" and record.key == b"k-1"
    assert (p.tracker.in_flight_events, p.confirmed) == (1, 0x100)
    txn(None, Msg(record))
    assert (p.tracker.in_flight_events, p.tracker.in_flight_bytes, p.confirmed) == (0, 0, 0x300)
    assert p.stats.published == 1 and p.stats.published_by_topic == {record.topic: 1}


def test_reading_stops_at_the_in_flight_bounds():
    p = pipeline(max_in_flight_events=2)
    p.feed(frames.begin(0x2F0))
    assert p.reading
    p.feed(frames.insert(frames.outbox_row("a"), 0x201))
    assert p.reading
    p.feed(frames.insert(frames.outbox_row("b"), 0x202))
    assert not p.reading


def test_decode_errors_name_the_frame_position_and_the_offset_in_the_message():
    p = pipeline()
    with pytest.raises(DecodeError) as caught:
        p.feed(b"w" + struct.pack(">QQq", 0x1234, 0x1234, 0) + b"I\x00")
    assert caught.value.lsn == Lsn(0x1234)
    assert caught.value.offset is not None and caught.value.offset < 3
    with pytest.raises(DecodeError, match="unknown CopyData message type"):
        p.feed(b"x" + bytes(40))


def test_a_keepalive_advances_an_idle_slot_and_a_reply_request_is_answered_at_once():
    p = pipeline()
    assert p.feed(frames.keepalive(0x500)) is None
    assert p.confirmed == 0x500
    assert p.feed(frames.keepalive(0x600, reply=True)) == [SendStatus(Lsn(0x600), moved=True)]


def test_status_updates_go_out_when_the_position_moved_and_at_least_every_max_silence():
    p = pipeline(status_interval=1.0, max_silence=10.0, probe_after=60.0)
    assert p.tick(0.5) == []
    record, txn = one_event_txn(p)
    txn(None, Msg(record))
    assert p.tick(0.9) == []  # moved, but within the interval
    assert p.tick(1.2) == [SendStatus(Lsn(0x300), moved=True)]
    assert p.tick(5.0) == []
    assert p.tick(11.3) == [SendStatus(Lsn(0x300), moved=False)]  # silence is never longer


def test_a_silent_server_is_asked_for_a_reply_then_presumed_dead():
    """Issue 11: a half-open connection (a proxy that stops forwarding without closing) went
    unnoticed. Within probe_after + reply_timeout of silence the session ends."""
    p = pipeline(probe_after=10.0, reply_timeout=10.0, max_silence=30.0)
    assert p.tick(5.0) == []
    (probe,) = p.tick(10.5)
    assert type(probe) is SendStatus and probe.reply_requested
    assert p.tick(15.0) == []
    (dead,) = p.tick(20.6)
    assert type(dead) is Reconnect and "presumed dead" in dead.reason


def test_an_answer_clears_the_probe():
    p = pipeline(probe_after=10.0, reply_timeout=10.0, max_silence=30.0)
    p.tick(10.5)
    p.received(12.0)  # the server's keepalive came back
    assert p.tick(20.6) == []
    (probe,) = p.tick(22.5)
    assert type(probe) is SendStatus and probe.reply_requested


def test_silence_tells_nothing_while_the_socket_is_left_unread():
    p = pipeline(probe_after=10.0, reply_timeout=10.0, max_in_flight_events=1, max_silence=30.0)
    p.feed(frames.begin(0x2F0))
    p.feed(frames.insert(frames.outbox_row("a"), 0x201))  # backpressure from here on
    assert not p.reading
    assert all(not isinstance(a, Reconnect) for a in p.tick(25.0) + p.tick(50.0))


def test_a_stalled_kafka_is_reported_once_and_so_is_its_recovery():
    p = pipeline(stall_warning=30.0, probe_after=1_000.0)
    record, txn = one_event_txn(p)
    assert p.tick(1.0) == []
    (warning,) = [a for a in p.tick(31.5) if type(a) is Notice]
    assert warning.level == 30
    assert "acknowledged nothing for 32 s with 1 events in flight" in warning.message
    assert "transaction at 0/2F0" in warning.message
    assert p.stats.stalled_since == 0.0  # in flight since the pipeline started
    assert [a for a in p.tick(60.0) if type(a) is Notice] == []  # once
    txn(None, Msg(record))
    (recovered,) = [a for a in p.tick(61.0) if type(a) is Notice]
    assert "recovered" in recovered.message and p.stats.stalled_since is None


# --------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    "code",
    [
        verdicts.MSG_SIZE_TOO_LARGE,
        verdicts.INVALID_RECORD,
        verdicts.INVALID_DIFFERENT_RECORD,
        verdicts.RECORD_LIST_TOO_LARGE,
        verdicts.TOPIC_EXCEPTION,
    ],
)
def test_a_refusal_of_a_record_that_was_not_alone_is_never_a_verdict_on_it(code):
    """Bug 1: _INVALID_DIFFERENT_RECORD (and any batch-wide refusal) reached the records of a
    batch in which another record was invalid, and the relay dead-lettered them."""
    p = pipeline()
    record, txn = one_event_txn(p)
    txn(Err(code), Msg(record))
    actions = p.judge()
    assert [type(a) for a in actions] == [Reset]
    assert p.stats.dead_lettered == 0 and produced(actions) == []
    assert p.memory.isolate == {(0x2F0, "outbox.event.order")}
    assert p.state is State.DRAINING and p.confirmed == 0x100


def test_innocent_batch_mates_are_never_dead_lettered_even_alone():
    assert verdicts.judge(verdicts.INVALID_DIFFERENT_RECORD, alone=True) is Verdict.RESET
    assert verdicts.judge(verdicts.INVALID_DIFFERENT_RECORD, alone=False) is Verdict.ISOLATE


def test_the_replay_of_an_isolated_transaction_produces_its_records_alone():
    memory = Memory(isolate={(0x2F0, "outbox.event.order")})
    p = pipeline(memory=memory)
    p.feed(frames.begin(0x2F0))
    (action,) = p.feed(frames.insert(frames.outbox_row("k"), 0x201))  # type: ignore[misc]
    assert type(action) is Produce and action.alone and action.lsn == 0x201
    p.feed(frames.commit(0x2F0, 0x300))
    p.feed(frames.begin(0x3F0))  # another transaction: the hot path again
    assert isinstance(p.feed(frames.insert(frames.outbox_row("k"), 0x301)), OutboxRecord)


def test_a_record_refused_alone_is_dead_lettered_remembered_and_never_tried_again():
    memory = Memory(isolate={(0x2F0, "outbox.event.order")})
    p = pipeline(memory=memory)
    p.feed(frames.begin(0x2F0))
    (alone,) = p.feed(frames.insert(frames.outbox_row("k", b"x" * 5000, event_id="e-1"), 0x201))
    p.feed(frames.commit(0x2F0, 0x300))
    alone.delivery(Err(verdicts.MSG_SIZE_TOO_LARGE, "too large"), Msg(alone.record))
    actions = p.judge(alone=alone)
    (dead,) = produced(actions)
    assert dead.record.topic == DLQ and dead.alone
    assert dead.record.value is None  # too large for Kafka: too large for the dead letters too
    headers = dict(dead.record.headers)
    assert headers["id"] == b"e-1" and headers["source_lsn"] == b"0/2F0"
    assert b"refused it: too large" in headers["error"]
    (keep,) = [a for a in actions if type(a) is Keep]
    assert keep.event_id == "e-1" and keep.table == "public.outbox"  # prune keeps the row
    assert memory.poisoned[0x201][0] == 0x2F0
    # The transaction is confirmed once the dead-letter record is acknowledged and the row kept.
    dead.delivery(None, Msg(dead.record))
    assert p.confirmed == 0x100
    p.kept(keep.delivery)
    assert p.confirmed == 0x300

    # A replay (after the reset the refusal caused) dead-letters it without trying its topic.
    again = pipeline(memory=memory)
    again.feed(frames.begin(0x2F0))
    actions = again.feed(frames.insert(frames.outbox_row("k", b"x" * 5000, event_id="e-1"), 0x201))
    assert [a.record.topic for a in produced(actions)] == [DLQ]  # type: ignore[arg-type]


def test_a_refused_dead_letter_record_shrinks_step_by_step_then_halts():
    p = pipeline()
    p.feed(frames.begin(0x2F0))
    row = frames.outbox_row("k", b"{}", event_id="e-1")
    row[1] = None  # a NULL aggregate type: rejected by the mapping, straight to dead letters
    actions = p.feed(frames.insert(row, 0x201))
    (dead,) = produced(actions)  # type: ignore[arg-type]
    assert dead.record.value == b"{}" and dead.alone and dead.lsn == 0x201
    dead.delivery(Err(verdicts.MSG_SIZE_TOO_LARGE), Msg(dead.record))
    (smaller,) = produced(p.judge(alone=dead))
    assert (smaller.record.key, smaller.record.value) == (b"k", None)
    smaller.delivery(Err(verdicts.MSG_SIZE_TOO_LARGE), Msg(smaller.record))
    (smallest,) = produced(p.judge(alone=smaller))
    assert smallest.record.key is None
    assert [name for name, _ in smallest.record.headers] == [
        "id",
        "error",
        "source_lsn",
        "source_table",
    ]
    assert p.memory.dead_letter_forms[0x201][1] == 2  # a replay starts from the smallest form
    smallest.delivery(Err(verdicts.TOPIC_EXCEPTION), Msg(smallest.record))
    assert produced(p.judge(alone=smallest)) == []
    (finish,) = p.tick(1.0)
    assert type(finish) is Finish and "even to the dead-letter topic" in (finish.halt or "")
    assert finish.lsn == 0x100  # the slot stays before the row


def test_a_record_produce_refuses_goes_to_the_dead_letter_topic_without_its_value():
    p = pipeline()
    p.feed(frames.begin(0x2F0))
    frame = frames.insert(frames.outbox_row("k", b"y" * 5000, event_id="e-7"), 0x201)
    record = p.feed(frame)
    assert isinstance(record, OutboxRecord)
    actions = p.refused(record, p.delivery, "Message size too large", too_large=True, frame=frame)  # type: ignore[arg-type]
    (dead,) = produced(actions)
    assert dead.record.value is None and dead.lsn == 0x201
    assert any(type(a) is Keep for a in actions)
    assert p.tracker.in_flight_events == 1  # the dead-letter record; the Keep is no record
    assert p.stats.delivery_errors == {"refused": 1}


def test_a_row_kept_from_prune_takes_no_room_in_the_in_flight_bounds():
    """Found by the full-size property run: a record refused as too large became its
    dead-letter record plus a Keep counted as a second event in flight, so one frame read just
    under max_in_flight_events left the relay one event over it."""
    p = pipeline(max_in_flight_events=2)
    p.feed(frames.begin(0x2F0))
    first = p.feed(frames.insert(frames.outbox_row("a"), 0x201))
    assert isinstance(first, OutboxRecord) and p.reading
    frame = frames.insert(frames.outbox_row("k", b"y" * 5000, event_id="e-7"), 0x202)
    record = p.feed(frame)
    assert isinstance(record, OutboxRecord)
    txn = p.delivery
    assert txn is not None
    actions = p.refused(record, txn, "Message size too large", too_large=True, frame=frame)
    (keep,) = [a for a in actions if type(a) is Keep]
    assert p.tracker.in_flight_events == 2  # the first record and the dead letter: the bound
    p.feed(frames.commit(0x2F0, 0x300))
    (dead,) = produced(actions)
    txn(None, Msg(first))
    dead.delivery(None, Msg(dead.record))
    assert p.tracker.in_flight_events == 0 and p.confirmed == 0x100  # the row not kept yet
    p.kept(keep.delivery)
    assert p.confirmed == 0x300


def test_counters_never_go_down_when_a_delivered_record_is_replaced():
    """Bug 4: cdc_relay_events_published_total went down when a refused record was replaced
    by its dead-letter record."""
    memory = Memory(isolate={(0x2F0, "outbox.event.order")})
    p = pipeline(memory=memory)
    p.feed(frames.begin(0x2F0))
    (alone,) = p.feed(frames.insert(frames.outbox_row("k"), 0x201))  # type: ignore[misc]
    assert p.stats.published == 1
    alone.delivery(Err(verdicts.TOPIC_EXCEPTION), Msg(alone.record))
    p.judge(alone=alone)
    assert (p.stats.published, p.stats.dead_lettered) == (1, 1)
    assert p.stats.published_by_topic == {"outbox.event.order": 1}


@pytest.mark.parametrize(
    "code",
    [verdicts.MSG_TIMED_OUT, verdicts.TRANSPORT, verdicts.NOT_ENOUGH_REPLICAS, verdicts.FATAL],
)
def test_other_failures_reset_the_pipeline(code):
    p = pipeline()
    record, txn = one_event_txn(p)
    txn(Err(code, "it failed"), Msg(record))
    (reset,) = p.judge()
    assert type(reset) is Reset
    assert reset.reason == "delivery to topic outbox.event.order failed: it failed"
    assert not p.reading


def test_a_missing_topic_is_named_and_retried():
    p = pipeline()
    record, txn = one_event_txn(p)
    txn(Err(verdicts.UNKNOWN_TOPIC_OR_PART, "Unknown topic"), Msg(record))
    (reset,) = p.judge()
    assert type(reset) is Reset and "topic outbox.event.order does not exist" in reset.reason


def test_purge_echoes_are_ignored():
    p = pipeline()
    record, txn = one_event_txn(p)
    txn(Err(verdicts.PURGE_QUEUE), Msg(record))
    assert p.judge() == [] and p.state is State.STREAMING


# --------------------------------------------------------------------------- halts and skips


def test_halt_policy_stops_before_the_row_and_says_how_to_skip_it():
    p = pipeline("halt")
    p.feed(frames.begin(0x2F0))
    first = p.feed(frames.insert(frames.outbox_row("a", event_id="e-0"), 0x201))
    row = frames.outbox_row("k", event_id="e-1")
    row[2] = None  # a NULL aggregate id
    assert p.feed(frames.insert(row, 0x2A0)) == []
    assert p.state is State.STOPPING and not p.reading
    # The Commit is never read: the driver stops at the halt. Even when acks come in:
    p.delivery(None, Msg(first))  # type: ignore[arg-type, misc]
    (finish,) = p.tick(1.0)
    assert type(finish) is Finish and finish.lsn == 0x100 and finish.halt_lsn == 0x2A0
    assert finish.halt is not None
    assert "event e-1 in transaction at 0/2F0 cannot be delivered" in finish.halt
    assert finish.halt.endswith("to skip it: cdc-relay skip --lsn 0/2A0")


def test_a_halting_transaction_is_never_confirmed_even_if_its_commit_is_read():
    """Found by the property tests: a record refused by produce() under the halt policy was
    abandoned, and reading the transaction's Commit made it confirmable."""
    p = pipeline("halt")
    p.feed(frames.begin(0x2F0))
    frame = frames.insert(frames.outbox_row("k", b"z" * 10), 0x201)
    record = p.feed(frame)
    p.refused(record, p.delivery, "too large", too_large=True, frame=frame)  # type: ignore[arg-type]
    p.feed(frames.commit(0x2F0, 0x300))
    (finish,) = p.tick(1.0)
    assert type(finish) is Finish and finish.lsn == 0x100


def test_a_skip_also_gets_past_a_row_the_mapping_rejects():
    """The skip is checked first: the row that halted the relay is usually one the mapping
    rejects (a NULL key), which the policy would halt on again."""
    p = pipeline("halt", memory=Memory(skips=frozenset({0x202})))
    p.feed(frames.begin(0x2F0))
    row = frames.outbox_row("k", event_id="e-2")
    row[2] = None
    (_, dead) = p.feed(frames.insert(row, 0x202))  # type: ignore[misc]
    assert type(dead) is Produce and dead.record.topic == DLQ
    assert dict(dead.record.headers)["error"] == SKIPPED_BY_OPERATOR.encode()
    assert p.state is State.STREAMING


def test_an_operator_skip_dead_letters_exactly_that_event_whatever_the_policy():
    p = pipeline("halt", memory=Memory(skips=frozenset({0x202})))
    p.feed(frames.begin(0x2F0))
    before = p.feed(frames.insert(frames.outbox_row("a"), 0x201))
    actions = p.feed(frames.insert(frames.outbox_row("b", event_id="e-2"), 0x202))
    after = p.feed(frames.insert(frames.outbox_row("c"), 0x203))
    assert produced(before) and produced(after)  # type: ignore[arg-type]
    assert [p.record.topic for p in produced(before + after)] == ["outbox.event.order"] * 2  # type: ignore[operator]
    (dead,) = produced(actions)  # type: ignore[arg-type]
    assert dead.record.topic == DLQ and dead.record.value is not None
    assert dict(dead.record.headers)["error"] == SKIPPED_BY_OPERATOR.encode()
    assert any(type(a) is Notice for a in actions)  # type: ignore[union-attr]
    assert p.state is State.STREAMING


# --------------------------------------------------------------------------- stopping


def test_stop_waits_for_acks_then_finishes_with_the_confirmed_position():
    p = pipeline(shutdown_timeout=30.0)
    record, txn = one_event_txn(p)
    p.stop()
    assert not p.reading
    assert p.tick(1.0) == []
    txn(None, Msg(record))
    (status, *_) = p.tick(2.0) or [None]
    finish = status if type(status) is Finish else p.tick(3.0)[0]
    assert type(finish) is Finish and finish.lsn == 0x300 and finish.unacknowledged == 0


def test_stop_gives_up_waiting_after_the_shutdown_timeout():
    p = pipeline(shutdown_timeout=5.0)
    one_event_txn(p)
    p.stop()
    assert p.tick(1.0) == []
    (finish,) = p.tick(6.5)
    assert type(finish) is Finish and finish.unacknowledged == 1 and finish.lsn == 0x100


def test_with_claim_check_a_record_too_large_for_kafka_goes_by_reference_and_is_kept():
    p = pipeline(claim_check_over_bytes=10_000)
    p.feed(frames.begin(0x2F0))
    frame = frames.insert(frames.outbox_row("k", b"y" * 5000, event_id="e-7"), 0x201)
    record = p.feed(frame)
    assert isinstance(record, OutboxRecord)
    actions = p.refused(record, p.delivery, "Message size too large", too_large=True, frame=frame)  # type: ignore[arg-type]
    (reference,) = produced(actions)
    assert reference.record.topic == record.topic and reference.record.key == b"k"
    parsed = claimcheck.parse_reference(reference.record.value, reference.record.headers)
    assert parsed is not None and (parsed.event_id, parsed.size) == ("e-7", len(record.value))
    (keep,) = [a for a in actions if type(a) is Keep]
    assert keep.reason == claimcheck.KEPT_REASON
    assert p.stats.dead_lettered == 0 and p.stats.published == 1
    # A reference refused in turn is dead-lettered, not referenced again.
    again = p.refused(reference.record, p.delivery, "too large", too_large=True, frame=frame)  # type: ignore[arg-type]
    (dead,) = produced(again)
    assert dead.record.topic == DLQ and p.stats.dead_lettered == 1


# --------------------------------------------------------------------------- the pump


def _reader(items: list[bytes]):
    stream = iter(items)
    return lambda: next(stream, None)


def test_the_pump_enqueues_plain_records_positionally_and_stops_when_nothing_is_buffered():
    p = pipeline()
    calls: list[tuple] = []
    row = frames.outbox_row("k", b'{"a":1}', event_id="e-1")
    read = _reader([frames.begin(0x2F0), frames.insert(row, 0x201)])
    assert p.pump(read, lambda *args: calls.append(args), 100) == 2
    assert p.held is None
    ((topic, value, key, partition, callback, on_delivery, timestamp, headers),) = calls
    assert (topic, key, partition, on_delivery) == ("outbox.event.order", b"k", -1, None)
    assert callback is p.delivery and value == b'{"a":1}' and dict(headers)["id"] == b"e-1"
    assert isinstance(timestamp, int) and p.tracker.in_flight_events == 1


def test_the_pump_stops_at_the_in_flight_bounds_and_at_its_limit():
    p = pipeline(max_in_flight_events=2)
    inserts = [frames.insert(frames.outbox_row(k), 0x201 + i) for i, k in enumerate("abc")]
    read = _reader([frames.begin(0x2F0), *inserts])
    assert p.pump(read, lambda *args: None, 1) == 1  # the limit: the Begin alone
    assert p.pump(read, lambda *args: None, 100) == 2  # two inserts: the bound
    assert p.tracker.in_flight_events == 2 and not p.reading


def test_the_pump_leaves_actions_and_records_the_producer_did_not_take_to_the_driver():
    memory = Memory(isolate={(0x2F0, "outbox.event.order")})
    p = pipeline(memory=memory)
    isolated = frames.insert(frames.outbox_row("k"), 0x201)
    assert (
        p.pump(
            _reader([frames.begin(0x2F0), isolated, frames.commit(0x2F0, 0x300)]),
            lambda *args: None,
            100,
        )
        == 2
    )
    assert p.held is not None and p.held.frame == isolated and p.held.error is None
    (action,) = p.held.out  # type: ignore[misc]
    assert type(action) is Produce and action.alone  # stopped at it: the Commit is unread

    def full(*args: object) -> None:
        raise BufferError("Local: Queue full")

    q = pipeline()
    plain = frames.insert(frames.outbox_row("k"), 0x201)
    assert q.pump(_reader([frames.begin(0x2F0), plain]), full, 100) == 2
    assert q.held is not None and q.held.frame == plain
    assert isinstance(q.held.out, OutboxRecord) and isinstance(q.held.error, BufferError)
    assert q.tracker.in_flight_events == 1  # counted: the driver produces it the careful way


# --------------------------------------------------------------------------- the C row path


class FakeRows:
    """A RowProducer: takes the inserts of planned tables (as the C one takes plain rows),
    answering each value's size; or raises what ``error`` says."""

    def __init__(self) -> None:
        self.plans: dict[int, tuple[RowSpec, dict[str, int]]] = {}
        self.produced: list[tuple[bytes, Transaction]] = []
        self.offered = 0
        self.folds = 0
        self.error: Exception | None = None

    def plan(self, relid: int, spec: RowSpec, counts: dict[str, int], /) -> None:
        self.plans[relid] = (spec, counts)

    def forget(self, relid: int, /) -> bool:
        return self.plans.pop(relid, None) is not None

    def produce(self, frame: bytes | memoryview, token: Transaction, /) -> int:
        self.offered += 1
        frame = bytes(frame)
        if frame[25:26] != b"I" or struct.unpack_from(">I", frame, 26)[0] not in self.plans:
            return -1
        if self.error is not None:
            raise self.error
        self.produced.append((frame, token))
        return 7  # the value's size, as the C path counts it

    def fold_counts(self) -> None:
        self.folds += 1


def test_a_table_s_plan_is_given_to_the_row_path_with_its_counters():
    rows = FakeRows()
    p = pipeline(rows=rows)
    ((spec, counts),) = [rows.plans[frames.OUTBOX_RELID]]
    assert counts is p.stats.published_by_source["public.outbox"]
    assert spec[0] == len(frames.OUTBOX_COLUMNS) and spec[-1] == {}  # width; the topic cache


def test_the_pump_counts_what_the_row_path_produced_as_feed_would():
    rows = FakeRows()
    p = pipeline(rows=rows)
    inserts = [frames.insert(frames.outbox_row(k), 0x201 + i) for i, k in enumerate("ab")]
    read = _reader([frames.begin(0x2F0), *inserts, frames.commit(0x2F0, 0x300)])
    assert p.pump(read, lambda *args: pytest.fail("enqueued"), 100) == 4
    txn = rows.produced[0][1]
    assert [frame for frame, _ in rows.produced] == inserts and rows.produced[1][1] is txn
    assert (p.tracker.in_flight_events, p.tracker.in_flight_bytes, txn.pending) == (2, 14, 2)
    assert p.stats.published == 2
    txn.acked(2, 14)  # as acks.settle does for the C path's reports
    assert (p.tracker.in_flight_events, p.tracker.in_flight_bytes, p.confirmed) == (0, 0, 0x300)
    assert rows.folds == 1  # the per-topic counts are complete when the pump returns


def test_the_pump_folds_the_row_path_s_counts_even_when_a_frame_raises():
    rows = FakeRows()
    p = pipeline(rows=rows)
    plain = frames.insert(frames.outbox_row("k"), 0x201)
    read = _reader([frames.begin(0x2F0), plain, frames.xlog_data(b"Q", 0x202)])
    with pytest.raises(DecodeError):
        p.pump(read, lambda *args: pytest.fail("enqueued"), 100)
    assert len(rows.produced) == 1 and rows.folds == 1


def test_a_frame_the_row_path_leaves_goes_to_feed():
    rows = FakeRows()
    p = pipeline(rows=rows)
    calls: list[tuple] = []
    other = frames.insert(frames.outbox_row("k"), 0x201, relid=frames.OUTBOX_RELID + 1)
    plain = frames.insert(frames.outbox_row("k"), 0x202)
    rows.forget(frames.OUTBOX_RELID)  # as the C path leaves a row it does not take
    read = _reader([frames.begin(0x2F0), other, plain])
    assert p.pump(read, lambda *args: calls.append(args), 100) == 3
    assert rows.offered == 2 and rows.produced == [] and len(calls) == 1
    assert p.tracker.in_flight_events == 1


def test_a_record_the_row_path_could_not_hand_over_is_held_counted_once():
    rows = FakeRows()
    p = pipeline(rows=rows)
    rows.error = BufferError("Local: Queue full")
    plain = frames.insert(frames.outbox_row("k"), 0x201)
    assert p.pump(_reader([frames.begin(0x2F0), plain]), lambda *args: None, 100) == 2
    assert p.held is not None and p.held.frame == plain and p.held.error is rows.error
    assert isinstance(p.held.out, OutboxRecord) and p.held.out.key == b"k"
    assert (p.tracker.in_flight_events, p.stats.published) == (1, 1)


def test_inserts_that_need_care_never_go_to_the_row_path():
    rows = FakeRows()
    memory = Memory(isolate={(0x2F0, "outbox.event.order")})
    p = pipeline(memory=memory, rows=rows)
    isolated = frames.insert(frames.outbox_row("k"), 0x201)
    assert p.pump(_reader([frames.begin(0x2F0), isolated]), lambda *args: None, 100) == 2
    assert rows.produced == [] and p.held is not None and p.held.frame == isolated


def test_a_table_that_stops_being_a_source_is_forgotten_by_the_row_path():
    rows = FakeRows()
    p = pipeline(rows=rows)
    with pytest.raises(Exception, match="renamed"):
        p.feed(frames.relation(name="outbox_old"))
    assert rows.plans == {}
