"""Exactly-once mode in the pure core: progress records, what a replay drops, when Kafka
transactions are committed, and what the slot may be confirmed to."""

from __future__ import annotations

import pytest

from cdc_relay.core import verdicts
from cdc_relay.core.lsn import Lsn
from cdc_relay.core.mapping import OutboxRecord
from cdc_relay.core.pipeline import (
    BeginTransaction,
    CommitTransaction,
    Memory,
    Pipeline,
    PipelineConfig,
    Produce,
    Reset,
)
from cdc_relay.core.progress import Progress
from cdc_relay.core.transactions import TransactionLimits
from tests import frames
from tests.unit.test_pipeline import Err, Msg


def pipeline(progress: Progress | None = None, **limits: object) -> Pipeline:
    p = Pipeline(
        PipelineConfig(
            outbox_table=("public", "outbox"),
            exactly_once=True,
            transaction_limits=TransactionLimits(**limits),  # type: ignore[arg-type]
            progress_topic="progress",
            pipeline_key=b"cdc-relay-1-s",
        ),
        start=Lsn(0x100),
        memory=Memory(progress=progress),
    )
    p.feed(frames.relation())
    return p


def txn(p: Pipeline, final: int, keys: list[str], first_lsn: int) -> list[object]:
    """Begin, inserts, Commit (end = final + 8): what feed returned for each frame."""
    out: list[object] = [p.feed(frames.begin(final))]
    for i, key in enumerate(keys):
        out.append(p.feed(frames.insert(frames.outbox_row(key), first_lsn + i)))
    out.append(p.feed(frames.commit(final, final + 8)))
    return out


def test_progress_records_round_trip_and_refuse_what_they_are_not():
    for progress in (Progress(Lsn(0x10)), Progress(Lsn(0x10), Lsn(0x40), 7)):
        assert Progress.decode(progress.encode(slot="s")) == progress
    with pytest.raises(ValueError):
        Progress.decode(b'{"v": 99, "lsn": "0/1"}')
    with pytest.raises(ValueError):
        Progress.decode(b"not json")


def test_the_first_record_of_a_kafka_transaction_comes_after_a_begin():
    p = pipeline()
    _, first, second, commit = txn(p, 0x2F0, ["a", "b"], 0x201)
    assert [type(a) for a in first] == [BeginTransaction, Produce]  # type: ignore[union-attr]
    assert isinstance(second, OutboxRecord)  # then the hot path
    assert commit is None  # not due yet: neither large enough nor old enough


def test_a_kafka_transaction_is_committed_when_the_stream_is_idle_with_its_position():
    p = pipeline()
    txn(p, 0x2F0, ["a"], 0x201)
    (commit,) = p.idle(0.01)
    assert type(commit) is CommitTransaction
    assert commit.progress == Progress(Lsn(0x2F8))
    assert commit.record.topic == "progress" and commit.record.key == b"cdc-relay-1-s"
    assert Progress.decode(commit.record.value or b"") == commit.progress
    assert p.confirmed == 0x100  # acks do not confirm: only the commit does
    p.transaction_committed(commit.progress)
    assert p.confirmed == 0x2F8


def test_no_commit_inside_a_postgres_transaction_unless_it_is_too_large():
    p = pipeline(max_events=3, max_seconds=0.0)
    p.feed(frames.begin(0x2F0))
    p.feed(frames.insert(frames.outbox_row("a"), 0x201))
    assert p.idle(5.0) == []  # idle, but inside a PostgreSQL transaction
    assert all(type(a) is not CommitTransaction for a in p.tick(5.0))
    p.feed(frames.insert(frames.outbox_row("b"), 0x202))
    p.feed(frames.insert(frames.outbox_row("c"), 0x203))
    (split,) = [a for a in p.tick(6.0) if type(a) is CommitTransaction]
    assert split.progress == Progress(Lsn(0x100), Lsn(0x2F0), 3)  # 3 events of 0/2F0 are in
    p.transaction_committed(split.progress)
    assert p.confirmed == 0x100  # the transaction itself is not complete
    later = p.feed(frames.insert(frames.outbox_row("d"), 0x204))
    assert [type(a) for a in later] == [BeginTransaction, Produce]  # type: ignore[union-attr]
    (end,) = p.feed(frames.commit(0x2F0, 0x2F8))  # type: ignore[misc]  # due: max_seconds 0
    assert end.progress == Progress(Lsn(0x2F8))


def test_a_replay_drops_what_the_progress_record_says_is_committed():
    # Committed: everything ending at or before 0/2F8, and 2 events of the transaction at 0/3F0.
    p = pipeline(Progress(Lsn(0x2F8), Lsn(0x3F0), 2))
    old = txn(p, 0x2F0, ["a", "b"], 0x201)
    assert old[1:3] == [[], []]  # dropped
    assert p.confirmed == 0x2F8
    out = txn(p, 0x3F0, ["c", "d", "e"], 0x301)
    assert out[1:3] == [[], []]  # its first two are committed already
    third = out[3]
    assert [type(a) for a in third] == [BeginTransaction, Produce]  # type: ignore[union-attr]
    (commit,) = p.idle(1.0)
    assert commit.progress == Progress(Lsn(0x3F8))  # type: ignore[union-attr]


def test_a_failed_delivery_aborts_the_kafka_transaction_instead_of_dead_lettering():
    memory = Memory(isolate={(0x2F0, "outbox.event.order")})
    p = Pipeline(
        PipelineConfig(outbox_table=("public", "outbox"), exactly_once=True),
        start=Lsn(0x100),
        memory=memory,
    )
    p.feed(frames.relation())
    p.feed(frames.begin(0x2F0))
    actions = p.feed(frames.insert(frames.outbox_row("k", event_id="e-1"), 0x201))
    (alone,) = [a for a in actions if type(a) is Produce]  # type: ignore[union-attr]
    alone.delivery(Err(verdicts.MSG_SIZE_TOO_LARGE), Msg(alone.record))
    (reset,) = p.judge(alone=alone)
    assert type(reset) is Reset and "aborting the Kafka transaction" in reset.reason
    assert 0x201 in memory.poisoned  # the replay dead-letters it in a new transaction
    assert p.stats.dead_lettered == 0


def test_a_stop_commits_what_was_produced_even_mid_transaction():
    p = pipeline()
    p.feed(frames.begin(0x2F0))
    p.feed(frames.insert(frames.outbox_row("a"), 0x201))
    p.stop()
    (commit,) = p.tick(1.0)
    assert type(commit) is CommitTransaction
    assert commit.progress == Progress(Lsn(0x100), Lsn(0x2F0), 1)
    p.transaction_committed(commit.progress)
    p.delivery(None, Msg(frames_record()))  # type: ignore[misc]
    finish = [a for a in p.tick(2.0) if type(a).__name__ == "Finish"]
    assert finish and finish[0].lsn == 0x100  # type: ignore[attr-defined]


def frames_record() -> OutboxRecord:
    return OutboxRecord("outbox.event.order", b"a", b'{"n": 1}', [], 0)
