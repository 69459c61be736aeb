"""The lag sampler: a failing sample is logged once and counted, never raised; the next good
sample clears it and fills the stats."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import psycopg

from cdc_relay.adapters.lag import LagSampler
from cdc_relay.core.stats import RelayStats
from cdc_relay.ops.admin import SlotInfo


class FakePool:
    def __init__(self) -> None:
        self.fail = True

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Any]:
        if self.fail:
            raise psycopg.OperationalError("connection refused")
        yield object()


def test_failures_are_logged_once_and_counted_then_recovery_fills_the_stats(monkeypatch, caplog):
    slot = SlotInfo("s1", "pgoutput", "app", True, 1, "0/10", "0/8", "reserved", 4096)
    monkeypatch.setattr("cdc_relay.adapters.lag.admin.fetch_slot", lambda conn, name: slot)
    stats = RelayStats()
    pool = FakePool()
    sampler = LagSampler(pool, "s1", stats, interval=5.0)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="cdc_relay.adapters.lag"):
        for _ in range(3):
            sampler.sample()
        assert stats.lag_sample_errors == 3
        assert stats.slot_lag_bytes is None
        pool.fail = False
        sampler.sample()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "connection refused" in warnings[0].getMessage()
    assert getattr(warnings[0], "slot", None) == "s1"
    assert any("recovered" in r.getMessage() for r in caplog.records)
    assert (stats.slot_lag_bytes, stats.slot_wal_status) == (4096, "reserved")
    assert stats.slot_sampled_unix > 0


def test_the_thread_samples_at_once_and_stops():
    stats = RelayStats()
    pool = FakePool()
    probes: list[int] = []
    sampler = LagSampler(
        pool,  # type: ignore[arg-type]
        "s1",
        stats,
        interval=60.0,
        probe_broker=lambda: probes.append(1),
    )
    sampler.start()
    sampler.stop()
    assert stats.lag_sample_errors == 1 and probes == [1]
