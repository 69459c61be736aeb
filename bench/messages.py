"""(g) events written as logical decoding messages, against table rows, in `make bench`.

Relay side: the same workload written with ``cdc_relay_emit_event`` instead of outbox
inserts, drained by `cdc-relay run` from a slot at its start, beside the bare stream loop
over the same messages: the same ceiling logic as (a) and (c) for rows.

Producer side: what a service pays per event, from Python, with ``emit_event`` and with
``add_event``: commits per second of one client, and WAL bytes per event (the WAL insert
position before and after, divided by the events; commit records and full-page images
included, each measure starting right after a CHECKPOINT), for transactions of one event and
of ``txn_size``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from bench import contenders
from bench.workload import AGGREGATE_TYPE, EVENT_TYPE, Workload, payload_sql, server_loop
from cdc_relay.outbox import add_event, emit_event
from tests.integration.relay_process import lsn_int

MESSAGE_ORIGIN_SLOT = "bench_messages"


def fill_messages(
    conn: psycopg.Connection[Any],
    *,
    first: int,
    count: int,
    txn_size: int,
    aggregates: int,
    pad: int,
) -> None:
    """The events of ``fill_outbox`` (same keys, types and payloads) as messages, written by
    the SQL function `setup` installs, in transactions of ``txn_size``, looping server-side."""
    server_loop(
        conn,
        f"PERFORM cdc_relay_emit_event('{AGGREGATE_TYPE}', 'a-' || mod(n, {aggregates}), "
        f"'{EVENT_TYPE}', {payload_sql(pad)})",
        first=first,
        count=count,
        txn_size=txn_size,
    )


@dataclass(frozen=True)
class ProducerSide:
    helper: str
    per_txn: int
    transactions: int
    seconds: float
    wal_bytes: int

    @property
    def commits_per_second(self) -> float:
        return self.transactions / self.seconds

    @property
    def events_per_second(self) -> float:
        return self.transactions * self.per_txn / self.seconds

    @property
    def wal_per_event(self) -> float:
        return self.wal_bytes / (self.transactions * self.per_txn)


def _insert_lsn(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return lsn_int(str(row[0]))


def producer_side(
    url: str, helper: str, *, transactions: int, per_txn: int, pad: int
) -> ProducerSide:
    """One client committing ``transactions`` transactions of ``per_txn`` events each."""
    write: Callable[..., Any] = emit_event if helper == "emit_event" else add_event
    payload = {"pad": "x" * pad, "seq": 0}
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("CHECKPOINT")
        before = _insert_lsn(admin)
        with psycopg.connect(url) as conn:
            started = time.perf_counter()
            for n in range(transactions):
                for i in range(per_txn):
                    payload["seq"] = n * per_txn + i
                    write(
                        conn,
                        aggregate_type=AGGREGATE_TYPE,
                        aggregate_id=f"a-{n % 1000}",
                        event_type=EVENT_TYPE,
                        payload=payload,
                    )
                conn.commit()
            seconds = time.perf_counter() - started
        after = _insert_lsn(admin)
    return ProducerSide(helper, per_txn, transactions, seconds, after - before)


def producer_lines(results: list[ProducerSide]) -> list[str]:
    lines = [
        "Producer side (one Python client, `emit_event` against `add_event` into the default "
        "outbox table; WAL from the insert position, right after a CHECKPOINT):",
        "",
        "| helper | events per transaction | commits/s | events/s | WAL bytes/event |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| `{r.helper}` | {r.per_txn} | {r.commits_per_second:,.0f} | "
            f"{r.events_per_second:,.0f} | {r.wal_per_event:,.0f} |"
        )
    return lines


def stream_and_drain(
    url: str,
    admin: psycopg.Connection[Any],
    workload: Workload,
    *,
    env_for: Callable[[str, int], dict[str, str]],
    repeat: Callable[[str, Callable[[int], Any]], list[Any]],
    broker_pid: int | None,
) -> tuple[list[contenders.Timed], list[contenders.RelayRun]]:
    """The bare stream loop and the relay over the message backlog, from copies of
    MESSAGE_ORIGIN_SLOT (which sits at its start). ``env_for(slot, i)``: the relay's env."""
    end_lsns: list[int] = []

    def ceiling(i: int) -> contenders.Timed:
        slot = contenders.copy_slot(admin, MESSAGE_ORIGIN_SLOT)
        try:
            timed, seen, end_lsn = contenders.stream_ceiling(
                url, slot, workload.transactions, messages=True
            )
        finally:
            contenders.drop_slot(admin, slot)
        if seen != workload.events:
            raise RuntimeError(f"the stream had {seen} messages, not {workload.events}")
        end_lsns.append(end_lsn)
        return timed

    ceilings = repeat("(g) ceiling, stream of messages", ceiling)

    def drain(i: int) -> contenders.RelayRun:
        slot = contenders.copy_slot(admin, MESSAGE_ORIGIN_SLOT)
        try:
            return contenders.relay_drain(
                url,
                env_for(slot, i),
                slot=slot,
                end_lsn=end_lsns[0],
                expected=workload.events,
                timeout=600,
                broker_pid=broker_pid,
            )
        finally:
            contenders.drop_slot(admin, slot)

    return ceilings, repeat("(g) cdc-relay, message events", drain)
