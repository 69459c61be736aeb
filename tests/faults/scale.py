"""Sizes of the fault scenarios: ``CDC_RELAY_FAULTS_SCALE=full`` (the issue's numbers, run by
``make test-faults``) or ``ci`` (the default: small enough for the CI budget). Both sizes run
the same code; only these numbers change."""

from __future__ import annotations

import os
from dataclasses import dataclass

SCALE_ENV = "CDC_RELAY_FAULTS_SCALE"


@dataclass(frozen=True)
class Sizes:
    crash_loop_events: int
    crash_loop_kills: int
    crash_loop_writers: int
    crash_loop_seconds: float  # writers pace themselves to take about this long
    outage_seconds: float
    slow_broker_backlog: int
    slow_broker_latency_ms: float
    pg_restart_events: int
    walsender_cuts: int
    large_txn_rows: int  # one transaction, the relay killed half-way through it


SIZES = {
    "ci": Sizes(
        crash_loop_events=10_000,
        crash_loop_kills=10,
        crash_loop_writers=4,
        crash_loop_seconds=25,
        outage_seconds=10,
        slow_broker_backlog=100_000,
        slow_broker_latency_ms=200,
        pg_restart_events=3_000,
        walsender_cuts=3,
        large_txn_rows=50_000,
    ),
    "full": Sizes(
        crash_loop_events=100_000,
        crash_loop_kills=12,
        crash_loop_writers=8,
        crash_loop_seconds=90,
        outage_seconds=30,
        slow_broker_backlog=1_000_000,
        slow_broker_latency_ms=200,
        pg_restart_events=30_000,
        walsender_cuts=10,
        large_txn_rows=1_000_000,
    ),
}


def scale_name() -> str:
    name = os.environ.get(SCALE_ENV, "ci").strip().lower() or "ci"
    if name not in SIZES:
        raise ValueError(f"{SCALE_ENV} must be one of {sorted(SIZES)}, not {name!r}")
    return name


def sizes() -> Sizes:
    return SIZES[scale_name()]
