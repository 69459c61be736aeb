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
    # the three-broker cluster (tests/faults/test_cluster.py)
    cluster_write_rate: int  # events/s of the writers while brokers fail
    leader_kills: int  # SIGKILLs of the busiest partition's leader, each restarted
    all_down_seconds: float  # all three brokers dead
    two_down_seconds: float  # two brokers dead: min.insync.replicas cannot be met
    two_down_backlog: int  # events written while the two are down
    # a PostgreSQL primary failover (tests/faults/test_failover.py)
    failover_events: int
    failover_writers: int
    failover_seconds: float  # writers pace themselves to take about this long
    failover_lag_seconds: float  # asynchronous: the standby's link stalled before the kill
    failover_promote_after: float  # seconds from the kill to the promotion (a manager's delay)


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
        cluster_write_rate=200,
        leader_kills=3,
        all_down_seconds=8,
        two_down_seconds=10,
        two_down_backlog=20_000,
        failover_events=3_000,
        failover_writers=4,
        failover_seconds=15,
        failover_lag_seconds=2,
        failover_promote_after=3,
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
        cluster_write_rate=500,
        leader_kills=6,
        all_down_seconds=20,
        two_down_seconds=30,
        two_down_backlog=200_000,
        failover_events=30_000,
        failover_writers=8,
        failover_seconds=60,
        failover_lag_seconds=5,
        failover_promote_after=10,
    ),
}


ALO, EOS = "at-least-once", "exactly-once"


def delivery_modes() -> tuple[str, ...]:
    """The delivery modes the mode-dependent scenarios run in: both at full size; at CI size
    at-least-once only, exactly-once having its smaller versions in the integration tests
    (tests/integration/test_exactly_once.py), within the CI budget."""
    return (ALO, EOS) if scale_name() == "full" else (ALO,)


def named(scenario: str, delivery: str) -> str:
    """The row name of a scenario in one mode (docs/reliability.md pivots them)."""
    return f"{scenario} [{delivery}]"


def scale_name() -> str:
    name = os.environ.get(SCALE_ENV, "ci").strip().lower() or "ci"
    if name not in SIZES:
        raise ValueError(f"{SCALE_ENV} must be one of {sorted(SIZES)}, not {name!r}")
    return name


def sizes() -> Sizes:
    return SIZES[scale_name()]
