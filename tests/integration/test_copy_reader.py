"""ReplicationStream.read on a real walsender, both ways: frames read from libpq in C
(_copy_reader.c, the default where the extension is built) and psycopg's get_copy_data (the
reference, CDC_RELAY_READ_IN_PYTHON=1). Same frames, same errors, same stop at a warning."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace

import psycopg
import pytest

from cdc_relay.adapters import native_acks
from cdc_relay.adapters.replication import ReplicationStream
from cdc_relay.core.lsn import Lsn
from cdc_relay.errors import ReplicationError
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import execute, insert_events, query
from tests.servers import wait_until

PATHS = pytest.mark.parametrize("path", ["c", "python"])
COMMIT = ord("C")


@pytest.fixture
def stream_of(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    opened: list[ReplicationStream] = []

    def open_stream(url: str, path: str) -> ReplicationStream:
        if path == "python":
            monkeypatch.setenv(native_acks.READ_IN_PYTHON_ENV, "1")
        else:
            monkeypatch.delenv(native_acks.READ_IN_PYTHON_ENV, raising=False)
        stream = ReplicationStream.connect(url)
        opened.append(stream)
        assert (stream._reader is not None) == (path == "c" and native_acks.read_in_c())
        if path == "c":
            assert stream._reader is not None, native_acks.load()[1]
        stream.start(slot="cdc_relay", publication="cdc_relay", start_lsn=Lsn(0))
        return stream

    yield open_stream
    for stream in opened:
        stream.close()


def _frames(stream: ReplicationStream, commits: int, timeout: float = 30) -> list[bytes]:
    """XLogData frames until ``commits`` Commits, each without its send time and WAL end
    (which differ between two reads of one slot)."""
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while sum(1 for f in out if f[9] == COMMIT) < commits:  # the message's type
        frame = stream.read()
        if frame is None:
            assert time.monotonic() < deadline, f"{len(out)} frames after {timeout} s"
            stream.wait(0.1)
        elif frame[0] == ord("w"):
            out.append(bytes(frame[:9]) + bytes(frame[25:]))
    return out


@pytest.mark.compiled_core
def test_the_c_reader_reads_the_frames_psycopg_reads(db: str, kafka: str, stream_of) -> None:
    make_outbox(db, kafka)
    insert_events(db, count=300, per_txn=10)
    # A frame larger than libpq's first buffer, and a transaction of one.
    execute(
        db,
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) SELECT "
        "gen_random_uuid(), 'order', 'big', 'Big', "
        "jsonb_build_object('pad', repeat('x', 100 * 1000))",
    )
    first = stream_of(db, "c")
    in_c = _frames(first, 31)
    first.close()
    wait_until(
        lambda: query(db, "SELECT active_pid FROM pg_replication_slots")[0][0] is None,
        30,
        message="the slot is still active",
    )
    in_python = _frames(stream_of(db, "python"), 31)
    assert len(in_c) == 31 * 2 + 301 + 1  # Begin and Commit each, the inserts, one Relation
    assert in_c == in_python
    assert max(len(f) for f in in_c) > 100_000


def _past_the_first_transaction(
    db: str, kafka: str, stream_of, path: str, events: int
) -> tuple[ReplicationStream, list[bytes]]:
    """A stream over ``events`` events in transactions of 10, read past the first one; and
    what it read."""
    make_outbox(db, kafka)
    insert_events(db, count=events, per_txn=10)
    stream = stream_of(db, path)
    return stream, _frames(stream, 1)


@PATHS
def test_a_skipped_publication_s_warning_stops_before_the_next_frame(
    db: str, kafka: str, stream_of, path: str
) -> None:
    stream, first = _past_the_first_transaction(db, kafka, stream_of, path, 20)
    assert len(first) == 13  # Relation, Begin, 10 inserts, Commit
    warning = SimpleNamespace(
        severity_nonlocalized="WARNING",
        sqlstate="55000",
        message_primary='skipped loading publication "cdc_relay"',
        message_detail=None,
    )
    stream._on_notice(warning)  # as libpq reports it, from inside a read
    with pytest.raises(ReplicationError, match="skipped the publication: skipped loading"):
        stream.read()
    with pytest.raises(ReplicationError, match="skipped the publication"):
        stream.read()  # and every read after it


@PATHS
def test_a_terminated_walsender_ends_the_read_with_the_server_s_reason(
    db: str, kafka: str, stream_of, path: str
) -> None:
    stream, _ = _past_the_first_transaction(db, kafka, stream_of, path, 10)
    execute(db, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots")
    deadline = time.monotonic() + 30
    with pytest.raises(ReplicationError) as caught:
        while time.monotonic() < deadline:
            if stream.read() is None:
                stream.wait(0.1)
    assert "terminating connection due to administrator command" in str(caught.value) or (
        "replication connection lost" in str(caught.value)
    )


@PATHS
def test_a_closed_stream_is_never_read_again(db: str, kafka: str, stream_of, path: str) -> None:
    make_outbox(db, kafka)
    stream = stream_of(db, path)
    stream.close()
    with pytest.raises(psycopg.OperationalError):
        stream.read()
    wait_until(
        lambda: query(db, "SELECT count(*) FROM pg_stat_replication")[0][0] == 0,
        30,
        message="the walsender outlived the closed stream",
    )
