"""FailureLog: one line when a failure starts or changes, one when it clears."""

from __future__ import annotations

import logging

import pytest

from cdc_relay.runtime.relay import FailureLog


def test_an_outage_worded_differently_while_it_lasts_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by CI: librdkafka words one outage as "Connection refused", then "1/1 brokers are
    down", and each rewording was logged as a new failure."""
    failures = FailureLog()
    with caplog.at_level(logging.INFO, logger="cdc_relay.runtime.relay"):
        failures.failed("Kafka is unreachable (Connection refused)", kind="unreachable")
        failures.failed("Kafka is unreachable (1/1 brokers are down)", kind="unreachable")
        failures.failed("Kafka is unreachable (Connection refused)", kind="unreachable")
        failures.failed("authentication failed", kind="refused")
        failures.recovered("Kafka is reachable")
    assert [r.getMessage() for r in caplog.records] == [
        "Kafka is unreachable (Connection refused)",
        "authentication failed",
        "recovered: Kafka is reachable",
    ]
