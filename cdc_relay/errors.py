"""The exception tree. Every error cdc-relay raises on purpose derives from RelayError, and every
one of them is defined here, so callers have one place to look.

A class's docstring is its default message; the CLI prints ``str(exc)`` as one line. Library
errors (psycopg, librdkafka) are wrapped once, at the adapter that meets them.
"""

from __future__ import annotations

from typing import ClassVar

from cdc_relay.core.lsn import format_lsn


class RelayError(Exception):
    """cdc-relay failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


# --------------------------------------------------------------------------- configuration


class ConfigError(RelayError):
    """The configuration is invalid."""


class PrerequisiteError(RelayError):
    """The database is not ready for the relay (wal_level, rights, slot, publication)."""


class UnsupportedServer(PrerequisiteError):
    """The PostgreSQL server's version is outside the range the relay supports."""


# --------------------------------------------------------------------------- the stream


class DecodeError(RelayError):
    """A pgoutput message could not be decoded."""

    def __init__(self, message: str, *, offset: int | None = None, lsn: int | None = None) -> None:
        self.reason = message
        self.offset = offset
        self.lsn = lsn
        where = []
        if lsn is not None:
            where.append(f"lsn {format_lsn(lsn)}")
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


class MappingError(RelayError):
    """An outbox row could not be turned into a Kafka record."""


class ReplicationError(RelayError):
    """The replication connection failed."""


class SlotInUse(ReplicationError):
    """The replication slot is active for another process."""


class SlotLost(ReplicationError):
    """The replication slot can no longer be used (wal_status = lost, or it was dropped)."""


class SlotInvalidated(SlotLost):
    """The server invalidated the replication slot (wal_status = lost): it can no longer be
    used, and the relay never recreates it on its own."""

    # invalidation_reason (PostgreSQL 17+; before, only WAL removal, or on 16 a conflict on a
    # standby) → what happened, in the operator's terms.
    REASONS: ClassVar[dict[str, str]] = {
        "wal_removed": "the server removed WAL it still needed (the slot fell more than "
        "max_slot_wal_keep_size behind), so events may be missing",
        "rows_removed": "the server removed catalog rows it still needed (a recovery conflict "
        "on a standby: set hot_standby_feedback = on and a primary_slot_name there)",
        "wal_level_insufficient": "wal_level on the primary is no longer logical",
        "idle_timeout": "it was inactive for longer than idle_replication_slot_timeout (no "
        "relay had streamed from it that long); events committed after its confirmed position "
        "were not published. Raise idle_replication_slot_timeout, or set it to 0, on this server",
    }

    def __init__(self, slot: str, reason: str | None, *, detail: str | None = None) -> None:
        self.slot = slot
        self.reason = reason
        self.detail = detail
        if reason in self.REASONS:
            what = f"invalidation_reason = {reason}): {self.REASONS[reason]}"
        elif reason:
            what = f"invalidation_reason = {reason})"
        else:
            what = f"the server says: {detail})" if detail else "reason unknown)"
        super().__init__(
            f"replication slot {slot} is lost (wal_status = lost, {what}; the relay will not "
            "recreate it. Drop it, run `cdc-relay setup`, and reconcile the gap from the outbox "
            "table"
        )


class ForeignServer(PrerequisiteError):
    """The server the relay reconnected to does not continue the history it streamed from (a
    different cluster, or a timeline that does not descend from the previous session's): its
    slot is not the one the relay confirmed."""


class DatabaseUnavailable(RelayError):
    """The database cannot be reached."""


# --------------------------------------------------------------------------- Kafka


class DeliveryError(RelayError):
    """Kafka did not acknowledge a record: the pipeline replays from the confirmed position."""


class ProducerFatal(DeliveryError):
    """The producer hit a fatal error (librdkafka): every record it holds fails, and it must be
    replaced before the replay."""


class ProducerFenced(ProducerFatal):
    """Another relay with the same transactional.id took over this pipeline (exactly-once):
    this one must stop, publishing nothing more."""


class TransactionAborted(DeliveryError):
    """A Kafka transaction failed and was aborted: nothing of it is visible to read_committed
    consumers, and the next session replays from the recorded position."""


class RecordRefused(RelayError):
    """The producer refused a record outright (too large for the client, invalid)."""

    def __init__(self, reason: str, *, too_large: bool) -> None:
        super().__init__(reason)
        self.too_large = too_large


class ProduceInterrupted(RelayError):
    """Stop was requested while the producer waited for room in librdkafka's queue."""


class HaltedOnBadRow(RelayError):
    """An outbox row cannot be delivered and the dead-letter policy is 'halt'."""

    def __init__(self, message: str | None = None, *, lsn: int | None = None) -> None:
        super().__init__(message)
        self.lsn = lsn


# --------------------------------------------------------------------------- operations


class PruneBlocked(RelayError):
    """The slot has not confirmed the position prune started at: nothing was deleted."""


# --------------------------------------------------------------------------- client helpers


class NotInTransaction(RelayError):
    """An outbox write needs a transaction: use `with conn.transaction():` around it."""


class MissingEventId(RelayError):
    """The record has no `id` header: it was not published by cdc-relay."""


class MalformedClaimCheck(RelayError):
    """The record is marked as a claim-check reference, but its value or headers are not a
    valid reference (version v1): it was not written by cdc-relay, or was changed on the way."""


class ClaimCheckError(RelayError):
    """The payload of a claim-checked event cannot be fetched."""


class PayloadGone(ClaimCheckError):
    """The outbox row of a claim-checked event is gone."""

    def __init__(self, event_id: str, table: str) -> None:
        self.event_id = event_id
        self.table = table
        super().__init__(
            f"the outbox row of claim-checked event {event_id} is gone from {table}: "
            "it was pruned before this consumer read it, so the claim-check retention "
            "(CDC_RELAY_CLAIM_CHECK_RETENTION, prune) is too short for this consumer's lag "
            "and replay horizon (docs/claim-check.md)"
        )


class PayloadTypeUnsupported(ClaimCheckError):
    """The payload column's type has a text output that depends on session settings (dates,
    floats, ...): the helper cannot promise the relay's bytes. Claim-check supports bytea,
    text, varchar, json and jsonb payloads, and domains over them."""

    def __init__(self, table: str, column: str) -> None:
        self.table = table
        self.column = column
        super().__init__(
            f"column {column!r} of {table}: claim-check supports payloads of type bytea, "
            "text, varchar, json or jsonb (or a domain over one of them), whose published "
            "bytes do not depend on session settings"
        )


class PayloadChanged(ClaimCheckError):
    """The outbox row of a claim-checked event no longer holds the payload that was
    published: its size differs from the reference's (the row was updated, or the id was
    reused), or its payload is NULL."""

    def __init__(self, event_id: str, table: str, *, published: int, found: int | None) -> None:
        self.event_id = event_id
        self.table = table
        self.published = published
        self.found = found
        now = "a NULL payload" if found is None else f"{found} bytes"
        super().__init__(
            f"the outbox row of claim-checked event {event_id} in {table} holds "
            f"{now}, but {published} bytes were published: the row changed after it was "
            "published (outbox rows must never be updated)"
        )
