"""The backlog: what the services would have written to the outbox, made server-side."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

AGGREGATE_TYPE = "order"
EVENT_TYPE = "OrderPlaced"
# jsonb prints {"pad": "<pad>", "seq": <n>}: 20 bytes plus the digits of n around the pad.
_PAYLOAD_OVERHEAD = 26


@dataclass(frozen=True)
class Workload:
    events: int = 500_000
    payload_bytes: int = 300
    txn_size: int = 10
    aggregates: int = 1_000

    @property
    def pad(self) -> int:
        return max(0, self.payload_bytes - _PAYLOAD_OVERHEAD)

    @property
    def transactions(self) -> int:
        return -(-self.events // self.txn_size)


def payload_sql(pad: int) -> str:
    """SQL of the payload of event ``n`` (ints only: safe to inline)."""
    return f"jsonb_build_object('seq', n, 'pad', repeat('x', {int(pad)}))"


def fill_outbox(
    conn: psycopg.Connection[tuple[object, ...]],
    table: str,
    *,
    first: int,
    count: int,
    txn_size: int,
    aggregates: int,
    pad: int,
) -> None:
    """Insert events ``first .. first+count-1`` in transactions of ``txn_size``, looping inside
    the server (a DO block that commits) so the client round trips do not dominate."""
    server_loop(
        conn,
        f"INSERT INTO {table} (id, aggregate_type, aggregate_id, event_type, payload) "
        f"SELECT gen_random_uuid(), '{AGGREGATE_TYPE}', 'a-' || mod(n, {aggregates}), "
        f"'{EVENT_TYPE}', {payload_sql(pad)}",
        first=first,
        count=count,
        txn_size=txn_size,
    )


def server_loop(
    conn: psycopg.Connection[Any], statement: str, *, first: int, count: int, txn_size: int
) -> None:
    """Run ``statement ... FROM generate_series(...) AS n`` for events ``first ..
    first+count-1``, a transaction of ``txn_size`` each, in one DO block that commits."""
    last = first + count
    conn.execute(
        f"""
        DO $$
        DECLARE lo bigint;
        BEGIN
          FOR lo IN {first}..{last - 1} BY {txn_size} LOOP
            {statement}
            FROM generate_series(lo, least(lo + {txn_size}, {last}) - 1) AS n;
            COMMIT;
          END LOOP;
        END $$
        """
    )


def insert_one_transaction(
    conn: psycopg.Connection[tuple[object, ...]],
    table: str,
    *,
    count: int,
    aggregates: int,
    pad: int,
) -> None:
    """``count`` events in a single transaction."""
    conn.execute(
        f"INSERT INTO {table} (id, aggregate_type, aggregate_id, event_type, payload) "
        f"SELECT gen_random_uuid(), '{AGGREGATE_TYPE}', 'a-' || mod(n, {aggregates}), "
        f"'{EVENT_TYPE}', {payload_sql(pad)} FROM generate_series(0, {count - 1}) AS n"
    )


POLLING_TABLE = "polling_outbox"


def create_polling_table(conn: psycopg.Connection[tuple[object, ...]], *, copy_limit: int) -> None:
    """The polling relay's outbox: the same rows plus an ordering position and published_at,
    with the partial index the articles recommend; filled from the first ``copy_limit`` events
    of the relay's backlog (0: empty)."""
    conn.execute(f"DROP TABLE IF EXISTS {POLLING_TABLE}")
    conn.execute(
        f"""CREATE TABLE {POLLING_TABLE} (
            position       bigserial   PRIMARY KEY,
            id             uuid        NOT NULL UNIQUE,
            aggregate_type text        NOT NULL,
            aggregate_id   text        NOT NULL,
            event_type     text        NOT NULL,
            payload        jsonb       NOT NULL,
            headers        jsonb,
            created_at     timestamptz NOT NULL DEFAULT now(),
            published_at   timestamptz
        )"""
    )
    if copy_limit:
        conn.execute(
            f"INSERT INTO {POLLING_TABLE} "
            "(id, aggregate_type, aggregate_id, event_type, payload, headers, created_at) "
            "SELECT id, aggregate_type, aggregate_id, event_type, payload, headers, created_at "
            "FROM outbox WHERE (payload->>'seq')::bigint < %s ORDER BY (payload->>'seq')::bigint",
            (copy_limit,),
        )
    conn.execute(
        f"CREATE INDEX {POLLING_TABLE}_unpublished ON {POLLING_TABLE} (position) "
        "WHERE published_at IS NULL"
    )
    conn.execute(f"VACUUM ANALYZE {POLLING_TABLE}")
