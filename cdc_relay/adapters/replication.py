"""The walsender connection: the one module that touches ``conn.pgconn``.

PostgreSQL docs, "Streaming Replication Protocol": START_REPLICATION switches the connection to
COPY BOTH; the server sends CopyData frames (XLogData, keepalives), we send standby status
updates. psycopg 3 has no replication API, so this drives libpq through psycopg's thin wrapper,
non-blocking, waiting on the socket with select.
"""

from __future__ import annotations

import json
import logging
import re
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NoReturn

import psycopg
from psycopg import pq

from cdc_relay.adapters import native_acks
from cdc_relay.adapters.database import describe_connect_error, with_tcp_keepalives
from cdc_relay.core.copydata import encode_standby_status, pg_time_us
from cdc_relay.core.lsn import Lsn, format_lsn, parse_lsn
from cdc_relay.errors import ReplicationError, SlotInUse, SlotInvalidated

log = logging.getLogger(__name__)

# Output functions run in the walsender with the session's settings: pin the ones that shape
# the text we map (timestamps, bytea), so the relay never depends on server defaults.
_SESSION_OPTIONS: Final = "-c DateStyle=ISO,MDY -c TimeZone=UTC -c bytea_output=hex"

SQLSTATE_OBJECT_IN_USE = "55006"
SQLSTATE_PREREQUISITE_STATE = "55000"
# 18.6 reports a skipped publication as 55000; 42704 (undefined_object) is its natural code.
_SKIPPED_PUBLICATION_SQLSTATES = frozenset({SQLSTATE_PREREQUISITE_STATE, "42704"})


@dataclass(frozen=True, slots=True)
class SystemIdentity:
    """IDENTIFY_SYSTEM's answer: which cluster (its system identifier, the same on a primary and
    its physical standbys), on which timeline, and its WAL flush position."""

    system_id: str
    timeline: int
    xlogpos: Lsn
    dbname: str | None


@dataclass(frozen=True, slots=True)
class TimelineSwitch:
    """One line of a timeline history file: ``timeline`` ended at ``switchpoint``, where its
    child timeline branched off."""

    timeline: int
    switchpoint: Lsn


def parse_timeline_history(content: str) -> list[TimelineSwitch]:
    """The lines of a timeline history file (``<parent tli> <switchpoint> <reason>``, tab
    separated, oldest first; comments and blank lines ignored), as TIMELINE_HISTORY sends it."""
    switches = []
    for line in content.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2 or not fields[0].isdigit():
            raise ReplicationError(f"unexpected line in a timeline history file: {line!r}")
        try:
            switchpoint = parse_lsn(fields[1])
        except ValueError as exc:
            raise ReplicationError(f"unexpected line in a timeline history file: {line!r}") from exc
        switches.append(TimelineSwitch(int(fields[0]), switchpoint))
    return switches


class ReplicationStream:
    """One START_REPLICATION session on a logical slot."""

    def __init__(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        self._conn = conn
        self._pg = conn.pgconn
        self._fileno = self._pg.socket
        # PostgreSQL 18's pgoutput no longer fails when a publication is missing at a point of
        # the WAL: it warns ('skipped loading publication "p"', SQLSTATE 55000 on 18.6) and
        # sends the changes of none of its tables, so the relay would confirm past rows it never
        # saw. libpq hands the warning to the notice handler, in stream order, while it parses
        # the frames that follow it; read() stops before returning any of them. Any such
        # warning stops the session: a needless reconnect is cheap, a skipped row is not.
        self._skipped_publication: str | None = None
        conn.add_notice_handler(self._on_notice)
        # Frames read in C where the extension is built (native_acks.copy_reader): the same
        # answers as _read_in_python, without a Python object per frame but the frame.
        self._reader = native_acks.copy_reader(self._pg, self._ended)
        self.read: Callable[[], memoryview | bytes | None] = (
            self._read_in_python if self._reader is None else self._reader.read
        )

    def _on_notice(self, diag: psycopg.errors.Diagnostic) -> None:
        if (
            diag.severity_nonlocalized == "WARNING"
            and diag.sqlstate in _SKIPPED_PUBLICATION_SQLSTATES
            and self._skipped_publication is None
        ):
            text = (diag.message_primary or "").strip()
            if diag.message_detail:
                text += f" ({diag.message_detail.strip()})"
            self._skipped_publication = f"{text or 'a warning'} [SQLSTATE {diag.sqlstate}]"
            if self._reader is not None:
                self._reader.stop()

    @classmethod
    def connect(
        cls, database_url: str, *, application_name: str = "cdc-relay"
    ) -> ReplicationStream:
        return cls(open_replication_connection(database_url, application_name=application_name))

    def identify_system(self) -> SystemIdentity:
        """IDENTIFY_SYSTEM (PostgreSQL docs, "Streaming Replication Protocol"), before
        START_REPLICATION: the server this connection reached, as the walsender sees it."""
        res = self._command(b"IDENTIFY_SYSTEM", "IDENTIFY_SYSTEM")
        values = [res.get_value(0, i) for i in range(res.nfields)]
        if len(values) < 3 or values[0] is None or values[1] is None or values[2] is None:
            raise ReplicationError(f"IDENTIFY_SYSTEM answered {values!r}")
        dbname = values[3] if len(values) > 3 else None
        return SystemIdentity(
            system_id=bytes(values[0]).decode(),
            timeline=int(bytes(values[1])),
            xlogpos=parse_lsn(bytes(values[2]).decode()),
            dbname=bytes(dbname).decode() if dbname is not None else None,
        )

    def timeline_history(self, timeline: int) -> list[TimelineSwitch]:
        """TIMELINE_HISTORY ``timeline`` (2 or later: timeline 1 has no history): where each of
        its ancestors ended."""
        res = self._command(
            b"TIMELINE_HISTORY " + str(int(timeline)).encode(), f"TIMELINE_HISTORY {timeline}"
        )
        raw = res.get_value(0, 1) if res.nfields >= 2 else None
        if raw is None:
            raise ReplicationError(f"TIMELINE_HISTORY {timeline} sent no history file")
        return parse_timeline_history(bytes(raw).decode("utf-8", "replace"))

    def _command(self, command: bytes, what: str) -> pq.abc.PGresult:
        """A replication command that answers one row (before START_REPLICATION)."""
        try:
            res = self._pg.exec_(command)
        except psycopg.OperationalError as exc:
            raise ReplicationError(f"{what}: connection lost: {_one_line(exc)}") from exc
        if res.status != pq.ExecStatus.TUPLES_OK or res.ntuples != 1:
            raise _result_error(res, f"{what} failed", self._pg)
        return res

    def start(
        self,
        *,
        slot: str,
        publication: str,
        start_lsn: Lsn,
        proto_version: int = 1,
        messages: bool = False,
    ) -> None:
        """Issue START_REPLICATION; the server resumes from the slot's confirmed position.
        ``messages``: also stream logical decoding messages (pgoutput option, PostgreSQL 14+)."""
        # slot and publication are validated identifiers (settings), so plain interpolation
        # cannot inject anything.
        options = f"proto_version '{proto_version}', publication_names '{publication}'"
        if messages:
            options += ", messages 'true'"
        command = f"START_REPLICATION SLOT {slot} LOGICAL {format_lsn(start_lsn)} ({options})"
        pg = self._pg
        pg.send_query(command.encode())
        result = pg.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            error = _result_error(result, f"START_REPLICATION on slot {slot!r} failed", pg)
            while pg.get_result() is not None:  # drain, so the connection can query again
                pass
            if _sqlstate(result) == SQLSTATE_PREREQUISITE_STATE:
                # One SQLSTATE for many states (wal_level, wrong database, invalidated slot)
                # and message texts that change between versions: ask the slot itself.
                lost = self._invalidated(slot)
                if lost is not None:
                    raise lost from error
            raise error
        pg.nonblocking = 1

    def _invalidated(self, slot: str) -> SlotInvalidated | None:
        """SlotInvalidated if the server has invalidated ``slot``; None if not, or if that
        cannot be told. A logical replication connection runs simple queries (no parameters:
        ``slot`` is a validated identifier)."""
        try:
            res = self._pg.exec_(
                b"SELECT to_jsonb(s)::text FROM pg_replication_slots s "
                b"WHERE s.slot_name = '" + slot.encode() + b"'"
            )
        except psycopg.Error:
            return None
        if res.status != pq.ExecStatus.TUPLES_OK or res.ntuples != 1:
            return None
        raw = res.get_value(0, 0)
        if raw is None:
            return None
        view = json.loads(bytes(raw))
        if view.get("wal_status") != "lost":
            return None
        return SlotInvalidated(slot, slot_invalidation_reason(view))

    def _read_in_python(self) -> memoryview | bytes | None:
        """``read``: the next CopyData frame if one is buffered, else None (never blocks)."""
        nbytes, data = self._pg.get_copy_data(1)  # -2 raises psycopg's OperationalError
        if self._skipped_publication is not None:
            self._ended(0)
        if nbytes > 0:
            return data
        if nbytes == 0:
            return None
        self._ended(-1 if nbytes == -1 else -2)

    def _ended(self, code: int) -> NoReturn:
        """Why ``read`` has no frame to give: 0, a warning said the server skipped the
        publication; -1, the server ended the COPY; -2, the connection failed."""
        if code == 0:
            raise ReplicationError(
                f"the server skipped the publication: {self._skipped_publication}; stopping "
                "before the changes it left out"
            )
        if code == -1:
            # The server ended the COPY: the reason is in the following result.
            raise _result_error(self._pg.get_result(), "the server ended replication", self._pg)
        # As psycopg's get_copy_data raises it, whichever reads the frames.
        raise psycopg.OperationalError(f"receiving copy data failed: {self._error_message()}")

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
        if self._reader is not None:
            self._reader.detach()  # before libpq frees the connection it reads from
        try:
            self._conn.close()
        except Exception:  # closing a broken connection must never mask the original error
            log.debug("error while closing the replication connection", exc_info=True)

    def _error_message(self) -> str:
        return self._pg.get_error_message().strip() or "unknown error"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def slot_invalidation_reason(view: dict[str, object]) -> str | None:
    """Why the server invalidated a slot, from its pg_replication_slots row (as JSON); None
    when it is valid or the reason cannot be told.

    17+ says it (invalidation_reason). Before, a slot whose WAL was removed lost its
    restart_lsn (16's ``conflicting`` is true for every invalidation, so it cannot tell), and a
    recovery conflict on a 16 standby kept it.
    """
    if "invalidation_reason" in view:
        reason = view["invalidation_reason"]
        return str(reason) if reason else None
    if view.get("wal_status") == "lost" and view.get("restart_lsn") is None:
        return "wal_removed"
    return None


def system_identifier(database_url: str) -> str:
    """The cluster's system identifier, from IDENTIFY_SYSTEM over a short replication
    connection (a role with REPLICATION may ask; pg_control_system() needs more)."""
    stream = ReplicationStream.connect(database_url, application_name="cdc-relay-admin")
    try:
        return stream.identify_system().system_id
    finally:
        stream.close()


def open_replication_connection(
    database_url: str, *, application_name: str = "cdc-relay"
) -> psycopg.Connection[tuple[object, ...]]:
    """A logical replication connection (``replication=database``), with TCP keepalives unless
    the URL sets its own."""
    try:
        return psycopg.connect(
            with_tcp_keepalives(database_url),
            autocommit=True,
            replication="database",
            application_name=application_name,
            client_encoding="UTF8",
            options=_SESSION_OPTIONS,
            connect_timeout=10,
        )
    except psycopg.Error as exc:
        raise ReplicationError(
            f"cannot open the replication connection: {describe_connect_error(exc)}"
        ) from exc


def alter_slot_failover(database_url: str, slot: str, *, failover: bool) -> None:
    """``ALTER_REPLICATION_SLOT slot (FAILOVER …)`` (PostgreSQL 17+; a replication command, so
    over a replication connection). The slot must not be in use."""
    conn = open_replication_connection(database_url, application_name="cdc-relay-admin")
    try:
        value = b"true" if failover else b"false"
        res = conn.pgconn.exec_(
            b"ALTER_REPLICATION_SLOT " + slot.encode() + b" (FAILOVER " + value + b")"
        )
        if res.status != pq.ExecStatus.COMMAND_OK:
            raise _result_error(
                res, f"cannot change failover of replication slot {slot}", conn.pgconn
            )
    finally:
        conn.close()


def _sqlstate(result: pq.abc.PGresult | None) -> str:
    raw = result.error_field(pq.DiagnosticField.SQLSTATE) if result is not None else None
    return raw.decode() if raw else ""


def _field(result: pq.abc.PGresult, field: pq.DiagnosticField) -> str:
    raw = result.error_field(field)
    return raw.decode("utf-8", "replace").strip() if raw else ""


# Invalid-slot texts: "can no longer get changes from replication slot" (15-17), "can no longer
# access replication slot" (18); the detail names the cause on 18 ('invalidated due to
# "idle_timeout"') and describes it before.
_LOST_TEXTS = ("can no longer get changes", "can no longer access replication slot")
_DETAIL_REASONS = (
    (re.compile(r'invalidated due to "([a-z_]+)"'), None),
    (re.compile(r"exceeded the maximum reserved size"), "wal_removed"),
)


def _result_error(
    result: pq.abc.PGresult | None, context: str, pgconn: pq.abc.PGconn | None = None
) -> ReplicationError:
    """The error a failed or ended replication command stands for, with what is known: the
    server's message, its detail and SQLSTATE, or libpq's own message for a lost connection."""
    if result is None:
        why = _libpq_message(pgconn) or "no result from the server"
        return ReplicationError(f"{context}: connection closed: {why}")
    sqlstate = _sqlstate(result)
    message = _field(result, pq.DiagnosticField.MESSAGE_PRIMARY)
    detail = _field(result, pq.DiagnosticField.MESSAGE_DETAIL)
    if sqlstate == SQLSTATE_OBJECT_IN_USE:
        return SlotInUse(message or None)
    if sqlstate == SQLSTATE_PREREQUISITE_STATE and any(t in message for t in _LOST_TEXTS):
        slot = re.search(r'replication slot "([^"]+)"', message)
        reason = None
        for pattern, fixed in _DETAIL_REASONS:
            found = pattern.search(detail)
            if found:
                reason = fixed or found.group(1)
                break
        return SlotInvalidated(
            slot.group(1) if slot else "?", reason, detail=f"{message}. {detail}".strip(". ")
        )
    if not message:
        # No error fields: a normal end of the COPY (COMMAND_OK), or an error libpq made up
        # itself (the connection broke), whose text is the result's or the connection's.
        raw = result.error_message
        message = " ".join(raw.decode("utf-8", "replace").split()) if raw else ""
        message = message or _libpq_message(pgconn)
        if not message:
            message = f"no error reported (result status {pq.ExecStatus(result.status).name})"
    text = f"{context}: {message}"
    if detail:
        text += f" ({detail})"
    if sqlstate:
        text += f" [SQLSTATE {sqlstate}]"
    return ReplicationError(text)


def _libpq_message(pgconn: pq.abc.PGconn | None) -> str:
    if pgconn is None:
        return ""
    raw = pgconn.error_message
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")
    return " ".join(text.split())
