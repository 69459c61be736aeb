"""The walsender connection: the one module that touches ``conn.pgconn``.

PostgreSQL docs, "Streaming Replication Protocol": START_REPLICATION switches the connection to
COPY BOTH; the server sends CopyData frames (XLogData, keepalives), we send standby status
updates. psycopg 3 has no replication API, so this drives libpq through psycopg's thin wrapper,
non-blocking, waiting on the socket with select.
"""

from __future__ import annotations

import logging
import select
import time
from typing import Final

import psycopg
from psycopg import pq

from cdc_relay.core.copydata import encode_standby_status, pg_time_us
from cdc_relay.core.lsn import Lsn, format_lsn
from cdc_relay.errors import ReplicationError, SlotInUse, SlotLost

log = logging.getLogger(__name__)

# Output functions run in the walsender with the session's settings: pin the ones that shape
# the text we map (timestamps, bytea), so the relay never depends on server defaults.
_SESSION_OPTIONS: Final = "-c DateStyle=ISO,MDY -c TimeZone=UTC -c bytea_output=hex"

SQLSTATE_OBJECT_IN_USE = "55006"
SQLSTATE_PREREQUISITE_STATE = "55000"


class ReplicationStream:
    """One START_REPLICATION session on a logical slot."""

    def __init__(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        self._conn = conn
        self._pg = conn.pgconn
        self._fileno = self._pg.socket

    @classmethod
    def connect(
        cls, database_url: str, *, application_name: str = "cdc-relay"
    ) -> ReplicationStream:
        try:
            conn = psycopg.connect(
                database_url,
                autocommit=True,
                replication="database",
                application_name=application_name,
                client_encoding="UTF8",
                options=_SESSION_OPTIONS,
                connect_timeout=10,
            )
        except psycopg.Error as exc:
            raise ReplicationError(
                f"cannot open the replication connection: {_one_line(exc)}"
            ) from exc
        return cls(conn)

    def start(self, *, slot: str, publication: str, start_lsn: Lsn, proto_version: int = 1) -> None:
        """Issue START_REPLICATION; the server resumes from the slot's confirmed position."""
        # slot and publication are validated identifiers (settings), so plain interpolation
        # cannot inject anything.
        command = (
            f"START_REPLICATION SLOT {slot} LOGICAL {format_lsn(start_lsn)} "
            f"(proto_version '{proto_version}', publication_names '{publication}')"
        )
        pg = self._pg
        pg.send_query(command.encode())
        result = pg.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            raise _result_error(result, f"START_REPLICATION on slot {slot!r} failed")
        pg.nonblocking = 1

    def read(self) -> memoryview | bytes | None:
        """The next CopyData frame if one is buffered, else None (never blocks)."""
        nbytes, data = self._pg.get_copy_data(1)
        if nbytes > 0:
            return data
        if nbytes == 0:
            return None
        if nbytes == -1:
            # The server ended the COPY: the reason is in the following result.
            raise _result_error(self._pg.get_result(), "the server ended replication")
        raise ReplicationError(f"replication connection failed: {self._error_message()}")

    def wait(self, timeout: float) -> None:
        """Wait until the socket has data (or timeout), then pull it into libpq's buffer."""
        try:
            readable, _, _ = select.select([self._fileno], [], [], timeout)
        except (OSError, ValueError) as exc:
            raise ReplicationError(f"replication socket failed: {exc}") from exc
        if readable:
            self.consume()

    def consume(self) -> None:
        try:
            self._pg.consume_input()
        except psycopg.OperationalError as exc:
            raise ReplicationError(f"replication connection lost: {_one_line(exc)}") from exc

    def send_status(self, *, flushed: Lsn, reply_requested: bool = False) -> None:
        """Standby status update; for a logical slot ``flushed`` becomes confirmed_flush_lsn."""
        message = encode_standby_status(
            written=flushed,
            flushed=flushed,
            applied=flushed,
            now_us=pg_time_us(time.time()),
            reply_requested=reply_requested,
        )
        pg = self._pg
        try:
            if pg.put_copy_data(message) != 1:
                raise ReplicationError(f"cannot send a status update: {self._error_message()}")
            # Non-blocking flush: a status update is tiny, so a socket that cannot take it
            # right away is given a short, bounded wait rather than spinning.
            deadline = time.monotonic() + 5.0
            while pg.flush() == 1:
                if time.monotonic() > deadline:
                    raise ReplicationError("replication socket stuck while sending a status update")
                select.select([], [self._fileno], [], 0.1)
        except psycopg.OperationalError as exc:
            raise ReplicationError(f"replication connection lost: {_one_line(exc)}") from exc

    def close(self) -> None:
        try:
            self._conn.close()
        except Exception:  # closing a broken connection must never mask the original error
            log.debug("error while closing the replication connection", exc_info=True)

    def _error_message(self) -> str:
        return self._pg.get_error_message().strip() or "unknown error"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _result_error(result: pq.abc.PGresult | None, context: str) -> ReplicationError:
    if result is None:
        return ReplicationError(f"{context}: connection closed")
    raw_state = result.error_field(pq.DiagnosticField.SQLSTATE)
    sqlstate = raw_state.decode() if raw_state else ""
    raw_message = result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY)
    message = raw_message.decode("utf-8", "replace") if raw_message else "no detail"
    if sqlstate == SQLSTATE_OBJECT_IN_USE:
        return SlotInUse(message)
    if sqlstate == SQLSTATE_PREREQUISITE_STATE and "can no longer get changes" in message:
        return SlotLost(message)
    return ReplicationError(f"{context}: {message}")
