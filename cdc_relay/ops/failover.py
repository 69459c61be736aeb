"""Failover slots (PostgreSQL 17+): what the primary and its standbys need, checked and explained.

PostgreSQL docs, "Logical Replication Failover" and "Replication Slot Synchronization": a slot
created with ``failover`` is copied to standbys that run ``sync_replication_slots = on`` with
``hot_standby_feedback = on``, a ``primary_slot_name`` and a ``dbname`` in ``primary_conninfo``
(and ``wal_level = logical``); the primary's ``synchronized_standby_slots`` names the standbys'
physical slots, so that no logical walsender sends (and no relay confirms) changes that those
standbys have not received yet. ``gather`` reads the facts; ``explain`` is pure and says, for
setup and status, what is right and what is missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict

from cdc_relay.core.lsn import parse_lsn

Connection = psycopg.Connection[tuple[Any, ...]]
Level = Literal["ok", "note", "warn"]
Mode = Literal["auto", "on", "off"]

FAILOVER_SLOTS_SINCE = 170000


@dataclass(frozen=True, slots=True)
class Finding:
    level: Level
    text: str

    def line(self) -> str:
        return f"{self.level:<5} {self.text}"


@dataclass(frozen=True, slots=True)
class Standby:
    """A physical standby streaming from this server (pg_stat_replication)."""

    name: str  # application_name (cluster_name or walreceiver by default)
    client_addr: str | None
    state: str | None
    sync_state: str | None
    slot_name: str | None  # the physical slot it streams through, if any
    flush_lsn: str | None


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """What the failover checks read from one server, primary or standby."""

    version_num: int
    in_recovery: bool
    wal_level: str
    # primary side
    synchronized_standby_slots: list[str] = field(default_factory=list)
    physical_slots: dict[str, bool] = field(default_factory=dict)  # name -> active
    standbys: list[Standby] = field(default_factory=list)
    # standby side
    sync_replication_slots: bool = False
    hot_standby_feedback: bool = False
    primary_slot_name: str = ""
    primary_conninfo_has_dbname: bool | None = None  # None: not readable by this role

    @property
    def has_failover_slots(self) -> bool:
        return self.version_num >= FAILOVER_SLOTS_SINCE

    @property
    def major(self) -> int:
        return self.version_num // 10000


def wants_failover(mode: Mode, version_num: int) -> bool:
    """Whether the slot should follow failover: ``auto`` where the server can (17+)."""
    return mode == "on" or (mode == "auto" and version_num >= FAILOVER_SLOTS_SINCE)


def _setting(conn: Connection, name: str) -> str | None:
    """A setting's value; None when the server has no such setting or hides it from this
    role (primary_conninfo holds a password: superuser or pg_read_all_settings only)."""
    row = conn.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,)).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def gather(conn: Connection) -> ServerFacts:
    version_num = int(conn.info.server_version)
    row = conn.execute("SELECT pg_is_in_recovery(), current_setting('wal_level')").fetchone()
    assert row is not None
    in_recovery, wal_level = bool(row[0]), str(row[1])
    if version_num < FAILOVER_SLOTS_SINCE:
        return ServerFacts(version_num=version_num, in_recovery=in_recovery, wal_level=wal_level)
    physical = {
        str(name): bool(active)
        for name, active in conn.execute(
            "SELECT slot_name::text, active FROM pg_replication_slots WHERE slot_type = 'physical'"
        ).fetchall()
    }
    # Standbys: walsenders that are not logical (a logical walsender holds a logical slot).
    standbys = [
        Standby(*r)
        for r in conn.execute(
            """
            SELECT r.application_name, host(r.client_addr), r.state, r.sync_state,
                   s.slot_name::text, r.flush_lsn::text
            FROM pg_stat_replication r
            LEFT JOIN pg_replication_slots s ON s.active_pid = r.pid
            WHERE s.slot_type IS DISTINCT FROM 'logical'
            ORDER BY r.application_name, r.pid
            """
        ).fetchall()
    ]
    conninfo = _setting(conn, "primary_conninfo")
    has_dbname: bool | None = None
    if conninfo is not None:
        try:
            has_dbname = bool(conninfo_to_dict(conninfo).get("dbname"))
        except psycopg.ProgrammingError:
            has_dbname = False
    return ServerFacts(
        version_num=version_num,
        in_recovery=in_recovery,
        wal_level=wal_level,
        synchronized_standby_slots=[
            name.strip()
            for name in (_setting(conn, "synchronized_standby_slots") or "").split(",")
            if name.strip()
        ],
        physical_slots=physical,
        standbys=standbys,
        sync_replication_slots=_setting(conn, "sync_replication_slots") == "on",
        hot_standby_feedback=_setting(conn, "hot_standby_feedback") == "on",
        primary_slot_name=_setting(conn, "primary_slot_name") or "",
        primary_conninfo_has_dbname=has_dbname,
    )


def explain(
    facts: ServerFacts,
    *,
    slot_name: str,
    slot_failover: bool | None,
    slot_synced: bool | None = None,
    slot_temporary: bool = False,
    slot_exists: bool = True,
    mode: Mode = "auto",
    slot_confirmed: str | None = None,
) -> list[Finding]:
    """What is right and what is missing for ``slot_name`` to survive a failover, on this
    server (a primary, or one of its standbys)."""
    if not facts.has_failover_slots:
        return [
            Finding(
                "note",
                f"PostgreSQL {facts.major} has no failover slots (17+): after a failover to a "
                f"standby the slot {slot_name} is gone; recreate it and republish the gap (see "
                "the runbook)",
            )
        ]
    if facts.in_recovery:
        return _explain_standby(facts, slot_name, slot_exists, slot_synced, slot_temporary)
    return _explain_primary(facts, slot_name, slot_exists, slot_failover, mode, slot_confirmed)


def _explain_primary(
    facts: ServerFacts,
    slot_name: str,
    slot_exists: bool,
    slot_failover: bool | None,
    mode: Mode,
    slot_confirmed: str | None,
) -> list[Finding]:
    out: list[Finding] = []
    if not slot_exists:
        pass
    elif slot_failover:
        out.append(Finding("ok", f"slot {slot_name} is a failover slot (failover = true)"))
    elif mode == "off":
        return [
            Finding(
                "note",
                f"slot {slot_name} does not follow failover (CDC_RELAY_SLOT_FAILOVER=off): after "
                "a failover it is gone",
            )
        ]
    else:
        out.append(
            Finding(
                "warn",
                f"slot {slot_name} does not follow failover (failover = false): stop the relay "
                "and run `cdc-relay setup` to turn it on",
            )
        )
    listed = facts.synchronized_standby_slots
    if not facts.standbys and not facts.physical_slots:
        out.append(
            Finding(
                "note",
                "no standby streams from this server: a failover slot is synchronised only to "
                "standbys with sync_replication_slots = on",
            )
        )
    for standby in facts.standbys:
        who = f"standby {standby.name}" + (
            f" ({standby.client_addr})" if standby.client_addr else ""
        )
        if standby.slot_name is None:
            out.append(
                Finding(
                    "warn",
                    f"{who} streams without a physical replication slot: set primary_slot_name "
                    "on it (slot synchronisation needs one)",
                )
            )
            continue
        behind = _bytes_behind(slot_confirmed, standby.flush_lsn)
        where = f"{who} streams through physical slot {standby.slot_name}"
        if behind is not None and behind > 0:
            where += f", {behind} bytes behind the relay's confirmed position"
        elif behind is not None:
            where += ", has the WAL up to the relay's confirmed position"
        out.append(Finding("ok", where))
    standby_slots = sorted({s.slot_name for s in facts.standbys if s.slot_name})
    missing = [name for name in standby_slots if name not in listed]
    if missing:
        wanted = ",".join(sorted({*listed, *missing}))
        out.append(
            Finding(
                "warn",
                "synchronized_standby_slots does not name "
                + ", ".join(missing)
                + ": the relay may publish and confirm changes that standby has not received, "
                "and after a failover to it those events are phantoms (in Kafka, never in the "
                "promoted database). On the primary: ALTER SYSTEM SET "
                f"synchronized_standby_slots = '{wanted}'; SELECT pg_reload_conf()",
            )
        )
    for name in listed:
        active = facts.physical_slots.get(name)
        if active is None:
            out.append(
                Finding(
                    "warn",
                    f"synchronized_standby_slots names {name}, which is no physical slot on "
                    "this server: the relay's walsender waits for it and sends nothing; create "
                    "the slot or remove the name",
                )
            )
        elif not active:
            out.append(
                Finding(
                    "warn",
                    f"synchronized_standby_slots names {name}, whose standby is not streaming: "
                    "the relay's walsender waits for it and sends nothing until it is back (or "
                    "the name is removed)",
                )
            )
    if listed and not missing and all(facts.physical_slots.get(n) for n in listed):
        out.append(Finding("ok", "synchronized_standby_slots = " + ",".join(listed)))
    return out


def unprotected_standby_slots(facts: ServerFacts) -> list[str]:
    """Physical slots through which standbys stream from this primary (active in
    pg_replication_slots, or behind a walsender of pg_stat_replication) that
    synchronized_standby_slots does not name: the relay may get ahead of those standbys."""
    if not facts.has_failover_slots or facts.in_recovery:
        return []
    streaming = {name for name, active in facts.physical_slots.items() if active}
    streaming |= {standby.slot_name for standby in facts.standbys if standby.slot_name}
    return sorted(streaming - set(facts.synchronized_standby_slots))


def unsafe_configuration(
    facts: ServerFacts, *, slot_name: str, slot_failover: bool | None
) -> str | None:
    """What `run` warns about once at start, on a primary whose failover slot may get ahead of
    a standby that could be promoted; None when there is nothing to say."""
    if not slot_failover:
        return None
    missing = unprotected_standby_slots(facts)
    if not missing:
        return None
    listed = facts.synchronized_standby_slots
    where = (
        f"synchronized_standby_slots does not name {', '.join(missing)}"
        if listed
        else "synchronized_standby_slots is empty"
    )
    wanted = ",".join(sorted({*listed, *missing}))
    return (
        f"slot {slot_name} is a failover slot, but {where} while physical standbys stream "
        f"through {', '.join(missing)}: the relay may publish and confirm changes such a standby "
        "has not received, and if it is promoted those events are phantoms (in Kafka, never in "
        "the new primary's database; the relay logs their WAL range after the failover). On the "
        f"primary: ALTER SYSTEM SET synchronized_standby_slots = '{wanted}'; SELECT "
        "pg_reload_conf()"
    )


def _explain_standby(
    facts: ServerFacts,
    slot_name: str,
    slot_exists: bool,
    slot_synced: bool | None,
    slot_temporary: bool,
) -> list[Finding]:
    out: list[Finding] = []
    needs = []
    if not facts.sync_replication_slots:
        needs.append("sync_replication_slots = on")
    if not facts.hot_standby_feedback:
        needs.append("hot_standby_feedback = on")
    if not facts.primary_slot_name:
        needs.append("a primary_slot_name (a physical slot on the primary)")
    if facts.primary_conninfo_has_dbname is False:
        needs.append("a dbname in primary_conninfo")
    if facts.wal_level != "logical":
        needs.append("wal_level = logical")
    if needs:
        out.append(
            Finding(
                "warn",
                "this standby does not synchronise failover slots: it needs " + ", ".join(needs),
            )
        )
    else:
        out.append(
            Finding(
                "ok",
                "this standby synchronises failover slots (sync_replication_slots, "
                f"hot_standby_feedback, primary_slot_name {facts.primary_slot_name})",
            )
        )
    if facts.primary_conninfo_has_dbname is None:
        out.append(
            Finding(
                "note",
                "cannot read primary_conninfo (superuser or pg_read_all_settings): check that "
                "it has a dbname",
            )
        )
    if not slot_exists:
        out.append(
            Finding(
                "warn",
                f"slot {slot_name} is not synchronised to this standby: a failover to it would "
                "lose the slot (is it a failover slot on the primary?)",
            )
        )
    elif not slot_synced:
        out.append(
            Finding(
                "warn",
                f"slot {slot_name} exists here but is not a synchronised copy (synced = false): "
                "it was created on this server, not by slot synchronisation",
            )
        )
    elif slot_temporary:
        out.append(
            Finding(
                "note",
                f"slot {slot_name} is being synchronised but not yet persistent: it becomes "
                "usable for a failover once the primary's slot moves past this standby's "
                "position (the relay confirms something)",
            )
        )
    else:
        out.append(Finding("ok", f"slot {slot_name} is synchronised here (synced = true)"))
    return out


def _bytes_behind(target: str | None, position: str | None) -> int | None:
    if not target or not position:
        return None
    return parse_lsn(target) - parse_lsn(position)


def report(
    facts: ServerFacts, findings: list[Finding], *, wanted: bool | None = None
) -> dict[str, Any]:
    """The failover part of `status --json`."""
    return {
        "supported": facts.has_failover_slots,
        "role": "standby" if facts.in_recovery else "primary",
        "standbys": [asdict(s) for s in facts.standbys],
        "synchronized_standby_slots": facts.synchronized_standby_slots,
        "findings": [asdict(f) for f in findings],
        **({"wanted": wanted} if wanted is not None else {}),
    }
