"""The relay's hot path, in process: CopyData frames → the session's read loop → the pipeline
→ records → a fake producer → delivery callbacks. No server, no broker, no socket: what is
left is the Python work per event that the relay's main thread does besides librdkafka's C
calls.

``python -m bench.hotpath [--transactions N] [--repeat R]`` prints microseconds per event
(best of R). Used to measure hot-path changes back to back, where the end-to-end bench is
too noisy on a shared machine; ``--profile`` prints cProfile's top functions instead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import struct
import threading
import time
import uuid
from typing import Any

from cdc_relay.core.lsn import Lsn
from cdc_relay.core.mapping import OutboxRecord
from cdc_relay.core.pipeline import Pipeline, PipelineConfig
from cdc_relay.core.stats import RelayStats
from cdc_relay.runtime.session import Session

RELID = 16384
# The columns of sql/outbox.sql, with their type OIDs (uuid, text, jsonb, timestamptz).
COLUMNS = (
    ("id", 2950),
    ("aggregate_type", 25),
    ("aggregate_id", 25),
    ("event_type", 25),
    ("payload", 3802),
    ("headers", 3802),
    ("created_at", 1184),
)


def _cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def _xlog_data(payload: bytes, lsn: int) -> bytes:
    return b"w" + struct.pack(">QQq", lsn, lsn, 0) + payload


def _tuple_data(values: list[bytes | None]) -> bytes:
    out = struct.pack(">H", len(values))
    for value in values:
        out += b"n" if value is None else b"t" + struct.pack(">I", len(value)) + value
    return out


def make_frames(transactions: int, txn_size: int = 10, payload_bytes: int = 300) -> list[bytes]:
    """A Relation message, then ``transactions`` of Begin, ``txn_size`` Inserts and Commit,
    shaped like the bench's default workload."""
    relation = b"R" + struct.pack(">I", RELID) + _cstring("public") + _cstring("outbox") + b"d"
    relation += struct.pack(">H", len(COLUMNS))
    for name, oid in COLUMNS:
        relation += b"\0" + _cstring(name) + struct.pack(">Ii", oid, -1)
    payload = b'{"pad": "' + b"x" * max(0, payload_bytes - 30) + b'", "seq": 1}'
    frames = [_xlog_data(relation, 1)]
    lsn = 100
    for t in range(transactions):
        begin = b"B" + struct.pack(">QqI", lsn + 5_000, 0, 1_000 + t)
        frames.append(_xlog_data(begin, lsn))
        for i in range(txn_size):
            lsn += 400
            row: list[bytes | None] = [
                str(uuid.uuid4()).encode(),
                b"order",
                f"a-{(t * txn_size + i) % 1000}".encode(),
                b"OrderPlaced",
                payload,
                None,
                b"2026-11-22 12:00:00.123456+00",
            ]
            insert = b"I" + struct.pack(">I", RELID) + b"N" + _tuple_data(row)
            frames.append(_xlog_data(insert, lsn))
        lsn += 400
        frames.append(_xlog_data(b"C" + struct.pack(">BQQq", 0, lsn, lsn + 50, 0), lsn))
        lsn += 100
    return frames


class _Acknowledgement:
    """What a delivery callback reads of a confluent-kafka Message."""

    __slots__ = ("_key", "_value")

    def __init__(self, key: bytes | None, value: bytes | None) -> None:
        self._key, self._value = key, value

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def __len__(self) -> int:  # confluent-kafka's: the value's length
        return len(self._value) if self._value else 0


class _AcknowledgingPublisher:
    """Keeps what was produced; poll() acknowledges all of it."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, _Acknowledgement]] = []

    def produce(self, record: OutboxRecord, on_delivery: Any, while_waiting: Any = None) -> None:
        self.pending.append((on_delivery, _Acknowledgement(record.key, record.value)))

    def enqueue(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        partition: int,
        callback: Any,
        on_delivery: Any,
        timestamp: int,
        headers: Any,
    ) -> None:
        self.pending.append((callback, _Acknowledgement(key, value)))

    def poll(self, timeout: float = 0.0) -> int:
        pending, self.pending = self.pending, []
        for on_delivery, message in pending:
            on_delivery(None, message)
        return len(pending)

    def outstanding(self) -> int:
        return len(self.pending)

    def purge_queue(self) -> None:
        pass

    # The hot path is measured in at-least-once mode: no Kafka transactions.
    def begin_transaction(self) -> None:
        raise NotImplementedError

    def commit_transaction(self, while_waiting: Any) -> None:
        raise NotImplementedError

    def abort_transaction(self, while_waiting: Any) -> None:
        raise NotImplementedError


class _FrameStream:
    """Hands out the prepared frames, as the replication stream would."""

    def __init__(self, frames: list[bytes]) -> None:
        self._frames = iter(frames)

    def read(self) -> bytes | None:
        return next(self._frames, None)

    def wait(self, timeout: float) -> None:
        pass

    def send_status(self, *, flushed: Lsn, reply_requested: bool = False) -> None:
        pass


def run_once(frames: list[bytes]) -> tuple[float, int]:
    """CPU seconds to handle every frame (acknowledging after each batch of 2,000 frames), and
    events published. CPU time, not wall time: the machine is shared."""
    stats = RelayStats()
    publisher = _AcknowledgingPublisher()
    pipeline = Pipeline(
        PipelineConfig(outbox_table=("public", "outbox")), start=Lsn(0), stats=stats
    )
    session = Session(
        pipeline=pipeline,
        stream=_FrameStream(frames),
        publisher=publisher,
        stop=threading.Event(),
    )
    read_batch = session.read_batch
    started = time.process_time()
    while stats.published + len(frames) // 12 < len(frames):  # not every frame is an event
        before = stats.published
        read_batch()
        publisher.poll()
        if stats.published == before:
            break
    publisher.poll()
    return time.process_time() - started, stats.published


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__)
    parser.add_argument("--transactions", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile's top functions")
    args = parser.parse_args(argv)
    frames = make_frames(args.transactions)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(run_once, frames)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        return 0
    best, published = min(run_once(frames) for _ in range(args.repeat))
    per_event_us = best / published * 1e6
    print(f"{per_event_us:.2f} µs per event ({published:,} events, best of {args.repeat})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
