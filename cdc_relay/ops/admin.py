"""setup / status / teardown: the publication, the slot and the checks around them."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdc_relay import recipes, scheduled
from cdc_relay.adapters.replication import alter_slot_failover, slot_invalidation_reason
from cdc_relay.core.lsn import Lsn, format_lsn, parse_lsn
from cdc_relay.errors import PrerequisiteError, RelayError, SlotInvalidated, UnsupportedServer
from cdc_relay.ops import control, failover
from cdc_relay.runtime import scheduler
from cdc_relay.settings import Settings

Connection = psycopg.Connection[tuple[Any, ...]]
Say = Callable[[str], None]

PAYLOAD_TYPES = {"jsonb", "json", "text", "bytea", "character varying"}

# The PostgreSQL major versions the relay is tested on (`make test-matrix`): 15 brought the
# publication features the checks read (FOR TABLES IN SCHEMA, row filters), 17 failover slots.
SUPPORTED_MAJOR = (15, 18)


def server_version(conn: Connection) -> int:
    """The server's version as server_version_num (180006 for 18.6), as the server reported it
    at connection start."""
    return int(conn.info.server_version)


def format_version(version_num: int) -> str:
    major, minor = divmod(version_num, 10000)
    return f"{major}.{minor}" if major >= 10 else f"{major}.{minor // 100}.{minor % 100}"


def require_supported_version(conn: Connection) -> int:
    """server_version_num; UnsupportedServer outside PostgreSQL 15 to 18."""
    version = server_version(conn)
    low, high = SUPPORTED_MAJOR
    if not low <= version // 10000 <= high:
        raise UnsupportedServer(
            f"PostgreSQL {format_version(version)} is not supported: cdc-relay supports "
            f"PostgreSQL {low} to {high}"
        )
    return version


@dataclass(frozen=True, slots=True)
class SlotInfo:
    slot_name: str
    plugin: str | None
    database: str | None
    active: bool
    active_pid: int | None
    confirmed_flush_lsn: str | None
    restart_lsn: str | None
    wal_status: str | None
    lag_bytes: int | None
    # Why the server invalidated the slot: invalidation_reason on 17+; inferred before that.
    invalidation_reason: str | None = None
    # Failover slots (17+; None before): synchronised to standbys / a standby's synced copy.
    failover: bool | None = None
    synced: bool | None = None
    temporary: bool = False

    @property
    def confirmed(self) -> Lsn | None:
        return parse_lsn(self.confirmed_flush_lsn) if self.confirmed_flush_lsn else None

    @property
    def lost(self) -> bool:
        return self.wal_status == "lost"


def fetch_slot(conn: Connection, slot_name: str) -> SlotInfo | None:
    # to_jsonb(row): the view's columns differ between versions (conflicting in 16,
    # invalidation_reason, failover and synced in 17), so take whichever this server has.
    row = conn.execute(
        """
        SELECT to_jsonb(s),
               pg_wal_lsn_diff(
                   CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                        ELSE pg_current_wal_lsn() END,
                   s.confirmed_flush_lsn)::bigint
        FROM pg_replication_slots s WHERE s.slot_name = %s
        """,
        (slot_name,),
    ).fetchone()
    return slot_from_row(row[0], row[1]) if row else None


def slot_from_row(view: dict[str, Any], lag_bytes: int | None) -> SlotInfo:
    """A SlotInfo out of one pg_replication_slots row (as JSON) of any supported version."""
    return SlotInfo(
        slot_name=view["slot_name"],
        plugin=view.get("plugin"),
        database=view.get("database"),
        active=bool(view.get("active")),
        active_pid=view.get("active_pid"),
        confirmed_flush_lsn=view.get("confirmed_flush_lsn"),
        restart_lsn=view.get("restart_lsn"),
        wal_status=view.get("wal_status"),
        lag_bytes=lag_bytes,
        invalidation_reason=slot_invalidation_reason(view),
        failover=view.get("failover"),
        synced=view.get("synced"),
        temporary=bool(view.get("temporary")),
    )


def publication_tables(conn: Connection, publication: str) -> list[str] | None:
    """Tables of the publication (``schema.table``), or None when it does not exist."""
    if (
        conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone()
        is None
    ):
        return None
    rows = conn.execute(
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s "
        "ORDER BY 1",
        (publication,),
    ).fetchall()
    return [row[0] for row in rows]


def publication_lists_tables(conn: Connection, publication: str) -> bool:
    """Whether the publication carries only the tables it names (FOR TABLE), not every table
    of a schema or of the database: then a table in the stream that the relay does not map
    can only be one added to it, and the relay stops rather than pass over its rows."""
    row = conn.execute(
        """
        SELECT NOT p.puballtables
           AND NOT EXISTS (SELECT 1 FROM pg_publication_namespace pn WHERE pn.pnpubid = p.oid)
        FROM pg_publication p WHERE p.pubname = %s
        """,
        (publication,),
    ).fetchone()
    return bool(row and row[0])


def _publication_covers(conn: Connection, publication: str, settings: Settings) -> bool:
    row = conn.execute(
        """
        SELECT 1 FROM pg_publication p
        JOIN pg_publication_rel pr ON pr.prpubid = p.oid
        JOIN pg_class c ON c.oid = pr.prrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE p.pubname = %s AND n.nspname = %s AND c.relname = %s
        UNION ALL
        SELECT 1 FROM pg_publication WHERE pubname = %s AND puballtables
        UNION ALL
        -- FOR TABLES IN SCHEMA (15+): every table of the schema, present and future.
        SELECT 1 FROM pg_publication p
        JOIN pg_publication_namespace pn ON pn.pnpubid = p.oid
        JOIN pg_namespace n ON n.oid = pn.pnnspid
        WHERE p.pubname = %s AND n.nspname = %s
        """,
        (
            publication,
            settings.table_schema,
            settings.table_name,
            publication,
            publication,
            settings.table_schema,
        ),
    ).fetchone()
    return row is not None


def check_prerequisites(conn: Connection, settings: Settings, say: Say) -> None:
    """The server's version, wal_level, free slots and WAL senders, and the role's
    REPLICATION right."""
    version = require_supported_version(conn)
    say(f"ok    PostgreSQL {format_version(version)}")
    wal_level = conn.execute("SHOW wal_level").fetchone()
    if not wal_level or wal_level[0] != "logical":
        current = wal_level[0] if wal_level else "unknown"
        raise PrerequisiteError(
            f"wal_level is '{current}', logical replication needs 'logical': set "
            "wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) "
            "and restart PostgreSQL"
        )
    say("ok    wal_level = logical")

    say(f"ok    role {_require_replication_right(conn)} may replicate")

    slots = conn.execute(
        """
        SELECT current_setting('max_replication_slots')::int,
               (SELECT count(*) FROM pg_replication_slots),
               EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s),
               current_setting('max_wal_senders')::int,
               (SELECT count(*) FROM pg_stat_replication)
        """,
        (settings.slot_name,),
    ).fetchone()
    assert slots is not None
    max_slots, used_slots, have_slot, max_senders, used_senders = slots
    if not have_slot and used_slots >= max_slots:
        raise PrerequisiteError(
            f"all {max_slots} replication slots are in use: raise max_replication_slots "
            "(needs a restart) or drop an unused slot"
        )
    if used_senders >= max_senders:
        raise PrerequisiteError(
            f"all {max_senders} WAL senders are in use: raise max_wal_senders (needs a restart)"
        )
    say(
        f"ok    replication slots {used_slots}/{max_slots} used, WAL senders "
        f"{used_senders}/{max_senders} used"
    )


def outbox_sql(settings: Settings) -> sql.Composed:
    table = sql.Identifier(settings.table_schema, settings.table_name)
    return recipes.composed("outbox.sql", table=table)


def table_columns(conn: Connection, settings: Settings) -> dict[str, str] | None:
    """Column name → type of the outbox table, or None when it does not exist."""
    exists = conn.execute(
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (settings.table_schema, settings.table_name),
    ).fetchone()
    if exists is None:
        return None
    rows = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = %s",
        (settings.table_schema, settings.table_name),
    ).fetchall()
    return {name: data_type for name, data_type in rows}


def _is_partitioned(conn: Connection, settings: Settings) -> bool:
    row = conn.execute(
        "SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (settings.table_schema, settings.table_name),
    ).fetchone()
    return bool(row and row[0])


_STRATEGIES = {"h": "hash", "l": "list", "r": "range"}


@dataclass(frozen=True, slots=True)
class PartitionFacts:
    """The outbox table as one partition of a partitioned table: the scale-out recipe
    (sql/outbox_hash.sql) runs one relay per partition, each over a publication of its own
    partition, whose changes PostgreSQL names after the partition."""

    table: str  # schema.table, the configured outbox table
    parent: str  # schema.table of the partitioned table it belongs to
    strategy: str  # hash, list or range
    bound: str  # e.g. FOR VALUES WITH (modulus 4, remainder 0)
    # Every partition of the parent → the publications that carry its rows under its own name.
    partitions: dict[str, list[str]]
    # Publications that carry an ancestor: every partition's rows, under the ancestor's name
    # (publish_via_partition_root) or under each partition's (without it).
    ancestor_publications: list[str]

    @property
    def unpublished(self) -> list[str]:
        return [name for name, pubs in self.partitions.items() if not pubs]

    def also_carried_by(self, publication: str) -> list[str]:
        """Publications other than ``publication`` that carry this partition's rows: a relay
        on one of them publishes its events a second time."""
        others = set(self.partitions.get(self.table, [])) | set(self.ancestor_publications)
        return sorted(others - {publication})

    def describe(self) -> str:
        hashed = _HASH_BOUND.search(self.bound) if self.strategy == "hash" else None
        if hashed:
            modulus, remainder = hashed.groups()
            text = f"hash partition {remainder} of {modulus} of {self.parent}"
            if len(self.partitions) != int(modulus):
                text += f" (which has {len(self.partitions)} partitions)"
            return text
        return f"a {self.strategy} partition of {self.parent} ({self.bound})"


_HASH_BOUND = re.compile(r"modulus (\d+), remainder (\d+)", re.IGNORECASE)


def _natural(name: str) -> tuple[str, int]:
    """outbox_p2 before outbox_p10."""
    head = name.rstrip("0123456789")
    tail = name[len(head) :]
    return (head, int(tail) if tail else -1)


def partition_facts(conn: Connection, settings: Settings) -> PartitionFacts | None:
    """What the configured table is a partition of (None when it is none)."""
    row = conn.execute(
        """
        SELECT c.oid, pn.nspname || '.' || p.relname, pt.partstrat::text,
               pg_get_expr(c.relpartbound, c.oid), p.oid
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_inherits i ON i.inhrelid = c.oid
        JOIN pg_class p ON p.oid = i.inhparent
        JOIN pg_namespace pn ON pn.oid = p.relnamespace
        JOIN pg_partitioned_table pt ON pt.partrelid = p.oid
        WHERE n.nspname = %s AND c.relname = %s AND c.relispartition
        """,
        (settings.table_schema, settings.table_name),
    ).fetchone()
    if row is None:
        return None
    relid, parent, strategy, bound, parent_oid = row
    # pg_publication_tables names what each publication carries as its changes are named:
    # a partition's own name, or its topmost published ancestor's with publish_via_partition_root.
    siblings = conn.execute(
        """
        SELECT n.nspname || '.' || c.relname,
               coalesce(array_agg(DISTINCT pt.pubname::text)
                        FILTER (WHERE pt.pubname IS NOT NULL), '{}')
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_publication_tables pt
               ON pt.schemaname = n.nspname AND pt.tablename = c.relname
        WHERE i.inhparent = %s
        GROUP BY 1
        """,
        (parent_oid,),
    ).fetchall()
    ancestors = conn.execute(
        """
        SELECT DISTINCT pt.pubname::text
        FROM pg_partition_ancestors(%s) a
        JOIN pg_class c ON c.oid = a.relid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_publication_tables pt ON pt.schemaname = n.nspname AND pt.tablename = c.relname
        WHERE a.relid <> %s
        ORDER BY 1
        """,
        (relid, relid),
    ).fetchall()
    return PartitionFacts(
        table=settings.qualified_table,
        parent=str(parent),
        strategy=_STRATEGIES.get(str(strategy), str(strategy)),
        bound=str(bound),
        partitions={
            name: sorted(pubs) for name, pubs in sorted(siblings, key=lambda r: _natural(r[0]))
        },
        ancestor_publications=[r[0] for r in ancestors],
    )


def require_one_partition(facts: PartitionFacts, publication: str) -> None:
    """PrerequisiteError when the publication also carries other partitions of the outbox under
    their own names: the relay maps the one table it is configured for and passes over the
    others' rows, so it would confirm past events it never published."""
    siblings = [
        name
        for name, pubs in facts.partitions.items()
        if name != facts.table and publication in pubs
    ]
    if siblings:
        raise PrerequisiteError(
            f"publication {publication} carries {', '.join(siblings)} besides {facts.table}, and "
            f"the relay maps {facts.table} only: their events would be confirmed without being "
            f"published. Give each partition a publication of its own (CREATE PUBLICATION … FOR "
            f"TABLE {facts.table} WITH (publish = 'insert')), or point CDC_RELAY_OUTBOX_TABLE "
            f"at {facts.parent} with a publication that publishes via the partition root"
        )


def partition_findings(facts: PartitionFacts, publication: str) -> list[failover.Finding]:
    """What setup and status say about a partition as the outbox table."""
    findings = [
        failover.Finding(
            "ok",
            f"table {facts.table} is {facts.describe()}: this relay streams that partition's "
            "rows only; every partition needs a relay, slot and publication of its own",
        )
    ]
    missing = [name for name in facts.unpublished if name != facts.table]
    if missing:
        findings.append(
            failover.Finding(
                "note",
                f"partitions of {facts.parent} in no publication yet: {', '.join(missing)}; "
                "their events reach no relay until each is set up (sql/outbox_hash.sql)",
            )
        )
    others = facts.also_carried_by(publication)
    if others:
        findings.append(
            failover.Finding(
                "warn",
                f"publication {', '.join(others)} also carries {facts.table}'s rows: a relay "
                "streaming it publishes them a second time (drop it once no relay needs it)",
            )
        )
    return findings


def verify_table(columns: dict[str, str], settings: Settings) -> list[str]:
    """Problems with the mapped columns (empty when the table fits the mapping)."""
    problems = []
    required = {
        "CDC_RELAY_COLUMN_ID": settings.column_id,
        "CDC_RELAY_COLUMN_AGGREGATE_TYPE": settings.column_aggregate_type,
        "CDC_RELAY_COLUMN_AGGREGATE_ID": settings.column_aggregate_id,
        "CDC_RELAY_COLUMN_EVENT_TYPE": settings.column_event_type,
        "CDC_RELAY_COLUMN_PAYLOAD": settings.column_payload,
    }
    for variable, column in required.items():
        if column not in columns:
            problems.append(f"no column {column!r} ({variable})")
    payload_type = columns.get(settings.column_payload)
    if payload_type and payload_type not in PAYLOAD_TYPES:
        problems.append(
            f"payload column {settings.column_payload!r} is {payload_type}; use jsonb, json, "
            "text, varchar or bytea"
        )
    return problems


def setup(conn: Connection, settings: Settings, *, create_table: bool, say: Say) -> bool:
    """Make the database ready; returns whether anything changed. Idempotent."""
    check_prerequisites(conn, settings, say)
    facts = failover.gather(conn)
    if facts.in_recovery:
        raise PrerequisiteError(
            "this server is a standby (in recovery): run `cdc-relay setup` on the primary; "
            "`cdc-relay status` here shows whether the slot is synchronised to it"
        )
    if settings.slot_failover == "on" and not facts.has_failover_slots:
        raise PrerequisiteError(
            f"CDC_RELAY_SLOT_FAILOVER=on needs failover slots, which PostgreSQL "
            f"{format_version(facts.version_num)} does not have (17+): set it to auto or off"
        )
    want_failover = failover.wants_failover(settings.slot_failover, facts.version_num)
    changed = False
    tables = settings.per_table()
    for table in tables:
        changed |= _setup_table(conn, table, create_table=create_table, say=say)
    if not tables:
        say("ok    no outbox table (CDC_RELAY_OUTBOX_TABLE is empty): events are messages only")
    else:
        changed |= _setup_scheduled(conn, settings, tables[0], create_table=create_table, say=say)

    missing = control.missing_tables(conn, settings)
    if missing:
        conn.execute(control.create_sql(settings))
        say(f"done  created control tables {', '.join(missing)}")
        changed = True
    else:
        say(
            f"ok    control tables {settings.control_schema}.{control.KEPT_TABLE}, "
            f"{settings.control_schema}.{control.SKIPPED_TABLE} exist"
        )
    if settings.messages:
        changed |= _setup_emit_functions(conn, settings, say)
    else:
        say("ok    no messages (CDC_RELAY_MESSAGE_PREFIX is empty)")

    changed |= _setup_publication(conn, settings, tables, say)
    for table in tables:
        partition = partition_facts(conn, table)
        if partition is not None:
            require_one_partition(partition, settings.publication_name)
            for finding in partition_findings(partition, settings.publication_name):
                say(finding.line())

    name = settings.slot_name
    slot = fetch_slot(conn, name)
    if slot is None:
        if want_failover:
            conn.execute(
                "SELECT pg_create_logical_replication_slot(%s, 'pgoutput', failover => true)",
                (name,),
            )
            say(f"done  created logical replication slot {name} (pgoutput, failover)")
        else:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
            say(f"done  created logical replication slot {name} (pgoutput)")
        changed = True
    else:
        usable_slot(conn, settings, slot)
        say(f"ok    replication slot {name} exists")
        if facts.has_failover_slots and bool(slot.failover) != want_failover:
            _set_slot_failover(settings, slot, want_failover)
            say(f"done  turned failover {'on' if want_failover else 'off'} for slot {name}")
            changed = True
    if facts.has_failover_slots or settings.slot_failover != "off":
        slot = fetch_slot(conn, name)
        for finding in failover.explain(
            facts,
            slot_name=name,
            slot_failover=slot.failover if slot else None,
            mode=settings.slot_failover,
            slot_confirmed=slot.confirmed_flush_lsn if slot else None,
        ):
            say(finding.line())

    say("setup complete" if changed else "nothing to change: already set up")
    return changed


def _setup_table(conn: Connection, settings: Settings, *, create_table: bool, say: Say) -> bool:
    """One outbox table (``settings`` narrowed to it): created if asked, checked against its
    column mapping."""
    table = settings.outbox_table
    changed = False
    columns = table_columns(conn, settings)
    if columns is None:
        if not create_table:
            raise PrerequisiteError(
                f"table {table} does not exist: create it, or run `cdc-relay setup --create-table`"
            )
        conn.execute(outbox_sql(settings))
        say(f"done  created table {table}")
        changed = True
        columns = table_columns(conn, settings) or {}
    else:
        say(f"ok    table {table} exists")
    problems = verify_table(columns, settings)
    if problems:
        raise PrerequisiteError(
            f"table {table} does not fit the column mapping: " + "; ".join(problems)
        )
    for optional, variable in (
        (settings.column_headers, "CDC_RELAY_COLUMN_HEADERS"),
        (settings.column_created_at, "CDC_RELAY_COLUMN_CREATED_AT"),
    ):
        if optional and optional not in columns:
            say(f"note  table {table} has no column {optional!r} ({variable}); it is not used")
    return changed


def _setup_scheduled(
    conn: Connection, settings: Settings, outbox: Settings, *, create_table: bool, say: Say
) -> bool:
    """The scheduled-events table (CDC_RELAY_SCHEDULED_TABLE), with the payload and headers
    types of the outbox its rows move into, so that a moved row is the row add_event writes."""
    if settings.scheduled is None:
        return False
    name = settings.scheduled_table
    if _table_exists(conn, settings.scheduled):
        say(f"ok    scheduled-events table {name} exists")
        return False
    if not create_table:
        raise PrerequisiteError(
            f"scheduled-events table {name} (CDC_RELAY_SCHEDULED_TABLE) does not exist: create "
            "it, or run `cdc-relay setup --create-table`"
        )
    columns = table_columns(conn, outbox) or {}
    conn.execute(
        scheduled.create_sql(
            scheduled.ScheduledTable(name),
            payload_type=columns.get(outbox.column_payload, "jsonb"),
            headers_type=columns.get(outbox.column_headers or "", "jsonb"),
        )
    )
    say(f"done  created scheduled-events table {name} (moved into {outbox.outbox_table})")
    return True


def _table_exists(conn: Connection, table: tuple[str, str]) -> bool:
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(*table).as_string(conn),)
    ).fetchone()
    return bool(row and row[0])


def _setup_emit_functions(conn: Connection, settings: Settings, say: Say) -> bool:
    state = control.emit_function_state(conn, settings)
    where = f"{settings.control_schema}.cdc_relay_emit_event"
    if state == "current":
        say(f"ok    function {where} emits messages with prefix {settings.message_prefix}")
        return False
    conn.execute(control.emit_sql(settings))
    done = "created" if state == "missing" else "replaced (the prefix changed)"
    say(f"done  {done} functions {where}, {where}_bytes (prefix {settings.message_prefix})")
    return True


def _setup_publication(
    conn: Connection, settings: Settings, tables: list[Settings], say: Say
) -> bool:
    """The publication over every outbox table (or over none, for messages only)."""
    publication = settings.publication_name
    existing = publication_tables(conn, publication)
    names = [table.outbox_table for table in tables]
    if existing is None:
        options = "publish = 'insert'"
        if any(_is_partitioned(conn, table) for table in tables):
            options += ", publish_via_partition_root = true"
        if tables:
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (" + options + ")").format(
                    sql.Identifier(publication),
                    sql.SQL(", ").join(
                        sql.Identifier(table.table_schema, table.table_name) for table in tables
                    ),
                )
            )
            say(f"done  created publication {publication} for {', '.join(names)} ({options})")
        else:
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} WITH (" + options + ")").format(
                    sql.Identifier(publication)
                )
            )
            say(f"done  created publication {publication} without tables (messages need none)")
        return True
    changed = False
    for table in tables:
        if _publication_covers(conn, publication, table):
            _require_via_root(conn, table)
            say(f"ok    publication {publication} includes {table.outbox_table}")
            continue
        if not publication_lists_tables(conn, publication):
            raise PrerequisiteError(
                f"publication {publication} exists but does not include {table.outbox_table}: "
                f"run ALTER PUBLICATION {publication} ADD TABLE {table.outbox_table}, or choose "
                "another CDC_RELAY_PUBLICATION_NAME"
            )
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                sql.Identifier(publication),
                sql.Identifier(table.table_schema, table.table_name),
            )
        )
        _require_via_root(conn, table)
        say(
            f"done  added {table.outbox_table} to publication {publication}: its rows committed "
            "from now on are streamed"
        )
        slot = fetch_slot(conn, settings.slot_name)
        if slot is not None and slot.active:
            say(
                f"note  slot {settings.slot_name} is in use by pid {slot.active_pid}: a relay "
                f"whose CDC_RELAY_OUTBOX_TABLE lacks {table.outbox_table} stops before that "
                "table's first row (nothing is lost); start it again with the new list "
                "(README: adding a table)"
            )
        changed = True
    return changed


def _set_slot_failover(settings: Settings, slot: SlotInfo, enabled: bool) -> None:
    """ALTER_REPLICATION_SLOT … (FAILOVER …): only while no relay streams from the slot."""
    if slot.active:
        raise PrerequisiteError(
            f"replication slot {slot.slot_name} is in use by pid {slot.active_pid}, so its "
            f"failover flag cannot change: stop the relay, then run `cdc-relay setup` again "
            f"(or set CDC_RELAY_SLOT_FAILOVER={'on' if slot.failover else 'off'})"
        )
    alter_slot_failover(settings.database_url.get_secret_value(), slot.slot_name, failover=enabled)


def status(conn: Connection, settings: Settings) -> dict[str, Any]:
    slot = fetch_slot(conn, settings.slot_name)
    facts = failover.gather(conn)
    findings = failover.explain(
        facts,
        slot_name=settings.slot_name,
        slot_exists=slot is not None,
        slot_failover=slot.failover if slot else None,
        slot_synced=slot.synced if slot else None,
        slot_temporary=slot.temporary if slot else False,
        mode=settings.slot_failover,
        slot_confirmed=slot.confirmed_flush_lsn if slot else None,
    )
    low, high = SUPPORTED_MAJOR
    report = {
        "server": {
            "version": format_version(facts.version_num),
            "supported": low <= facts.major <= high,
            "in_recovery": facts.in_recovery,
        },
        "slot": asdict(slot) if slot else None,
        "publication": {
            "name": settings.publication_name,
            "tables": publication_tables(conn, settings.publication_name),
        },
        "outbox_table": settings.outbox_table,
        "sources": sources(conn, settings),
        "partition": _partition_report(conn, settings),
        "oldest_unconfirmed": _oldest_of_all(conn, settings, slot),
        "failover": failover.report(facts, findings),
    }
    if settings.exactly_once:
        report["delivery"] = recorded_position(settings)
    if settings.scheduled is not None:
        report["scheduled"] = scheduler.report(
            conn, settings.scheduled, overdue_after=settings.scheduled_overdue_seconds
        ) or {"table": settings.scheduled_table, "missing": True}
    report["health"] = health(report)
    return report


def recorded_position(settings: Settings) -> dict[str, Any]:
    """Exactly-once: the position the progress topic records (the truth; the slot is a
    WAL-retention bookmark), or why it cannot be read."""
    from cdc_relay.adapters import progress

    out: dict[str, Any] = {"mode": settings.delivery, "progress_topic": settings.progress_topic}
    try:
        key = progress.pipeline_id(
            settings.transactional_id, settings.database_url.get_secret_value(), settings.slot_name
        )
        out["transactional_id"] = key
        recorded = progress.read_latest(
            settings.producer_config(), settings.progress_topic, key.encode(), timeout=10
        )
    except RelayError as exc:
        out["recorded"], out["error"] = None, str(exc)
        return out
    out["recorded"] = format_lsn(recorded.lsn) if recorded else None
    if recorded is not None and recorded.txn_lsn is not None:
        out["in_transaction"] = {"lsn": format_lsn(recorded.txn_lsn), "events": recorded.events}
    return out


def sources(conn: Connection, settings: Settings) -> dict[str, Any]:
    """Where events come from, and whether each source is active: a table is when it exists
    and the publication carries it; messages when a prefix is set (and whether the SQL
    functions are installed)."""
    publication = settings.publication_name
    exists = publication_tables(conn, publication) is not None
    tables = []
    for table in settings.per_table():
        present = table_columns(conn, table) is not None
        published = present and exists and _publication_covers(conn, publication, table)
        tables.append({"table": table.outbox_table, "exists": present, "published": published})
    messages = None
    if settings.messages:
        messages = {
            "prefix": settings.message_prefix,
            "functions": control.emit_function_state(conn, settings),
        }
    return {"tables": tables, "messages": messages}


def _oldest_of_all(
    conn: Connection, settings: Settings, slot: SlotInfo | None
) -> dict[str, Any] | None:
    """oldest_unconfirmed over every outbox table: the oldest of them (messages carry no
    created_at a table could be asked for)."""
    found = [oldest_unconfirmed(conn, table, slot) for table in settings.per_table()]
    known = [f for f in found if f is not None]
    if not known:
        return None
    pending = [f for f in known if f["created_at"] is not None]
    return max(pending, key=lambda f: f["age_seconds"]) if pending else known[0]


def _partition_report(conn: Connection, settings: Settings) -> dict[str, Any] | None:
    facts = next(
        (f for f in (partition_facts(conn, t) for t in settings.per_table()) if f is not None),
        None,
    )
    if facts is None:
        return None
    return {
        **asdict(facts),
        "findings": [asdict(f) for f in partition_findings(facts, settings.publication_name)],
    }


def health(report: dict[str, Any]) -> str:
    """``ok``, ``not_set_up`` (no slot or no publication here) or ``lost`` (the slot was
    invalidated): what `status` says in its exit code."""
    slot = report["slot"]
    if slot is None or report["publication"]["tables"] is None:
        return "not_set_up"
    if slot.get("wal_status") == "lost":
        return "lost"
    return "ok"


def oldest_unconfirmed(
    conn: Connection, settings: Settings, slot: SlotInfo | None
) -> dict[str, Any] | None:
    """The oldest outbox row the slot may not have confirmed yet: ``created_at`` and age in
    seconds (age 0 and no time when none is pending), or None when it cannot be told (no slot,
    no created_at column, an error).

    Outbox rows carry no LSN, so this goes by transaction ids. A logical slot's catalog_xmin
    is the oldest transaction still running at a point the slot has confirmed, so a row whose
    inserting transaction (``xmin``) is older was committed before that point: confirmed. A row
    at or after catalog_xmin may be pending, or already confirmed (catalog_xmin moves only with
    the server's running-transactions snapshots, about every 15 s). So the age is an upper
    bound, and it counts from ``created_at`` (the inserting transaction's start by default).
    With no WAL past the confirmed position nothing is pending at all.
    """
    column = settings.column_created_at
    if slot is None or not column:
        return None
    if slot.lag_bytes is not None and slot.lag_bytes <= 0:
        return {"created_at": None, "age_seconds": 0.0}
    query = sql.SQL(
        """
        SELECT min(o.{column})::text, extract(epoch FROM now() - min(o.{column}))::float8
        FROM {table} o, pg_replication_slots s
        WHERE s.slot_name = %s AND s.catalog_xmin IS NOT NULL
          AND age(o.xmin) <= age(s.catalog_xmin)
        """
    ).format(
        column=sql.Identifier(column),
        table=sql.Identifier(settings.table_schema, settings.table_name),
    )
    try:
        row = conn.execute(query, (settings.slot_name,)).fetchone()
    except psycopg.Error:
        # No such column or table, or an older server: the rest of the status still stands.
        return None
    if row is None or row[0] is None:
        return {"created_at": None, "age_seconds": 0.0}
    return {"created_at": row[0], "age_seconds": max(0.0, float(row[1]))}


def format_status(report: dict[str, Any]) -> str:
    lines = []
    server = report.get("server")
    if server:
        role = "standby, in recovery" if server["in_recovery"] else "primary"
        supported = "" if server["supported"] else ", not supported: 15 to 18 are"
        lines.append(f"server        PostgreSQL {server['version']} ({role}{supported})")
    slot = report["slot"]
    if slot is None:
        lines.append("slot          missing (run `cdc-relay setup`)")
    else:
        active = f"yes (pid {slot['active_pid']})" if slot["active"] else "no"
        if slot["active"] and slot.get("synced") and server and server["in_recovery"]:
            # On a standby the slot synchronisation worker holds a synced slot while it copies.
            active = f"yes (pid {slot['active_pid']}, slot synchronisation)"
        lines += [
            f"slot          {slot['slot_name']} ({slot['plugin']}, database {slot['database']})",
            f"  active      {active}",
            f"  confirmed   {slot['confirmed_flush_lsn']}",
            f"  lag         {_human_bytes(slot['lag_bytes'])}",
            f"  wal_status  {slot['wal_status']}",
        ]
        if slot.get("wal_status") == "lost":
            reason = slot.get("invalidation_reason")
            why = SlotInvalidated.REASONS.get(reason or "", "reason unknown")
            lines.append(f"  invalid     {reason or 'yes'}: {why}")
        if slot.get("failover") is not None:
            synced = slot.get("synced")
            flags = ["yes" if slot["failover"] else "no"]
            if server and server["in_recovery"]:
                flags.append(f"synced {'yes' if synced else 'no'}")
                if synced and slot.get("temporary"):
                    flags.append("not yet persistent")
            lines.append(f"  failover    {', '.join(flags)}")
        oldest = report.get("oldest_unconfirmed")
        if oldest is None:
            pending = "unknown"
        elif oldest["created_at"] is None:
            pending = "none"
        else:
            age = _human_seconds(oldest["age_seconds"])
            pending = f"oldest event {age} old (created {oldest['created_at']})"
        lines.append(f"  unconfirmed {pending}")
    delivery = report.get("delivery")
    if delivery:
        recorded = delivery.get("recorded")
        if delivery.get("error"):
            shown = f"unknown ({delivery['error']})"
        elif recorded is None:
            shown = "none yet (nothing committed)"
        else:
            shown = recorded
            part = delivery.get("in_transaction")
            if part:
                shown += f", and {part['events']} events of the transaction at {part['lsn']}"
        lines.append(f"  recorded    {shown} (exactly-once: the progress topic is the truth)")
    source_lines = _format_sources(report.get("sources"))
    if source_lines:
        lines.append(f"sources       {source_lines[0]}")
        lines += [f"              {line}" for line in source_lines[1:]]
    publication = report["publication"]
    tables = publication["tables"]
    if tables is None:
        lines.append(f"publication   {publication['name']} missing (run `cdc-relay setup`)")
    else:
        lines.append(f"publication   {publication['name']}: {', '.join(tables) or 'no tables'}")
    lines += _format_scheduled(report.get("scheduled"))
    partition = report.get("partition")
    if partition:
        lines.append("partition")
        lines += [f"  {f['level']:<5} {f['text']}" for f in partition["findings"]]
    fo = report.get("failover")
    if fo and fo["findings"]:
        lines.append("failover")
        lines += [f"  {f['level']:<5} {f['text']}" for f in fo["findings"]]
    return "\n".join(lines)


def _format_scheduled(report: dict[str, Any] | None) -> list[str]:
    if report is None:
        return []
    if report.get("missing"):
        return [f"scheduled     {report['table']} missing (run `cdc-relay setup --create-table`)"]
    lines = [
        f"scheduled     {report['table']}",
        f"  waiting     {report['scheduled']} (due {report['due']}, overdue {report['overdue']})",
    ]
    if report["due"]:
        lines.append(f"  oldest due  {_human_seconds(report['oldest_due_age_seconds'])} late")
    return lines


def _format_sources(report: dict[str, Any] | None) -> list[str]:
    if report is None:
        return []
    lines = []
    for table in report["tables"]:
        if table["published"]:
            state = "active"
        elif not table["exists"]:
            state = "NOT ACTIVE: the table does not exist (run `cdc-relay setup`)"
        else:
            state = "NOT ACTIVE: not in the publication (run `cdc-relay setup`)"
        lines.append(f"table {table['table']}: {state}")
    messages = report["messages"]
    if messages is None:
        lines.append("messages: off (CDC_RELAY_MESSAGE_PREFIX is empty)")
    else:
        functions = {
            "current": "cdc_relay_emit_event installed",
            "missing": "cdc_relay_emit_event not installed: run `cdc-relay setup`",
            "other prefix": "cdc_relay_emit_event emits another prefix: run `cdc-relay setup`",
        }[messages["functions"]]
        lines.append(f"messages with prefix {messages['prefix']}: active ({functions})")
    return lines


def _human_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _human_bytes(value: int | None) -> str:
    if value is None:
        return "unknown"
    size = float(value)
    for unit in ("bytes", "kB", "MB", "GB"):
        if abs(size) < 1024 or unit == "GB":
            return f"{value} bytes" if unit == "bytes" else f"{size:.1f} {unit} ({value} bytes)"
        size /= 1024
    return f"{value} bytes"


def teardown(conn: Connection, settings: Settings, say: Say) -> None:
    slot = fetch_slot(conn, settings.slot_name)
    if slot is not None:
        if slot.active:
            raise RelayError(
                f"replication slot {settings.slot_name} is in use by pid {slot.active_pid}: stop "
                "the relay first"
            )
        conn.execute("SELECT pg_drop_replication_slot(%s)", (settings.slot_name,))
        say(f"done  dropped replication slot {settings.slot_name}")
    else:
        say(f"ok    replication slot {settings.slot_name} does not exist")
    if publication_tables(conn, settings.publication_name) is not None:
        conn.execute(
            sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(settings.publication_name))
        )
        say(f"done  dropped publication {settings.publication_name}")
    else:
        say(f"ok    publication {settings.publication_name} does not exist")


def wal_sender_timeout(conn: Connection) -> float:
    """The server's wal_sender_timeout for this role and database, in seconds (0: none)."""
    row = conn.execute(
        "SELECT setting::float / 1000 FROM pg_settings WHERE name = 'wal_sender_timeout'"
    ).fetchone()
    return float(row[0]) if row else 60.0


def _require_replication_right(conn: Connection) -> str:
    """The current role's name; PrerequisiteError when it may not replicate."""
    role = conn.execute(
        "SELECT current_user, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if not role or not role[1]:
        user = role[0] if role else "the current role"
        raise PrerequisiteError(
            f"role {user} lacks the REPLICATION attribute: run ALTER ROLE {user} WITH REPLICATION "
            "as a superuser"
        )
    return str(role[0])


def require_slot(conn: Connection, settings: Settings) -> SlotInfo:
    """The configured slot, if the relay can stream from it: it exists, is a pgoutput slot of
    this database, and the server still has the WAL it needs."""
    return usable_slot(conn, settings, fetch_slot(conn, settings.slot_name))


def usable_slot(conn: Connection, settings: Settings, slot: SlotInfo | None) -> SlotInfo:
    name = settings.slot_name
    if slot is None:
        raise PrerequisiteError(
            f"replication slot {name} does not exist: run `cdc-relay setup`. "
            + _missing_slot_hint(conn)
        )
    current_db = conn.execute("SELECT current_database()").fetchone()
    if slot.plugin != "pgoutput" or (current_db and slot.database != current_db[0]):
        raise PrerequisiteError(
            f"replication slot {name} exists but is not a pgoutput slot of this database: "
            "drop it or choose another CDC_RELAY_SLOT_NAME"
        )
    if slot.lost:
        raise SlotInvalidated(name, slot.invalidation_reason)
    return slot


def _missing_slot_hint(conn: Connection) -> str:
    """What a missing slot may mean: the relay never creates it, because after a failover the
    events since its last confirmation would be skipped."""
    version = server_version(conn)
    if version >= failover.FAILOVER_SLOTS_SINCE:
        how = (
            "to a standby that had not synchronised it (no failover slot, or the standby lacked "
            "sync_replication_slots)"
        )
    else:
        how = f"(PostgreSQL {version // 10000} has no failover slots: a promoted standby lacks it)"
    return (
        "The relay never creates it itself: if this server was just promoted in a failover "
        f"{how}, the events committed after the relay's last confirmation on the old primary "
        "were never published; setup starts a new slot at the current position, and that gap "
        "is to be republished from the outbox table (README: Failover)"
    )


def require_ready(conn: Connection, settings: Settings) -> SlotInfo:
    """What `run` checks before it streams: slot and publication exist, slot usable, and the
    role may replicate (the walsender would refuse it, and retrying cannot fix that), on a
    server version the relay supports."""
    require_supported_version(conn)
    _require_replication_right(conn)
    slot = require_slot(conn, settings)
    missing = control.missing_tables(conn, settings)
    if missing:
        raise PrerequisiteError(
            f"{missing[0]} does not exist: run `cdc-relay setup` (it creates the relay's "
            "control tables beside the outbox)"
        )
    if settings.scheduled is not None and not _table_exists(conn, settings.scheduled):
        raise PrerequisiteError(
            f"scheduled-events table {settings.scheduled_table} (CDC_RELAY_SCHEDULED_TABLE) does "
            "not exist: run `cdc-relay setup --create-table`"
        )
    tables = publication_tables(conn, settings.publication_name)
    if tables is None:
        raise PrerequisiteError(
            f"publication {settings.publication_name} does not exist: run `cdc-relay setup`"
        )
    for table in settings.per_table():
        _require_via_root(conn, table)
        partition = partition_facts(conn, table)
        if partition is not None:
            require_one_partition(partition, settings.publication_name)
        if not _publication_covers(conn, settings.publication_name, table):
            # Renamed, or dropped and recreated, or not added yet: the stream would carry none
            # of its rows, and the relay would confirm past them.
            raise PrerequisiteError(
                f"publication {settings.publication_name} does not include "
                f"{table.outbox_table} (it has {', '.join(tables) or 'no tables'}): was the "
                "outbox renamed or recreated, or is it a new table? Run `cdc-relay setup` "
                f"(ALTER PUBLICATION {settings.publication_name} ADD TABLE "
                f"{table.outbox_table}); rows written to it before that were not streamed"
            )
    return slot


def require_prunable(conn: Connection, settings: Settings) -> None:
    """What prune checks before it trusts the slot: the publication carries the outbox table's
    rows under the table's own name, as the relay streams them. Otherwise the slot's confirmed
    position says nothing about those rows; the likely mistake is pruning a hash-partitioned
    outbox through its root with one partition's slot (sql/outbox_hash.sql)."""
    publication = settings.publication_name
    tables = publication_tables(conn, publication)
    carried = (
        tables is not None
        and _publication_covers(conn, publication, settings)
        and (not _is_partitioned(conn, settings) or _publishes_via_root(conn, settings))
    )
    if carried:
        return
    has = "does not exist" if tables is None else f"has {', '.join(tables) or 'no tables'}"
    raise PrerequisiteError(
        f"publication {publication} does not carry {settings.outbox_table} ({has}), so slot "
        f"{settings.slot_name} confirming a position says nothing about its rows and prune "
        "could delete events never sent: run prune with the settings of the relay that "
        "streams the table (CDC_RELAY_OUTBOX_TABLE, CDC_RELAY_SLOT_NAME, "
        "CDC_RELAY_PUBLICATION_NAME); a hash-partitioned outbox is pruned per partition"
    )


def _require_via_root(conn: Connection, settings: Settings) -> None:
    if _is_partitioned(conn, settings) and not _publishes_via_root(conn, settings):
        # Changes would then carry the partitions' names, which the relay does not map.
        raise PrerequisiteError(
            f"{settings.outbox_table} is partitioned but publication "
            f"{settings.publication_name} lacks publish_via_partition_root: run ALTER "
            f"PUBLICATION {settings.publication_name} SET (publish_via_partition_root = true)"
        )


def _publishes_via_root(conn: Connection, settings: Settings) -> bool:
    row = conn.execute(
        "SELECT pubviaroot FROM pg_publication WHERE pubname = %s", (settings.publication_name,)
    ).fetchone()
    return bool(row and row[0])
