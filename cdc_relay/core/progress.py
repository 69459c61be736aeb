"""The relay's position in exactly-once mode, as written to the progress topic in the same Kafka
transaction as the events it covers.

A progress record says: every event of every PostgreSQL transaction that ended at or before
``lsn`` is committed in Kafka; and, when a PostgreSQL transaction was too large for one Kafka
transaction, the first ``events`` outbox events of the transaction that commits at
``txn_lsn`` are too. On start the relay reads the last one (read_committed) and drops what it
says is done. Versioned JSON: small, readable with any tool, and never on the hot path (one
per Kafka transaction).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cdc_relay.core.lsn import Lsn, format_lsn, parse_lsn

VERSION = 1


def transactional_id(system_identifier: str, slot: str) -> str:
    """The default transactional.id of a pipeline: stable across restarts and standbys (the
    same cluster, the same slot), distinct for every slot (relays of a split outbox never fence
    each other), and the key of its progress records."""
    return f"cdc-relay-{system_identifier}-{slot}"


@dataclass(frozen=True, slots=True)
class Progress:
    lsn: Lsn  # the end LSN of the last PostgreSQL transaction committed in Kafka whole
    txn_lsn: Lsn | None = None  # the commit LSN of a transaction committed in part
    events: int = 0  # how many of its outbox events are committed

    def covers(self, final_lsn: int) -> bool:
        """Whether the transaction that commits at ``final_lsn`` is wholly committed in Kafka:
        every transaction in commit order before the one ending at ``lsn``, and that one."""
        return final_lsn < self.lsn

    def done_in(self, final_lsn: int) -> int:
        """How many outbox events of the transaction committing at ``final_lsn`` are done."""
        return self.events if self.txn_lsn == final_lsn else 0

    def encode(self, *, slot: str) -> bytes:
        body: dict[str, object] = {"v": VERSION, "lsn": format_lsn(self.lsn), "slot": slot}
        if self.txn_lsn is not None:
            body["txn"] = {"lsn": format_lsn(self.txn_lsn), "events": self.events}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Progress:
        """ValueError on anything that is not a progress record of a version this relay
        knows."""
        try:
            body = json.loads(raw)
            if body.get("v") != VERSION:
                raise ValueError(f"progress record of version {body.get('v')!r}")
            txn = body.get("txn")
            if txn is None:
                return cls(parse_lsn(body["lsn"]))
            return cls(parse_lsn(body["lsn"]), parse_lsn(txn["lsn"]), int(txn["events"]))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a progress record: {exc}") from None
