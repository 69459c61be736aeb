"""Decoder for pgoutput, the logical replication output plugin of PostgreSQL.

Implements the PostgreSQL documentation, "Logical Replication Message Formats", for
protocol versions 1 to 4 (PostgreSQL 14 to 17). Pure: one message's bytes in, one frozen
dataclass out, no I/O. Every malformed input raises DecodeError with the byte offset.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from types import FunctionType
from typing import ClassVar, Final, NewType, TypeAlias, final

from cdc_relay.core.lsn import Lsn
from cdc_relay.errors import DecodeError

__all__ = [
    "MAX_PROTO_VERSION",
    "MIN_PROTO_VERSION",
    "UNCHANGED",
    "Begin",
    "BeginPrepare",
    "Binary",
    "Column",
    "ColumnValue",
    "Commit",
    "CommitPrepared",
    "Decoder",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Oid",
    "Origin",
    "PgOutputMessage",
    "Prepare",
    "Relation",
    "RollbackPrepared",
    "StreamAbort",
    "StreamCommit",
    "StreamPrepare",
    "StreamStart",
    "StreamStop",
    "Truncate",
    "TupleValues",
    "Type",
    "Unchanged",
    "Update",
    "Xid",
    "decode",
]

Oid = NewType("Oid", int)
Xid = NewType("Xid", int)

MIN_PROTO_VERSION: Final = 1
MAX_PROTO_VERSION: Final = 4


def _probe() -> None:
    """Never called: its type tells whether this module runs compiled."""


# Whether this module was compiled by mypyc (cdc_relay/core/native.py), which makes its functions
# builtins. The hot path differs in a few places, each the fastest way for its implementation:
# interpreted, C calls (struct) and the slot descriptors of frozen dataclasses; compiled,
# byte arithmetic and native constructors.
_COMPILED: Final = not isinstance(_probe, FunctionType)
_setattr: Final = object.__setattr__


# --------------------------------------------------------------------------- values


@final
class Unchanged:
    """A column whose value is an unchanged TOASTed datum ('u'); the protocol omits it.

    There is exactly one instance, ``UNCHANGED``; compare with ``is``.
    """

    __slots__ = ()
    _instance: ClassVar[Unchanged | None] = None

    def __new__(cls) -> Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        # Pickle and copy resolve the module global, so the singleton survives both.
        return "UNCHANGED"


UNCHANGED: Final = Unchanged()


@dataclass(frozen=True, slots=True)
class Binary:
    """A column value in the type's binary send format ('b'; option ``binary 'true'``)."""

    data: bytes


ColumnValue: TypeAlias = bytes | Unchanged | Binary | None
"""One column of a TupleData: text-format bytes as sent ('t'), None for NULL ('n'),
UNCHANGED ('u') or Binary ('b')."""

TupleValues: TypeAlias = tuple[ColumnValue, ...]


# --------------------------------------------------------------------------- messages


# The class constants of Column, Truncate and LogicalMessage live in base classes: mypyc
# would take a ClassVar in a dataclass body for a field.
class _ColumnFlags:
    __slots__ = ()
    KEY_FLAG: ClassVar[int] = 1


@dataclass(frozen=True, slots=True)
class Column(_ColumnFlags):
    """One column of a Relation message."""

    flags: int
    name: str
    type_oid: Oid
    type_modifier: int

    @property
    def is_key(self) -> bool:
        """The column is part of the replica identity (the key)."""
        return bool(self.flags & self.KEY_FLAG)


@dataclass(frozen=True, slots=True)
class Begin:
    """'B': a transaction starts. Times are µs since 2000-01-01, as sent."""

    final_lsn: Lsn
    commit_time: int
    xid: Xid

    def __init__(self, final_lsn: Lsn, commit_time: int, xid: Xid) -> None:
        # Written out, where dataclass would generate it: compiled, the generated __init__ of
        # a frozen dataclass stays interpreted code (15 times slower than this one, which
        # stores the fields natively); interpreted, this does what the generated one does.
        if _COMPILED:
            self.final_lsn = final_lsn  # type: ignore[misc]
            self.commit_time = commit_time  # type: ignore[misc]
            self.xid = xid  # type: ignore[misc]
        else:
            _setattr(self, "final_lsn", final_lsn)
            _setattr(self, "commit_time", commit_time)
            _setattr(self, "xid", xid)


@dataclass(frozen=True, slots=True)
class Commit:
    """'C': a transaction committed. ``end_lsn`` is the position to confirm."""

    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_time: int

    def __init__(self, flags: int, commit_lsn: Lsn, end_lsn: Lsn, commit_time: int) -> None:
        # Written out for mypyc, as Begin's.
        if _COMPILED:
            self.flags = flags  # type: ignore[misc]
            self.commit_lsn = commit_lsn  # type: ignore[misc]
            self.end_lsn = end_lsn  # type: ignore[misc]
            self.commit_time = commit_time  # type: ignore[misc]
        else:
            _setattr(self, "flags", flags)
            _setattr(self, "commit_lsn", commit_lsn)
            _setattr(self, "end_lsn", end_lsn)
            _setattr(self, "commit_time", commit_time)


@dataclass(frozen=True, slots=True)
class Origin:
    """'O': the transaction came from a replication origin."""

    commit_lsn: Lsn
    name: str


@dataclass(frozen=True, slots=True)
class Relation:
    """'R': a table's shape. ``namespace`` is "" for pg_catalog, as sent.

    ``replica_identity`` is one of 'd' (default), 'n' (nothing), 'f' (full), 'i' (index).
    """

    xid: Xid | None
    relid: Oid
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Type:
    """'Y': a user-defined type used by a following Relation. ``namespace`` as in Relation."""

    xid: Xid | None
    type_oid: Oid
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """'I': a row was inserted."""

    xid: Xid | None
    relid: Oid
    new: TupleValues

    def __init__(self, xid: Xid | None, relid: Oid, new: TupleValues) -> None:
        # Written out for mypyc, as Begin's (the interpreted hot path builds none this way:
        # see _read_insert).
        if _COMPILED:
            self.xid = xid  # type: ignore[misc]
            self.relid = relid  # type: ignore[misc]
            self.new = new  # type: ignore[misc]
        else:
            _setattr(self, "xid", xid)
            _setattr(self, "relid", relid)
            _setattr(self, "new", new)


@dataclass(frozen=True, slots=True)
class Update:
    """'U': a row was updated.

    ``old`` is the whole old row (REPLICA IDENTITY FULL, 'O'); ``key`` the old key columns,
    others NULL ('K', sent when the key changed). Both are None otherwise.
    """

    xid: Xid | None
    relid: Oid
    old: TupleValues | None
    key: TupleValues | None
    new: TupleValues


@dataclass(frozen=True, slots=True)
class Delete:
    """'D': a row was deleted; exactly one of ``old`` ('O') and ``key`` ('K') is set."""

    xid: Xid | None
    relid: Oid
    old: TupleValues | None
    key: TupleValues | None


class _TruncateOptions:
    __slots__ = ()
    CASCADE: ClassVar[int] = 1
    RESTART_IDENTITY: ClassVar[int] = 2


@dataclass(frozen=True, slots=True)
class Truncate(_TruncateOptions):
    """'T': tables were truncated together."""

    xid: Xid | None
    relids: tuple[Oid, ...]
    options: int

    @property
    def cascade(self) -> bool:
        return bool(self.options & self.CASCADE)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & self.RESTART_IDENTITY)


class _MessageFlags:
    __slots__ = ()
    TRANSACTIONAL_FLAG: ClassVar[int] = 1


@dataclass(frozen=True, slots=True)
class LogicalMessage(_MessageFlags):
    """'M': a pg_logical_emit_message() (option ``messages 'true'``)."""

    xid: Xid | None
    flags: int
    lsn: Lsn
    prefix: str
    content: bytes

    @property
    def transactional(self) -> bool:
        return bool(self.flags & self.TRANSACTIONAL_FLAG)


@dataclass(frozen=True, slots=True)
class StreamStart:
    """'S' (protocol >= 2): a block of an in-progress transaction's changes starts."""

    xid: Xid
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    """'E' (protocol >= 2): the current stream block ends."""


@dataclass(frozen=True, slots=True)
class StreamCommit:
    """'c' (protocol >= 2): a streamed transaction committed."""

    xid: Xid
    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_time: int


@dataclass(frozen=True, slots=True)
class StreamAbort:
    """'A' (protocol >= 2): a streamed (sub)transaction aborted.

    ``subxid == xid`` when the whole transaction aborted. ``abort_lsn`` and ``abort_time``
    are sent only with protocol 4 and ``streaming 'parallel'``; None otherwise.
    """

    xid: Xid
    subxid: Xid
    abort_lsn: Lsn | None
    abort_time: int | None


@dataclass(frozen=True, slots=True)
class BeginPrepare:
    """'b' (protocol >= 3): a prepared transaction starts."""

    prepare_lsn: Lsn
    end_lsn: Lsn
    prepare_time: int
    xid: Xid
    gid: str


@dataclass(frozen=True, slots=True)
class Prepare:
    """'P' (protocol >= 3): PREPARE TRANSACTION."""

    flags: int
    prepare_lsn: Lsn
    end_lsn: Lsn
    prepare_time: int
    xid: Xid
    gid: str


@dataclass(frozen=True, slots=True)
class CommitPrepared:
    """'K' (protocol >= 3): COMMIT PREPARED."""

    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_time: int
    xid: Xid
    gid: str


@dataclass(frozen=True, slots=True)
class RollbackPrepared:
    """'r' (protocol >= 3): ROLLBACK PREPARED."""

    flags: int
    prepare_end_lsn: Lsn
    rollback_end_lsn: Lsn
    prepare_time: int
    rollback_time: int
    xid: Xid
    gid: str


@dataclass(frozen=True, slots=True)
class StreamPrepare:
    """'p' (protocol >= 3): a streamed transaction was prepared."""

    flags: int
    prepare_lsn: Lsn
    end_lsn: Lsn
    prepare_time: int
    xid: Xid
    gid: str


PgOutputMessage: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
    | BeginPrepare
    | Prepare
    | CommitPrepared
    | RollbackPrepared
    | StreamPrepare
)


# --------------------------------------------------------------------------- reading


class _Malformed(Exception):
    """Internal: raised where the offset is known; Decoder.decode adds the LSN."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


_U16: Final = struct.Struct(">H").unpack_from
_I32: Final = struct.Struct(">i").unpack_from
_U32: Final = struct.Struct(">I").unpack_from
_U64: Final = struct.Struct(">Q").unpack_from
_I64: Final = struct.Struct(">q").unpack_from
_RELID_ACTION: Final = struct.Struct(">IB").unpack_from
# Begin and Commit bodies, read in one unpack each: once per transaction, and with the inserts
# produced in C (adapters/_outbox_rows.c) most of what the decoder still does per event when
# transactions are small.
_BEGIN_BODY: Final = struct.Struct(">QqI")
_COMMIT_BODY: Final = struct.Struct(">BQQq")

# Final, so that mypyc makes them C constants rather than module globals.
_T: Final = 0x74  # t
_N: Final = 0x6E  # n
_U: Final = 0x75  # u
_B: Final = 0x62  # b
_NEW: Final = 0x4E  # N
_KEY: Final = 0x4B  # K
_OLD: Final = 0x4F  # O


def _read_tuple(buf: bytes, pos: int) -> tuple[TupleValues, int]:
    """TupleData at ``pos``: Int16 count, then per column n / u / t+Int32+bytes / b+Int32+bytes.

    The relay's hot path, so it checks as little as it can: lengths are read unsigned (a
    negative Int32 becomes huge), an overlong one leaves ``pos`` past the end, and running
    off the end raises IndexError. Any of these sends the buffer to ``_tuple_error``, which
    walks it again with every check to say exactly what is wrong and where.
    """
    start = pos
    try:
        ncols = (buf[pos] << 8) | buf[pos + 1]
        pos += 2
        values: list[ColumnValue] = [None] * ncols
        for i in range(ncols):
            kind = buf[pos]
            if kind == _T:
                pos += 5
                stop = pos + _U32(buf, pos - 4)[0]
                values[i] = buf[pos:stop]
                pos = stop
            elif kind == _N:
                pos += 1
            elif kind == _U:
                values[i] = UNCHANGED
                pos += 1
            elif kind == _B:
                pos += 5
                stop = pos + _U32(buf, pos - 4)[0]
                values[i] = Binary(buf[pos:stop])
                pos = stop
            else:
                break
        else:
            if pos <= len(buf):
                return tuple(values), pos
    except (IndexError, struct.error):
        pass
    raise _tuple_error(buf, start)


def _read_tuple_compiled(buf: bytes, pos: int) -> tuple[TupleValues, int]:
    """``_read_tuple`` as mypyc compiles best: lengths by byte arithmetic (a struct call is a
    Python call), every bound checked (cheap in C). Same result, same errors."""
    start = pos
    end = len(buf)
    if end - pos >= 2:
        ncols = (buf[pos] << 8) | buf[pos + 1]
        pos += 2
        values: list[ColumnValue] = [None] * ncols
        for i in range(ncols):
            if pos >= end:
                break
            kind = buf[pos]
            if kind in (_T, _B):
                if end - pos < 5:
                    break
                length = (
                    (buf[pos + 1] << 24) | (buf[pos + 2] << 16) | (buf[pos + 3] << 8) | buf[pos + 4]
                )
                stop = pos + 5 + length
                if stop > end:
                    break
                data = buf[pos + 5 : stop]
                values[i] = data if kind == _T else Binary(data)
                pos = stop
            elif kind == _N:
                pos += 1
            elif kind == _U:
                values[i] = UNCHANGED
                pos += 1
            else:
                break
        else:
            return tuple(values), pos
    raise _tuple_error(buf, start)


def _tuple_error(buf: bytes, pos: int) -> _Malformed:
    """The first defect of the TupleData at ``pos``, which ``_read_tuple`` refused."""
    end = len(buf)
    if end - pos < 2:
        return _Malformed("truncated TupleData", pos)
    ncols = _U16(buf, pos)[0]
    if ncols > end - pos - 2:
        # Every column takes at least one byte.
        return _Malformed(f"TupleData claims {ncols} columns in {end - pos - 2} bytes", pos)
    pos += 2
    for _ in range(ncols):
        if pos >= end:
            return _Malformed("truncated TupleData", pos)
        kind = buf[pos]
        if kind in (_T, _B):
            if end - pos < 5:
                return _Malformed("truncated TupleData", pos)
            length = _I32(buf, pos + 1)[0]
            if length < 0 or pos + 5 + length > end:
                return _Malformed(f"bad column value length {length}", pos + 1)
            pos += 5 + length
        elif kind in (_N, _U):
            pos += 1
        else:
            return _Malformed(f"unknown TupleData column kind {kind:#04x}", pos)
    return _Malformed("malformed TupleData", pos)  # not reached: _read_tuple found a defect


class _Cursor:
    """Bounds-checked reads for the less frequent messages."""

    __slots__ = ("buf", "end", "pos", "what")

    def __init__(self, buf: bytes, pos: int, what: str) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf)
        self.what = what

    def _take(self, n: int) -> int:
        pos = self.pos
        if self.end - pos < n:
            raise _Malformed(f"truncated {self.what} message", pos)
        self.pos = pos + n
        return pos

    def u8(self) -> int:
        pos = self._take(1)
        return self.buf[pos]

    def u16(self) -> int:
        return int(_U16(self.buf, self._take(2))[0])

    def i32(self) -> int:
        return int(_I32(self.buf, self._take(4))[0])

    def u32(self) -> int:
        return int(_U32(self.buf, self._take(4))[0])

    def u64(self) -> int:
        return int(_U64(self.buf, self._take(8))[0])

    def i64(self) -> int:
        return int(_I64(self.buf, self._take(8))[0])

    def lsn(self) -> Lsn:
        return Lsn(self.u64())

    def raw(self, n: int) -> bytes:
        pos = self._take(n)
        return self.buf[pos : pos + n]

    def string(self) -> str:
        """A NUL-terminated UTF-8 String."""
        pos = self.pos
        nul = self.buf.find(b"\0", pos)
        if nul < 0:
            raise _Malformed(f"unterminated string in {self.what} message", pos)
        try:
            text = self.buf[pos:nul].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Malformed(
                f"invalid UTF-8 in string in {self.what} message", pos + exc.start
            ) from None
        self.pos = nul + 1
        return text

    def tuple_data(self) -> TupleValues:
        if _COMPILED:
            values, self.pos = _read_tuple_compiled(self.buf, self.pos)
        else:
            values, self.pos = _read_tuple(self.buf, self.pos)
        return values

    def remaining(self) -> int:
        return self.end - self.pos

    def finish(self) -> None:
        if self.pos != self.end:
            raise _Malformed(
                f"{self.end - self.pos} trailing bytes after {self.what} message", self.pos
            )


# Each reader takes (buffer, offset after the type byte and any stream xid, that xid,
# protocol version) and returns the message. Only Insert bypasses the cursor.
_Reader: TypeAlias = Callable[[bytes, int, Xid | None, int], PgOutputMessage]


# Interpreted, a frozen dataclass's __init__ sets each field through object.__setattr__; the
# hot path builds Insert through the slots' descriptors instead: still frozen, equal, twice
# as fast. (Compiled, a native class has no such descriptors, and needs none.)
if not _COMPILED:
    _new = object.__new__
    _SET_INSERT_XID = vars(Insert)["xid"].__set__
    _SET_INSERT_RELID = vars(Insert)["relid"].__set__
    _SET_INSERT_NEW = vars(Insert)["new"].__set__


def _read_insert(buf: bytes, pos: int, xid: Xid | None, proto: int) -> Insert:
    if _COMPILED:
        return _read_insert_compiled(buf, pos, xid)
    try:
        relid, action = _RELID_ACTION(buf, pos)
    except struct.error:
        raise _Malformed("truncated Insert message", pos) from None
    if action != _NEW:
        raise _Malformed(f"Insert: expected 'N', got {action:#04x}", pos + 4)
    new, pos = _read_tuple(buf, pos + 5)
    if pos != len(buf):
        raise _Malformed(f"{len(buf) - pos} trailing bytes after Insert message", pos)
    # Insert(xid, relid, new) at half the cost (see _SET_INSERT_XID): one per event.
    msg = _new(Insert)
    _SET_INSERT_XID(msg, xid)
    _SET_INSERT_RELID(msg, relid)
    _SET_INSERT_NEW(msg, new)
    return msg


def _read_insert_compiled(buf: bytes, pos: int, xid: Xid | None) -> Insert:
    """``_read_insert`` as mypyc compiles best (see _read_tuple_compiled)."""
    end = len(buf)
    if end - pos < 5:
        raise _Malformed("truncated Insert message", pos)
    relid = Oid((buf[pos] << 24) | (buf[pos + 1] << 16) | (buf[pos + 2] << 8) | buf[pos + 3])
    action = buf[pos + 4]
    if action != _NEW:
        raise _Malformed(f"Insert: expected 'N', got {action:#04x}", pos + 4)
    new, pos = _read_tuple_compiled(buf, pos + 5)
    if pos != end:
        raise _Malformed(f"{end - pos} trailing bytes after Insert message", pos)
    return Insert(xid, relid, new)


def _read_begin(buf: bytes, pos: int, xid: Xid | None, proto: int) -> Begin:
    if len(buf) - pos == _BEGIN_BODY.size:
        final_lsn, commit_time, top_xid = _BEGIN_BODY.unpack_from(buf, pos)
        return Begin(Lsn(final_lsn), commit_time, Xid(top_xid))
    c = _Cursor(buf, pos, "Begin")  # whatever is wrong, the cursor says where
    msg = Begin(c.lsn(), c.i64(), Xid(c.u32()))
    c.finish()
    return msg


def _read_commit(buf: bytes, pos: int, xid: Xid | None, proto: int) -> Commit:
    if len(buf) - pos == _COMMIT_BODY.size:
        flags, commit_lsn, end_lsn, commit_time = _COMMIT_BODY.unpack_from(buf, pos)
        return Commit(flags, Lsn(commit_lsn), Lsn(end_lsn), commit_time)
    c = _Cursor(buf, pos, "Commit")  # whatever is wrong, the cursor says where
    msg = Commit(c.u8(), c.lsn(), c.lsn(), c.i64())
    c.finish()
    return msg


def _read_origin(buf: bytes, pos: int, xid: Xid | None, proto: int) -> Origin:
    c = _Cursor(buf, pos, "Origin")
    msg = Origin(c.lsn(), c.string())
    c.finish()
    return msg


_REPLICA_IDENTITIES: Final = frozenset("dnfi")


def _read_relation(buf: bytes, pos: int, xid: Xid | None, proto: int) -> Relation:
    c = _Cursor(buf, pos, "Relation")
    relid = Oid(c.u32())
    namespace = c.string()
    name = c.string()
    ident_pos = c.pos
    identity = chr(c.u8())
    if identity not in _REPLICA_IDENTITIES:
        raise _Malformed(f"Relation: unknown replica identity {identity!r}", ident_pos)
    ncols = c.u16()
    # flags, name (>= 1 byte), type oid, typmod: at least 10 bytes per column.
    if ncols * 10 > c.remaining():
        raise _Malformed(f"Relation claims {ncols} columns in {c.remaining()} bytes", c.pos)
    columns = tuple(Column(c.u8(), c.string(), Oid(c.u32()), c.i32()) for _ in range(ncols))
    c.finish()
    return Relation(xid, relid, namespace, name, identity, columns)


def _read_type(buf: bytes, pos: int, xid: Xid | None, proto: int) -> Type:
    c = _Cursor(buf, pos, "Type")
    msg = Type(xid, Oid(c.u32()), c.string(), c.string())
    c.finish()
    return msg


def _read_update(buf: bytes, pos: int, xid: Xid | None, proto: int) -> Update:
    c = _Cursor(buf, pos, "Update")
    relid = Oid(c.u32())
    old: TupleValues | None = None
    key: TupleValues | None = None
    action_pos = c.pos
    action = c.u8()
    if action in (_OLD, _KEY):
        if action == _OLD:
            old = c.tuple_data()
        else:
            key = c.tuple_data()
        action_pos = c.pos
        action = c.u8()
    if action != _NEW:
        raise _Malformed(f"Update: expected 'N', got {action:#04x}", action_pos)
    new = c.tuple_data()
    c.finish()
    return Update(xid, relid, old, key, new)


def _read_delete(buf: bytes, pos: int, xid: Xid | None, proto: int) -> Delete:
    c = _Cursor(buf, pos, "Delete")
    relid = Oid(c.u32())
    action_pos = c.pos
    action = c.u8()
    if action == _OLD:
        msg = Delete(xid, relid, c.tuple_data(), None)
    elif action == _KEY:
        msg = Delete(xid, relid, None, c.tuple_data())
    else:
        raise _Malformed(f"Delete: expected 'K' or 'O', got {action:#04x}", action_pos)
    c.finish()
    return msg


def _read_truncate(buf: bytes, pos: int, xid: Xid | None, proto: int) -> Truncate:
    c = _Cursor(buf, pos, "Truncate")
    count = c.u32()
    options = c.u8()
    if count * 4 != c.remaining():
        raise _Malformed(f"Truncate claims {count} relations in {c.remaining()} bytes", c.pos)
    relids = tuple(Oid(c.u32()) for _ in range(count))
    return Truncate(xid, relids, options)


def _read_message(buf: bytes, pos: int, xid: Xid | None, proto: int) -> LogicalMessage:
    c = _Cursor(buf, pos, "Message")
    flags = c.u8()
    lsn = c.lsn()
    prefix = c.string()
    length_pos = c.pos
    length = c.i32()
    if length != c.remaining():
        raise _Malformed(
            f"Message content length {length}, but {c.remaining()} bytes follow", length_pos
        )
    return LogicalMessage(xid, flags, lsn, prefix, c.raw(length))


def _read_stream_start(buf: bytes, pos: int, xid: Xid | None, proto: int) -> StreamStart:
    c = _Cursor(buf, pos, "Stream Start")
    msg = StreamStart(Xid(c.u32()), c.u8() != 0)
    c.finish()
    return msg


def _read_stream_stop(buf: bytes, pos: int, xid: Xid | None, proto: int) -> StreamStop:
    _Cursor(buf, pos, "Stream Stop").finish()
    return StreamStop()


def _read_stream_commit(buf: bytes, pos: int, xid: Xid | None, proto: int) -> StreamCommit:
    c = _Cursor(buf, pos, "Stream Commit")
    msg = StreamCommit(Xid(c.u32()), c.u8(), c.lsn(), c.lsn(), c.i64())
    c.finish()
    return msg


def _read_stream_abort(buf: bytes, pos: int, xid: Xid | None, proto: int) -> StreamAbort:
    c = _Cursor(buf, pos, "Stream Abort")
    top, sub = Xid(c.u32()), Xid(c.u32())
    # Protocol 4 with streaming 'parallel' appends abort LSN and time; nothing tells the
    # reader but the length, so decide by what remains.
    if proto >= 4 and c.remaining() == 16:
        msg = StreamAbort(top, sub, c.lsn(), c.i64())
    else:
        msg = StreamAbort(top, sub, None, None)
    c.finish()
    return msg


def _read_begin_prepare(buf: bytes, pos: int, xid: Xid | None, proto: int) -> BeginPrepare:
    c = _Cursor(buf, pos, "Begin Prepare")
    msg = BeginPrepare(c.lsn(), c.lsn(), c.i64(), Xid(c.u32()), c.string())
    c.finish()
    return msg


def _read_prepare(buf: bytes, pos: int, xid: Xid | None, proto: int) -> Prepare:
    c = _Cursor(buf, pos, "Prepare")
    msg = Prepare(c.u8(), c.lsn(), c.lsn(), c.i64(), Xid(c.u32()), c.string())
    c.finish()
    return msg


def _read_commit_prepared(buf: bytes, pos: int, xid: Xid | None, proto: int) -> CommitPrepared:
    c = _Cursor(buf, pos, "Commit Prepared")
    msg = CommitPrepared(c.u8(), c.lsn(), c.lsn(), c.i64(), Xid(c.u32()), c.string())
    c.finish()
    return msg


def _read_rollback_prepared(buf: bytes, pos: int, xid: Xid | None, proto: int) -> RollbackPrepared:
    c = _Cursor(buf, pos, "Rollback Prepared")
    msg = RollbackPrepared(c.u8(), c.lsn(), c.lsn(), c.i64(), c.i64(), Xid(c.u32()), c.string())
    c.finish()
    return msg


def _read_stream_prepare(buf: bytes, pos: int, xid: Xid | None, proto: int) -> StreamPrepare:
    c = _Cursor(buf, pos, "Stream Prepare")
    msg = StreamPrepare(c.u8(), c.lsn(), c.lsn(), c.i64(), Xid(c.u32()), c.string())
    c.finish()
    return msg


@dataclass(frozen=True, slots=True)
class _Kind:
    name: str
    read: _Reader
    min_proto: int
    # Inside a stream block these carry the transaction's xid right after the type byte.
    stream_xid: bool


_KINDS: Final[dict[int, _Kind]] = {
    ord(code): _Kind(name, read, min_proto, stream_xid)
    for code, name, read, min_proto, stream_xid in (
        ("B", "Begin", _read_begin, 1, False),
        ("C", "Commit", _read_commit, 1, False),
        ("O", "Origin", _read_origin, 1, False),
        ("R", "Relation", _read_relation, 1, True),
        ("Y", "Type", _read_type, 1, True),
        ("I", "Insert", _read_insert, 1, True),
        ("U", "Update", _read_update, 1, True),
        ("D", "Delete", _read_delete, 1, True),
        ("T", "Truncate", _read_truncate, 1, True),
        ("M", "Message", _read_message, 1, True),
        ("S", "Stream Start", _read_stream_start, 2, False),
        ("E", "Stream Stop", _read_stream_stop, 2, False),
        ("c", "Stream Commit", _read_stream_commit, 2, False),
        ("A", "Stream Abort", _read_stream_abort, 2, False),
        ("b", "Begin Prepare", _read_begin_prepare, 3, False),
        ("P", "Prepare", _read_prepare, 3, False),
        ("K", "Commit Prepared", _read_commit_prepared, 3, False),
        ("r", "Rollback Prepared", _read_rollback_prepared, 3, False),
        ("p", "Stream Prepare", _read_stream_prepare, 3, False),
    )
}

_INSERT: Final = ord("I")
_BEGIN: Final = ord("B")
_COMMIT: Final = ord("C")
_STREAM_START: Final = ord("S")
_STREAM_STOP: Final = ord("E")


# --------------------------------------------------------------------------- decoder


class Decoder:
    """Decodes the pgoutput messages of one replication connection, in order.

    Its only state is whether it is inside a stream block (between Stream Start and Stream
    Stop), where Relation, Type, Insert, Update, Delete, Truncate and Message carry an xid:
    that of the (sub)transaction that made the change, which is not always the Stream
    Start's top-level xid (a change made after a SAVEPOINT carries the subtransaction's).
    Use a new Decoder (or ``reset()``) per connection.
    """

    __slots__ = ("_in_stream", "_proto_version")

    def __init__(self, proto_version: int = 1) -> None:
        if not MIN_PROTO_VERSION <= proto_version <= MAX_PROTO_VERSION:
            raise ValueError(
                f"pgoutput proto_version must be {MIN_PROTO_VERSION} to {MAX_PROTO_VERSION}, "
                f"got {proto_version}"
            )
        self._proto_version = proto_version
        self._in_stream = False

    @property
    def proto_version(self) -> int:
        return self._proto_version

    @property
    def in_stream(self) -> bool:
        """True between a decoded Stream Start and its Stream Stop."""
        return self._in_stream

    def reset(self) -> None:
        """Forget any open stream block (after a reconnect)."""
        self._in_stream = False

    def decode(
        self, data: bytes | memoryview, lsn: Lsn | None = None, *, offset: int = 0
    ) -> PgOutputMessage:
        """Decode the message that fills ``data`` from ``offset`` on (a CopyData frame is read
        in place at its payload's offset: no slice, no second copy). ``lsn`` (the XLogData
        start) is only quoted in errors; error offsets count from the message's first byte."""
        buf = data if type(data) is bytes else bytes(data)
        try:
            # The relay's hot path: an Insert outside a stream block, and the Begin and Commit
            # around it, without the table of kinds and its indirect call.
            if len(buf) > offset and not self._in_stream:
                code = buf[offset]
                if code == _INSERT:
                    return _read_insert(buf, offset + 1, None, self._proto_version)
                if code == _BEGIN:
                    return _read_begin(buf, offset + 1, None, self._proto_version)
                if code == _COMMIT:
                    return _read_commit(buf, offset + 1, None, self._proto_version)
            return self._decode_any(buf, offset)
        except _Malformed as exc:
            error = DecodeError(exc.message, offset=exc.offset - offset, lsn=lsn)
            # ``raise error from None``, spelt out: mypyc compiles a raise's "from" away.
            error.__cause__ = None
            raise error  # noqa: B904 - from None, set just above

    def _decode_any(self, buf: bytes, start: int) -> PgOutputMessage:
        if len(buf) <= start:
            raise _Malformed("empty message", start)
        code = buf[start]
        kind = _KINDS.get(code)
        if kind is None:
            raise _Malformed(f"unknown message type {bytes((code,))!r}", start)
        if self._proto_version < kind.min_proto:
            raise _Malformed(
                f"{kind.name} message needs protocol version {kind.min_proto}, "
                f"decoding version {self._proto_version}",
                start,
            )
        xid: Xid | None = None
        pos = start + 1
        if kind.stream_xid and self._in_stream:
            if len(buf) < pos + 4:
                raise _Malformed(f"truncated {kind.name} message", pos)
            xid = Xid(_U32(buf, pos)[0])
            pos += 4
        msg = kind.read(buf, pos, xid, self._proto_version)
        if code == _STREAM_START:
            if self._in_stream:
                raise _Malformed("Stream Start inside a stream block", start)
            self._in_stream = True
        elif code == _STREAM_STOP:
            if not self._in_stream:
                raise _Malformed("Stream Stop outside a stream block", start)
            self._in_stream = False
        return msg


def decode(
    data: bytes | memoryview,
    *,
    proto_version: int = 1,
    in_stream: bool = False,
    lsn: Lsn | None = None,
) -> PgOutputMessage:
    """Decode one message without keeping state; ``in_stream`` says a stream block is open."""
    decoder = Decoder(proto_version)
    decoder._in_stream = in_stream
    return decoder.decode(data, lsn)
