"""Ordinary (non-replication) database access: one connection or a small psycopg-pool, and
readable errors."""

from __future__ import annotations

import re
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from cdc_relay.errors import DatabaseUnavailable

_CONNECT_TIMEOUT = 10

# libpq's TCP keepalives and tcp_user_timeout, so that a connection whose peer vanished (a
# failed-over primary, a dropped NAT entry) errors within about half a minute instead of
# hanging until the kernel's defaults (hours) give up: probes after 15 s idle, every 5 s, 3
# unanswered end it; data unacknowledged for 30 s ends it too. libpq ignores them on Unix
# sockets.
TCP_KEEPALIVES: Final = {
    "keepalives": "1",
    "keepalives_idle": "15",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}


def with_tcp_keepalives(database_url: str) -> str:
    """``database_url`` plus the keepalive parameters it does not set itself (the user's values
    win), as a key=value conninfo."""
    given = conninfo_to_dict(database_url)
    missing = {key: value for key, value in TCP_KEEPALIVES.items() if key not in given}
    return make_conninfo(database_url, **missing) if missing else database_url


def describe_psycopg_error(exc: BaseException) -> str:
    """One line out of a psycopg error: libpq's messages span lines and repeat the host."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    for line in lines:
        if "FATAL:" in line or "ERROR:" in line:
            return re.sub(r"^.*?(FATAL|ERROR):\s*", "", line)
    return lines[-1]


def connect(database_url: str) -> psycopg.Connection[tuple[Any, ...]]:
    """One autocommit connection, for the commands that need no more; a bad password or host
    is reported as such."""
    try:
        return psycopg.connect(
            with_tcp_keepalives(database_url),
            autocommit=True,
            connect_timeout=_CONNECT_TIMEOUT,
            application_name="cdc-relay-admin",
        )
    except psycopg.Error as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the database: {describe_psycopg_error(exc)}"
        ) from exc


def check_connection(database_url: str) -> None:
    """Connect once, directly, so that a bad password or host is reported as such (a pool would
    only say that it timed out)."""
    connect(database_url).close()


def open_pool(database_url: str, *, max_size: int = 2) -> ConnectionPool:
    """A small autocommit pool; the caller closes it."""
    return ConnectionPool(
        with_tcp_keepalives(database_url),
        min_size=1,
        max_size=max_size,
        timeout=_CONNECT_TIMEOUT * 3,
        kwargs={
            "autocommit": True,
            "connect_timeout": _CONNECT_TIMEOUT,
            "application_name": "cdc-relay-admin",
        },
        name="cdc-relay",
        open=True,
    )
