"""What a failed delivery means for the pipeline, decided from librdkafka's error code alone.

The codes are librdkafka's ``rd_kafka_resp_err_t`` values (stable ABI; confluent-kafka exposes
them as ``KafkaError.<NAME>``; tests/unit/test_verdicts.py checks every one against it), so the
core decides without importing the client.

Why "alone" matters: the broker judges whole batches. A batch larger than a topic's
``max.message.bytes`` is refused as a whole (MSG_SIZE_TOO_LARGE for every record in it), and an
invalid record makes the broker refuse its batch-mates too (``_INVALID_DIFFERENT_RECORD``,
KIP-467). Only a record that went to the broker alone can be judged by its own refusal; any
other refusal sends its transaction back to be replayed one record at a time.
"""

from __future__ import annotations

import enum
from typing import Final

# librdkafka error codes (rdkafka.h).
PURGE_QUEUE: Final = -152
PURGE_INFLIGHT: Final = -151
MSG_TIMED_OUT: Final = -192
INVALID_DIFFERENT_RECORD: Final = -138
FATAL: Final = -150
GAPLESS_GUARANTEE: Final = -148
UNKNOWN_TOPIC: Final = -188
UNKNOWN_PARTITION: Final = -190
FENCED: Final = -144
TRANSPORT: Final = -195
ALL_BROKERS_DOWN: Final = -187
INVALID_ARG: Final = -186
MSG_SIZE_TOO_LARGE: Final = 10
INVALID_MSG_SIZE: Final = 4
UNKNOWN_TOPIC_OR_PART: Final = 3
TOPIC_EXCEPTION: Final = 17
RECORD_LIST_TOO_LARGE: Final = 18
NOT_ENOUGH_REPLICAS: Final = 19
NOT_ENOUGH_REPLICAS_AFTER_APPEND: Final = 20
TOPIC_AUTHORIZATION_FAILED: Final = 29
POLICY_VIOLATION: Final = 44
INVALID_RECORD: Final = 87

# The broker refused the record's batch for good: maybe for this record, maybe for another.
_REFUSALS: Final = frozenset(
    {
        MSG_SIZE_TOO_LARGE,
        INVALID_MSG_SIZE,
        RECORD_LIST_TOO_LARGE,
        INVALID_RECORD,
        TOPIC_EXCEPTION,
        POLICY_VIOLATION,
    }
)
SIZE_ERRORS: Final = frozenset({MSG_SIZE_TOO_LARGE, INVALID_MSG_SIZE, RECORD_LIST_TOO_LARGE})
# Errors that say "the topic is missing": retried (after a reset), and logged as such.
MISSING_TOPIC: Final = frozenset({UNKNOWN_TOPIC, UNKNOWN_TOPIC_OR_PART, UNKNOWN_PARTITION})
_PURGED: Final = frozenset({PURGE_QUEUE, PURGE_INFLIGHT})


class Verdict(enum.Enum):
    IGNORE = "ignore"  # the echo of our own purge during a reset
    REFUSED = "record"  # this record, for good: dead-letter it, or halt
    ISOLATE = "batch"  # a batch was refused: replay its transaction one record at a time
    RESET = "pipeline"  # anything else: replay from the confirmed position


def judge(code: int, *, alone: bool) -> Verdict:
    """The verdict on one failed delivery; ``alone``: the record was the only one in flight."""
    if code in _PURGED:
        return Verdict.IGNORE
    if code == INVALID_DIFFERENT_RECORD:
        # Innocent by definition: never dead-lettered. Alone it cannot happen; replay then.
        return Verdict.RESET if alone else Verdict.ISOLATE
    if code in _REFUSALS:
        return Verdict.REFUSED if alone else Verdict.ISOLATE
    return Verdict.RESET


def is_size_error(code: int) -> bool:
    """Kafka refused the record for its size: resending the value anywhere is pointless."""
    return code in SIZE_ERRORS
