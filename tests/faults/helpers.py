"""Measurements the fault scenarios share: CPU time of a process, delivered ids, duplicates."""

from __future__ import annotations

from collections import Counter

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
