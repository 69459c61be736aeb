"""What the relay checks when it resumes its slot, at the start of every session.

Before START_REPLICATION, over the replication connection itself: IDENTIFY_SYSTEM says which
cluster and timeline this is. Another cluster than the previous session's (another database
behind the same URL) is a halt. A new timeline means a standby was promoted: TIMELINE_HISTORY
says where the new timeline branched off the one the relay streamed from, and every transaction
the relay had handed to Kafka that ends past that point was never on the new primary. Those
events are phantoms (in Kafka, not in the database) and are reported once, loudly, with their
WAL range. Once the slot is held, one line says what was resumed (system, timeline, branch
point, the slot's failover and synced flags, and how far the slot is behind what the relay had
confirmed, which costs duplicates, never loss); and once per server, a warning if a failover
slot may get ahead of a streaming standby (synchronized_standby_slots).

What the relay produced and confirmed is known in-process only: a relay restarted after a
failover cannot tell phantoms (README, runbook).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg

from cdc_relay.adapters.replication import SystemIdentity, TimelineSwitch
from cdc_relay.core.lsn import Lsn, format_lsn
from cdc_relay.core.stats import RelayStats
from cdc_relay.errors import ForeignServer
from cdc_relay.ops import failover
from cdc_relay.ops.admin import SlotInfo

log = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[Any, ...]]


class IdentifiesSystem(Protocol):
    """The part of the replication stream the check uses (ReplicationStream, or a fake)."""

    def identify_system(self) -> SystemIdentity: ...

    def timeline_history(self, timeline: int) -> list[TimelineSwitch]: ...


@dataclass(frozen=True, slots=True)
class Branch:
    """The server's timeline branched off ``parent`` (the previous session's) at ``at``."""

    parent: int
    at: Lsn


@dataclass(frozen=True, slots=True)
class Resumption:
    """What identify() found, reported by resumed() once the slot is held."""

    identity: SystemIdentity
    branch: Branch | None
    # End LSN of the last transaction produced on the previous timeline (0: none).
    produced_through: Lsn
    # The relay's confirmed position at the end of the previous session (None: first session).
    confirmed_before: Lsn | None


def branch_point(history: list[TimelineSwitch], parent: int) -> Lsn | None:
    """Where timeline ``parent`` ended in ``history`` (the history file of a later timeline),
    i.e. where its descendant branched off; None when ``parent`` is not an ancestor."""
    for switch in history:
        if switch.timeline == parent:
            return switch.switchpoint
    return None


class ResumeCheck:
    """Kept by the Relay across sessions: what the previous sessions streamed from and
    produced, checked against each new session's server."""

    def __init__(self, slot_name: str, stats: RelayStats) -> None:
        self._slot = slot_name
        self._stats = stats
        self._streamed: SystemIdentity | None = None  # the server of the last session
        self._produced = 0  # furthest end LSN produced on the current timeline
        self._pending: Resumption | None = None
        self._config_checked: set[tuple[str, int]] = set()

    def identify(self, stream: IdentifiesSystem) -> None:
        """Before START_REPLICATION: which server this is. Raises ForeignServer when it does
        not continue the history of the previous session's server."""
        identity = stream.identify_system()
        stats = self._stats
        self._produced = max(self._produced, stats.produced_through)
        previous = self._streamed
        branch: Branch | None = None
        if previous is not None:
            if identity.system_id != previous.system_id:
                raise ForeignServer(
                    f"the database URL now reaches another cluster (system identifier "
                    f"{identity.system_id}; the relay streamed from {previous.system_id} until "
                    f"now): its slot {self._slot} is not the one the relay confirmed, so it "
                    "stops. Point CDC_RELAY_DATABASE_URL at the primary of the right cluster "
                    "(and restart the relay if this one is meant)"
                )
            if identity.timeline != previous.timeline:
                branch = self._branch(stream, previous.timeline, identity.timeline)
        self._pending = Resumption(
            identity=identity,
            branch=branch,
            produced_through=Lsn(self._produced),
            confirmed_before=Lsn(stats.confirmed_lsn) if previous is not None else None,
        )

    def _branch(self, stream: IdentifiesSystem, parent: int, timeline: int) -> Branch:
        if timeline > parent:
            at = branch_point(stream.timeline_history(timeline), parent)
            if at is not None:
                return Branch(parent, at)
        raise ForeignServer(
            f"the server is on timeline {timeline}, which does not descend from timeline "
            f"{parent} that the relay streamed from until now: another branch of the "
            "cluster's history (an old primary running again, or another standby "
            f"promoted). Its slot {self._slot} is not the one the relay confirmed, so it "
            "stops. Make sure the database URL reaches only the current primary"
        )

    def resumed(self, conn: Connection, slot: SlotInfo) -> None:
        """The slot is held (START_REPLICATION succeeded) and ``slot`` read: say what was
        resumed, report phantoms, warn once per server about an unsafe configuration."""
        pending, self._pending = self._pending, None
        if pending is None:  # identify() was not called: nothing to say
            return
        identity, branch = pending.identity, pending.branch
        fields = {
            "slot": self._slot,
            "lsn": slot.confirmed_flush_lsn,
            "system_id": identity.system_id,
            "timeline": identity.timeline,
        }
        log.info("%s", self._describe(pending, slot), extra=fields)
        if branch is not None:
            if pending.produced_through > branch.at:
                log.error(
                    "phantom events: transactions ending between %s and %s on timeline %d, "
                    "past the point where timeline %d branched off, had been handed to Kafka; "
                    "the new primary never had them, so their events are in Kafka but not in "
                    "the outbox (the promoted standby had not received them: "
                    "synchronized_standby_slots on the old primary must name it). Consumers "
                    "may have acted on them: reconcile by event id against the outbox table",
                    format_lsn(branch.at),
                    format_lsn(pending.produced_through),
                    branch.parent,
                    identity.timeline,
                    extra={
                        **fields,
                        "lsn": format_lsn(branch.at),
                        "phantoms_from": format_lsn(branch.at),
                        "phantoms_through": format_lsn(pending.produced_through),
                    },
                )
            if slot.synced is not True:
                log.warning(
                    "slot %s on the new primary (timeline %d) is not a synchronised copy of "
                    "the old primary's (synced = %s): it was created on that server, so its "
                    "position has nothing to do with what the relay confirmed before; events "
                    "committed between the two may be missing. Compare the outbox with Kafka",
                    self._slot,
                    identity.timeline,
                    "false" if slot.synced is False else "unknown, no failover slots",
                    extra=fields,
                )
            self._produced = 0
        self._streamed = identity
        self._stats.produced_through = 0
        self._check_configuration(conn, identity, slot)

    def _describe(self, pending: Resumption, slot: SlotInfo) -> str:
        identity, branch = pending.identity, pending.branch
        text = (
            f"resuming slot={self._slot} on system_id={identity.system_id} "
            f"timeline={identity.timeline}"
        )
        if branch is not None:
            text += f" (branched off timeline {branch.parent} at {format_lsn(branch.at)})"
        if slot.failover is None:
            text += ", slot failover=n/a (no failover slots before PostgreSQL 17)"
        else:
            text += (
                f", slot failover={'yes' if slot.failover else 'no'} "
                f"synced={'yes' if slot.synced else 'no'}"
            )
        confirmed = slot.confirmed
        text += f", confirmed lsn={slot.confirmed_flush_lsn}"
        before = pending.confirmed_before
        if before is not None and branch is not None and before > branch.at:
            # What was confirmed past the branch point is not on this server at all.
            text += (
                f"; this relay had confirmed {format_lsn(before)}, past the branch point (phantoms)"
            )
            before = branch.at
        if confirmed is not None and before is not None and confirmed < before:
            text += (
                f"; {before - confirmed} bytes behind the {format_lsn(before)} this relay had "
                "confirmed: the events in between are sent again (duplicates, not loss)"
            )
        return text

    def _check_configuration(
        self, conn: Connection, identity: SystemIdentity, slot: SlotInfo
    ) -> None:
        key = (identity.system_id, identity.timeline)
        if key in self._config_checked:
            return
        try:
            facts = failover.gather(conn)
        except psycopg.Error as exc:  # a warning only: never a reason to stop streaming
            log.debug("cannot check the failover configuration: %s", exc)
            return
        self._config_checked.add(key)
        warning = failover.unsafe_configuration(
            facts, slot_name=self._slot, slot_failover=slot.failover
        )
        if warning is not None:
            log.warning("%s", warning, extra={"slot": self._slot})
