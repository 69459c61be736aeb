"""Ordinary (non-replication) database access: one connection or a small psycopg-pool, and
readable errors.

Every connection, here and in replication.py, goes through libpq's multi-host support: a URL
like ``postgresql://u@primary,standby/app?target_session_attrs=read-write`` is tried host by
host (psycopg makes one attempt per host) and only a server that takes writes is kept, so after
a failover each new connection finds the promoted primary by itself.
"""

from __future__ import annotations

import re
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool
from psycopg_pool.base import AttemptWithBackoff

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


# psycopg's text for a multi-host conninfo of which no host would do, one line per attempt:
# "- host: 'h', port: 'p', hostaddr: 'a': connection failed: connection to server at ... failed:
# <why>".
_MULTIPLE_ATTEMPTS = "Multiple connection attempts failed"
_ATTEMPT = re.compile(r"^- host: '([^']*)', port: '([^']*)'[^:]*?: (.*)$")
_SEVERITY = re.compile(r"^(FATAL|ERROR):\s*")


def _attempts_summary(text: str) -> str | None:
    """One line out of psycopg's report of several failed attempts (a multi-host URL): each
    host with what it said; None when ``text`` is not such a report."""
    if _MULTIPLE_ATTEMPTS not in text:
        return None
    parts = []
    for line in text.splitlines():
        found = _ATTEMPT.match(line.strip())
        if found is None:
            continue
        host, port, why = found.groups()
        why = _SEVERITY.sub("", why.rsplit(" failed: ", 1)[-1].strip())
        parts.append(f"{host}:{port}: {why}")
    if not parts:
        return None
    return "no host would do (" + "; ".join(parts) + ")"


def describe_connect_error(exc: BaseException) -> str:
    """One line out of a failed connection: every host of a multi-host URL with what it said
    ("session is read-only" for a standby under target_session_attrs=read-write, "Connection
    refused" for a server that is down), else libpq's first line."""
    text = str(exc).strip()
    summary = _attempts_summary(text)
    if summary is not None:
        return summary
    return text.splitlines()[0] if text else type(exc).__name__


def describe_psycopg_error(exc: BaseException) -> str:
    """One line out of a psycopg error: libpq's messages span lines and repeat the host."""
    summary = _attempts_summary(str(exc))
    if summary is not None:
        return summary
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    for line in lines:
        if "FATAL:" in line or "ERROR:" in line:
            return re.sub(r"^.*?(FATAL|ERROR):\s*", "", line)
    # libpq's first line says what happened ("server closed the connection unexpectedly",
    # "... failed: Connection refused"); the lines after it are hints ("This probably means the
    # server terminated abnormally / before or while processing the request.").
    return lines[0]


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


class _PromptReconnection(AttemptWithBackoff):
    """psycopg_pool's schedule for replacing a lost connection (1 s, 2 s, 4 s, ... for up to
    ``reconnect_timeout``), with the delay capped at MAX_DELAY."""

    MAX_DELAY = 1.0

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, self.MAX_DELAY)


class _Pool(ConnectionPool):
    """A ConnectionPool for a database that may fail over.

    - A connection that comes back broken means the server went away (a crash, a failover):
      the other idle connections are checked at once and replaced, rather than each costing
      the relay a failed session on its way to the new primary.
    - While the database is unreachable the pool tries again every second. The relay takes a
      connection from the pool before each session, and the pool waits (up to its timeout) for
      its own reconnection attempts; uncapped, those double (1 s, 2 s, 4 s, ...), so after a
      promotion that took 15 s the next attempt would come 16 s later. A refused or read-only
      attempt costs the server next to nothing.
    """

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        broken = conn.broken
        super().putconn(conn)
        if broken:
            self.check()

    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        super()._add_connection(
            attempt or _PromptReconnection(timeout=self.reconnect_timeout), growing
        )


def open_pool(database_url: str, *, max_size: int = 2) -> ConnectionPool:
    """A small autocommit pool (reconnecting every second while the database is away); the
    caller closes it."""
    return _Pool(
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
