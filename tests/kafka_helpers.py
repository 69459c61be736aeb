"""Reading what reached the broker, from outside the relay.

Consumers here never join a group: partitions are assigned explicitly from metadata at
OFFSET_BEGINNING and no offsets are committed (fast, and nothing to clean up). They do not
create topics either (``allow.auto.create.topics=false``; ``list_topics`` never does), whereas
a Producer or AdminClient metadata request for a missing topic creates it on a broker with
``auto.create.topics.enable``.

``consume_all`` knows it has read everything once every assigned partition reports its end
(``enable.partition.eof``: the fetch position reached the high watermark). Tansu (the demo
broker) does not report true high watermarks: read it with ``watermarks=False`` and an
expected count.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]


@dataclass
class ConsumedRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    # Kafka allows null header values; they come back as None.
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)
    timestamp_ms: int = 0
    timestamp_type: int = 0  # confluent_kafka.TIMESTAMP_CREATE_TIME (1) or LOG_APPEND_TIME (2)

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name`` (KeyError if absent)."""
        for k, v in reversed(self.headers):
            if k == name:
                return v
        raise KeyError(name)


def _consumer(bootstrap: str, **overrides: Any) -> Consumer:
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        # required by the client, but never joined: partitions are assigned explicitly
        "group.id": f"cdc-relay-test-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "allow.auto.create.topics": False,
        "fetch.wait.max.ms": 50,
        "topic.metadata.refresh.interval.ms": 1000,
        "log_level": 3,
    }
    conf.update(overrides)
    return Consumer(conf)


def list_topics(bootstrap: str, timeout: float = 10.0) -> set[str]:
    """Names of the topics that exist (never creates one)."""
    c = _consumer(bootstrap)
    try:
        return set(c.list_topics(timeout=timeout).topics)
    finally:
        c.close()


def create_topic(
    bootstrap: str,
    name: str,
    partitions: int = 1,
    timeout: float = 10.0,
    replication_factor: int = -1,
    **config: str,
) -> None:
    """Create ``name`` (TOPIC_ALREADY_EXISTS is fine); ``replication_factor`` -1 takes the
    broker's default.replication.factor."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    futures = admin.create_topics(
        [
            NewTopic(
                name,
                num_partitions=partitions,
                replication_factor=replication_factor,
                config=config or {},
            )
        ],
        operation_timeout=timeout,
    )
    for fut in futures.values():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def consume_all(
    bootstrap: str,
    topics: list[str],
    *,
    expected: int | None = None,
    timeout: float = 30.0,
    idle: float = 2.0,
    linger: float = 0.0,
    watermarks: bool = True,
) -> list[ConsumedRecord]:
    """Read ``topics`` from the beginning with a fresh consumer.

    Done when everything Kafka holds is read: every topic exists and each of its partitions
    has been read up to its high watermark (and, if ``expected`` is given, at least that many
    records are in; then ``linger`` seconds more, to catch late extras, if given). Without
    ``watermarks`` (or for a topic that never appears): once ``expected`` records are in, or,
    with ``expected=None``, once ``idle`` seconds pass with nothing new. In any case after
    ``timeout`` seconds, returning what it has: the caller asserts. Records come in arrival
    order, which is offset order within each partition.
    """
    start = time.monotonic()
    deadline = start + timeout
    records: list[ConsumedRecord] = []
    pending = list(dict.fromkeys(topics))
    assigned: set[tuple[str, int]] = set()
    at_end: set[tuple[str, int]] = set()  # partitions read up to their high watermark
    c = _consumer(bootstrap, **({"enable.partition.eof": True} if watermarks else {}))
    try:
        next_metadata = 0.0
        last_new = time.monotonic()
        done_at: float | None = None
        while True:
            now = time.monotonic()
            if pending and now >= next_metadata:
                pending, new = _assign_existing(c, pending, min(2.0, max(0.1, deadline - now)))
                assigned |= new
                next_metadata = time.monotonic() + 0.25
                now = time.monotonic()
            caught_up = watermarks and not pending and assigned <= at_end
            enough = len(records) >= expected if expected is not None else caught_up
            if done_at is None and enough and (caught_up or not watermarks):
                done_at = now + linger
            if done_at is not None and now >= done_at:
                break
            if expected is None and now - last_new >= idle and not (watermarks and not pending):
                break  # a topic that does not exist (yet): nothing to wait for
            if now >= deadline:
                break
            wait = min(0.1, deadline - now)
            if done_at is not None:
                wait = min(wait, max(0.0, done_at - now))
            msg = c.poll(max(0.0, wait))
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.add((msg.topic() or "", msg.partition() or 0))
                    continue
                if err.fatal():
                    raise KafkaException(err)
                continue  # transient unknown topic, transport errors: retry
            ts_type, ts = msg.timestamp()
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            at_end.discard((topic, partition))
            key, value = msg.key(), msg.value()
            raw_headers = msg.headers() or []
            assert isinstance(raw_headers, list)  # a consumed message has a list
            records.append(
                ConsumedRecord(
                    topic=topic,
                    partition=partition,
                    offset=offset,
                    key=key.encode() if isinstance(key, str) else key,
                    value=value.encode() if isinstance(value, str) else value,
                    headers=[(k, v.encode() if isinstance(v, str) else v) for k, v in raw_headers],
                    timestamp_ms=ts,
                    timestamp_type=ts_type,
                )
            )
            last_new = time.monotonic()
    finally:
        c.close()
    return records


def _assign_existing(
    c: Consumer, pending: list[str], timeout: float
) -> tuple[list[str], set[tuple[str, int]]]:
    """Assign every partition of the pending topics that exist now; return the topics still
    missing and the partitions assigned."""
    try:
        md = c.list_topics(timeout=timeout)
    except KafkaException:
        return pending, set()
    still: list[str] = []
    new: list[TopicPartition] = []
    for name in pending:
        t = md.topics.get(name)
        if t is None or t.error is not None or not t.partitions:
            still.append(name)
            continue
        new += [TopicPartition(name, p, OFFSET_BEGINNING) for p in sorted(t.partitions)]
    if new:
        c.incremental_assign(new)
    return still, {(tp.topic, tp.partition) for tp in new}


def high_watermarks(bootstrap: str, topic: str, timeout: float = 10.0) -> dict[int, int]:
    """How many offsets each partition of ``topic`` holds (its high watermark)."""
    c = _consumer(bootstrap)
    try:
        md = c.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None:
            return {}
        return {
            p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
            for p in sorted(md.partitions)
        }
    finally:
        c.close()


def count_records(bootstrap: str, topic: str) -> int:
    """Records ``topic`` holds, by its high watermarks (offsets from 0, nothing deleted and no
    transaction markers: what the relay's idempotent producer writes)."""
    return sum(high_watermarks(bootstrap, topic).values())


def by_partition(records: list[ConsumedRecord]) -> dict[tuple[str, int], list[ConsumedRecord]]:
    """Records grouped by (topic, partition), each list in offset order."""
    out: dict[tuple[str, int], list[ConsumedRecord]] = defaultdict(list)
    for r in records:
        out[(r.topic, r.partition)].append(r)
    for lst in out.values():
        lst.sort(key=lambda r: r.offset)
    return dict(out)
