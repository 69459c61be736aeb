"""Commit-to-visible latency, as a consumer sees it: a read_committed consumer in a thread of
the bench notes when each event (by the ``seq`` of its payload) reaches it.

For exactly-once delivery the relay's own acknowledgements say nothing about visibility: a
record is visible to read_committed consumers only once its Kafka transaction commits. So this
measures what a downstream service waits for: COMMIT in PostgreSQL returned → record consumed.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition


class VisibleLog:
    """Consumes ``topic`` from the beginning until stopped; ``seen`` maps seq → wall time."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.seen: dict[int, float] = {}
        self._bootstrap = bootstrap
        self._topic = topic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-visible", daemon=True)

    def __enter__(self) -> VisibleLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def wait_for(self, seqs: set[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not seqs <= self.seen.keys():
            if time.monotonic() > deadline:
                missing = len(seqs - self.seen.keys())
                raise TimeoutError(f"{missing} events never became visible")
            time.sleep(0.05)

    def _run(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self._bootstrap,
                "group.id": f"bench-visible-{uuid.uuid4().hex}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 5,
                "fetch.min.bytes": 1,
                "allow.auto.create.topics": False,
                "log_level": 0,
            }
        )
        try:
            assigned = False
            while not self._stop.is_set():
                if not assigned:
                    metadata = consumer.list_topics(timeout=1.0)
                    described = metadata.topics.get(self._topic)
                    if described is None or described.error is not None:
                        time.sleep(0.05)
                        continue
                    consumer.assign(
                        [
                            TopicPartition(self._topic, p, OFFSET_BEGINNING)
                            for p in described.partitions
                        ]
                    )
                    assigned = True
                msg = consumer.poll(0.1)
                if msg is None or msg.error() is not None:
                    continue
                now = time.time()
                value = msg.value()
                if isinstance(value, bytes):
                    self.seen.setdefault(json.loads(value)["seq"], now)
        finally:
            consumer.close()
