"""Measurements the fault scenarios share: delivered ids, lost events, duplicates."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from tests.integration.relay_process import query
from tests.kafka_helpers import ConsumedRecord, consume_all


def outbox_ids(url: str, table: str = "outbox") -> set[str]:
    return {str(row[0]) for row in query(url, f"SELECT id FROM {table}")}


def consume_ids(
    bootstrap: str, topics: list[str], expected: int, timeout: float = 120
) -> list[ConsumedRecord]:
    """Everything on ``topics``: waits for ``expected`` records, then a little more for
    duplicates."""
    return consume_all(bootstrap, topics, expected=expected, timeout=timeout, linger=2)


def delivery_figures(records: list[ConsumedRecord], inserted: set[str]) -> tuple[int, int]:
    """(lost, duplicates) of the inserted ids among the consumed records (by header ``id``)."""
    counts = Counter((r.header("id") or b"").decode() for r in records)
    lost = len(inserted - set(counts))
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    return lost, duplicates


@dataclass(frozen=True)
class Delivered:
    """What reached Kafka of the outbox rows, measured from outside the relay."""

    inserted: set[str]
    records: list[ConsumedRecord]
    lost: int
    duplicates: int

    @property
    def figures(self) -> dict[str, int]:
        """The columns every scenario reports (results.record)."""
        return {"events": len(self.inserted), "lost": self.lost, "duplicates": self.duplicates}

    def seqs(self) -> set[int]:
        """The ``seq`` of every payload consumed (insert_events numbers them)."""
        return {json.loads(r.value or b"")["seq"] for r in self.records}


def measure_delivery(url: str, bootstrap: str, topic: str, timeout: float = 120) -> Delivered:
    """Every outbox id against everything consumed from ``topic``."""
    inserted = outbox_ids(url)
    records = consume_ids(bootstrap, [topic], expected=len(inserted), timeout=timeout)
    lost, duplicates = delivery_figures(records, inserted)
    return Delivered(inserted, records, lost, duplicates)
