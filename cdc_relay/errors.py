"""The exception tree. Every error the relay raises on purpose derives from RelayError.

A class's docstring is its default message; the CLI prints ``str(exc)`` as one line.
"""

from __future__ import annotations


class RelayError(Exception):
    """cdc-relay failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(RelayError):
    """The configuration is invalid."""


class DecodeError(RelayError):
    """A pgoutput message could not be decoded."""

    def __init__(self, message: str, *, offset: int | None = None, lsn: int | None = None) -> None:
        self.reason = message
        self.offset = offset
        self.lsn = lsn
        where = []
        if lsn is not None:
            from cdc_relay.core.lsn import format_lsn

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


class DeliveryError(RelayError):
    """Kafka did not acknowledge a record."""


class HaltedOnBadRow(RelayError):
    """An outbox row cannot be delivered and the dead-letter policy is 'halt'."""


class PrerequisiteError(RelayError):
    """The database is not ready for the relay (wal_level, rights, slot, publication)."""
