"""The core's copy of librdkafka's error codes agrees with confluent-kafka's, and the verdicts
table says what each failure means."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from cdc_relay.core import verdicts
from cdc_relay.core.verdicts import Verdict, judge

NAMES = {
    "PURGE_QUEUE": "_PURGE_QUEUE",
    "PURGE_INFLIGHT": "_PURGE_INFLIGHT",
    "MSG_TIMED_OUT": "_MSG_TIMED_OUT",
    "INVALID_DIFFERENT_RECORD": "_INVALID_DIFFERENT_RECORD",
    "FATAL": "_FATAL",
    "GAPLESS_GUARANTEE": "_GAPLESS_GUARANTEE",
    "UNKNOWN_TOPIC": "_UNKNOWN_TOPIC",
    "UNKNOWN_PARTITION": "_UNKNOWN_PARTITION",
    "FENCED": "_FENCED",
    "TRANSPORT": "_TRANSPORT",
    "ALL_BROKERS_DOWN": "_ALL_BROKERS_DOWN",
    "INVALID_ARG": "_INVALID_ARG",
}


@pytest.mark.parametrize(
    "name", [n for n in dir(verdicts) if n.isupper() and isinstance(getattr(verdicts, n), int)]
)
def test_every_code_is_librdkafkas(name):
    assert getattr(verdicts, name) == getattr(KafkaError, NAMES.get(name, name))


@pytest.mark.parametrize(
    ("code", "alone", "verdict"),
    [
        (verdicts.PURGE_QUEUE, False, Verdict.IGNORE),
        (verdicts.PURGE_INFLIGHT, True, Verdict.IGNORE),
        (verdicts.MSG_SIZE_TOO_LARGE, True, Verdict.REFUSED),
        (verdicts.MSG_SIZE_TOO_LARGE, False, Verdict.ISOLATE),
        (verdicts.TOPIC_EXCEPTION, True, Verdict.REFUSED),
        (verdicts.INVALID_RECORD, False, Verdict.ISOLATE),
        (verdicts.INVALID_DIFFERENT_RECORD, False, Verdict.ISOLATE),
        (verdicts.INVALID_DIFFERENT_RECORD, True, Verdict.RESET),
        (verdicts.NOT_ENOUGH_REPLICAS, True, Verdict.RESET),
        (verdicts.MSG_TIMED_OUT, False, Verdict.RESET),
        (verdicts.FATAL, False, Verdict.RESET),
        (verdicts.UNKNOWN_TOPIC_OR_PART, True, Verdict.RESET),
    ],
)
def test_verdicts(code, alone, verdict):
    assert judge(code, alone=alone) is verdict
