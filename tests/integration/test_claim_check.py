"""Claim-check against a real PostgreSQL: the consumer helper returns exactly the bytes the relay
publishes for a row (whatever the payload type, the consumer session's encoding or its
bytea_output), a 50 MB payload included, and prune keeps what consumers may still fetch."""

from __future__ import annotations

import asyncio
import importlib.util
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from cdc_relay.claimcheck import (
    MalformedClaimCheck,
    PayloadChanged,
    PayloadGone,
    PayloadTypeUnsupported,
    fetch_payload,
    resolve,
)
from cdc_relay.core import claimcheck
from cdc_relay.core.mapping import ColumnMapping, OutboxRecord, TablePlan
from cdc_relay.core.pgoutput import Column, Oid, Relation
from cdc_relay.errors import ConfigError
from cdc_relay.ops import prune as prune_module
from cdc_relay.settings import load_settings
from tests.integration.conftest import Outbox, make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    current_lsn,
    execute,
    query,
    slot_active,
    wait_confirmed_past,
)
from tests.kafka_helpers import consume_all
from tests.servers import wait_until

THRESHOLD = 4096
# jsonb's text of {"pad": "<n times x>"} is 11 + n bytes.
_PAD_OVERHEAD = len('{"pad": ""}')


def sized(size: int) -> str:
    """SQL for a jsonb payload whose text output is exactly ``size`` bytes."""
    return f"jsonb_build_object('pad', repeat('x', {size - _PAD_OVERHEAD}))"


def as_published(value: bytes | None, headers, *, table: str = "public.outbox"):
    """The (value, headers) of the record the relay publishes by reference instead of this one,
    built with core/claimcheck.py as the relay does (docs/claim-check.md)."""
    assert value is not None
    event_id = dict(headers)["id"].decode()
    size = len(value)
    reference = claimcheck.reference_value(event_id, size, table)
    return reference, [*headers, *claimcheck.reference_headers(size)]


def insert(url: str, payload_sql: str, *, age: str = "0 seconds", aggregate: str = "k") -> str:
    return query(
        url,
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at) "
        f"VALUES (gen_random_uuid(), 'order', %s, 'Tested', {payload_sql}, "
        "now() - %s::interval) RETURNING id::text",
        (aggregate, age),
    )[0][0]


class Message:
    """What the helpers and the example read of confluent-kafka's Message."""

    def __init__(self, value, headers, key=b"k"):
        self._value, self._headers, self._key = value, headers, key

    def key(self):
        return self._key

    def value(self):
        return self._value

    def headers(self):
        return self._headers


OUTBOX_DDL = """
CREATE TABLE {table} (
    id             uuid        PRIMARY KEY,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        {payload_type},
    headers        jsonb,
    created_at     timestamptz NOT NULL DEFAULT now()
)
"""


def create_outbox(url: str, table: str, payload_type: str) -> None:
    execute(url, OUTBOX_DDL.format(table=table, payload_type=payload_type))


def add_row(url: str, payload_sql: str, *params: object) -> str:
    """Insert one event into public.outbox with the payload ``payload_sql``; its id."""
    event_id = str(uuid.uuid4())
    execute(
        url,
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
        f"VALUES (%s, 'order', 'k', 'Tested', {payload_sql})",
        (event_id, *params),
    )
    return event_id


def reference_to(event_id: str, size: int, table: str = "public.outbox"):
    """The (value, headers) the relay publishes for a claim-checked event, usual headers aside."""
    value = claimcheck.reference_value(event_id, size, table)
    return value, [("id", event_id.encode()), *claimcheck.reference_headers(size)]


# --------------------------------------------------------------------------- against the relay


def test_the_helper_returns_the_bytes_the_relay_published(outbox: Outbox, kafka: str):
    """Rows just below, at and just above the threshold, and payloads whose jsonb text differs
    from what was inserted (keys reordered, escapes decoded, numbers as written): published by
    the relay as it does today, then fetched through a reference built from each record."""
    ids = {
        "below": insert(outbox.url, sized(THRESHOLD - 1)),
        "at": insert(outbox.url, sized(THRESHOLD)),
        "above": insert(outbox.url, sized(THRESHOLD + 1)),
        "tricky": insert(
            outbox.url,
            '\'{"zeta": 10.10, "a": "na\\u00efve \\"q\\" \\n \U0001f680", '
            '"n": [1.0e3, -0, 123456789012345678901234567890]}\'::jsonb',
        ),
    }
    with RelayProcess(outbox.env) as relay:
        records = consume_all(kafka, [outbox.topic()], expected=len(ids), timeout=60)
        assert relay.stop() == 0
    by_id = {(r.header("id") or b"").decode(): r for r in records}
    assert set(by_id) == set(ids.values())
    sizes = {name: len(by_id[event_id].value or b"") for name, event_id in ids.items()}
    edges = [sizes["below"], sizes["at"], sizes["above"]]
    assert edges == [THRESHOLD - 1, THRESHOLD, THRESHOLD + 1]
    assert [claimcheck.needs_claim_check(size, THRESHOLD) for size in edges] == [
        False,
        False,
        True,
    ]
    # jsonb's text, not what was inserted: keys sorted, escapes decoded, numbers as written.
    tricky = by_id[ids["tricky"]].value
    assert tricky is not None
    assert (
        tricky
        == (
            '{"a": "naïve \\"q\\" \\n 🚀", "n": [1000, 0, 123456789012345678901234567890], '
            '"zeta": 10.10}'
        ).encode()
    )

    with psycopg.connect(outbox.url, autocommit=True) as conn:
        rule = prune_module.ClaimCheckRule.of(conn, "public", "outbox", "payload")
    assert rule == prune_module.ClaimCheckRule(form="text", utf8_server=True)
    size_sql = sql.SQL("SELECT {} FROM outbox o WHERE o.id = %s").format(
        rule.size_sql("o", "payload")
    )
    with psycopg.connect(outbox.url, autocommit=True) as conn:
        for event_id, record in by_id.items():
            value, headers = as_published(record.value, record.headers)
            assert fetch_payload(conn, (value, headers)) == record.value
            assert resolve(conn, (value, headers)) == record.value
            assert resolve(conn, Message(value, headers)) == record.value
            reference = claimcheck.parse_reference(value, headers)
            assert reference is not None and fetch_payload(conn, reference) == record.value
            # An ordinary record resolves to its own value.
            assert resolve(conn, (record.value, record.headers)) == record.value
            assert resolve(conn, Message(record.value, record.headers)) == record.value
            # prune measures the payload as the relay does.
            assert conn.execute(size_sql, (event_id,)).fetchone() == (len(record.value or b""),)


# --------------------------------------------------------------------------- payload types

PAYLOADS = {
    "jsonb": ('\'{"b": 1.50, "a": "\\u00e9 \U0001f680"}\'', None),
    "json": ('\'{"b" :  1.50,\n "a": "\\u00e9 \U0001f680"}\'', None),
    "text": ("E'na\u00efve \"q\" \\\\ \\t \U0001f680'", None),
    "bytea": ("%s", bytes(range(256)) * 3 + b"\\x00"),
    # pgoutput names the domain's type, not bytea: the relay publishes its text (hex).
    "bytea_domain": ("%s", b"\x00\xff"),
    # A domain over a domain over jsonb: jsonb's text.
    "jsonb_domain": ('\'{"b": 1, "a": [true]}\'', None),
}
DOMAINS = {
    "bytea_domain": ["CREATE DOMAIN bytea_domain AS bytea"],
    "jsonb_domain": [
        "CREATE DOMAIN event_json AS jsonb CHECK (jsonb_typeof(VALUE) = 'object')",
        "CREATE DOMAIN jsonb_domain AS event_json",
    ],
}


def relay_value(url: str, table: str, event_id: str, payload_type: str) -> bytes | None:
    """The value cdc_relay.core.mapping builds from the text pgoutput sends for the row: the
    columns' text output in a session set up like the relay's replication connection."""
    with psycopg.connect(
        url, client_encoding="UTF8", options="-c bytea_output=hex -c TimeZone=UTC"
    ) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT id::text, aggregate_type, aggregate_id, event_type, payload::text, "
                "headers::text, created_at::text FROM {} WHERE id = %s"
            ).format(sql.Identifier(table)),
            (event_id,),
        ).fetchone()
        # What pgoutput's Relation message gives as the column's type: its atttypid.
        type_row = conn.execute(
            "SELECT atttypid::int FROM pg_attribute WHERE attrelid = %s::regclass "
            "AND attname = 'payload'",
            (table,),
        ).fetchone()
    assert row is not None and type_row is not None
    names = ["id", "aggregate_type", "aggregate_id", "event_type", "payload", "headers"]
    oids = [2950, 25, 25, 25, type_row[0], 3802, 1184]
    relation = Relation(
        xid=None,
        relid=Oid(1),
        namespace="public",
        name=table,
        replica_identity="d",
        columns=tuple(
            Column(0, n, Oid(o), -1) for n, o in zip([*names, "created_at"], oids, strict=True)
        ),
    )
    values = tuple(None if v is None else v.encode("utf-8") for v in row)
    record = TablePlan(relation, ColumnMapping(), "outbox.{aggregate_type}").map(values)
    assert isinstance(record, OutboxRecord), record
    return record.value


@pytest.mark.parametrize("payload_type", sorted(PAYLOADS))
def test_every_payload_type_is_fetched_as_the_relay_publishes_it(db: str, payload_type: str):
    table = f"outbox_{payload_type}"
    for statement in DOMAINS.get(payload_type, []):
        execute(db, statement)
    create_outbox(db, table, payload_type)
    literal, param = PAYLOADS[payload_type]
    event_id = str(uuid.uuid4())
    execute(
        db,
        f"INSERT INTO {table} (id, aggregate_type, aggregate_id, event_type, payload) "
        f"VALUES (%s, 'order', 'k', 'Tested', {literal})",
        (event_id, param) if param is not None else (event_id,),
    )
    published = relay_value(db, table, event_id, payload_type)
    assert published is not None
    if payload_type == "bytea":
        assert published == PAYLOADS["bytea"][1]
    if payload_type == "bytea_domain":
        assert published == b"\\x00ff"
    if payload_type == "jsonb_domain":
        assert published == b'{"a": [true], "b": 1}'
    value, headers = reference_to(event_id, len(published), f"public.{table}")
    # A consumer session unlike the relay's: another client encoding (which cannot even
    # represent the emoji) and the other bytea output format.
    with psycopg.connect(
        db, autocommit=True, client_encoding="LATIN1", options="-c bytea_output=escape"
    ) as conn:
        assert fetch_payload(conn, (value, headers)) == published
        rule = prune_module.ClaimCheckRule.of(conn, "public", table, "payload")
        assert rule.form == {"bytea": "raw", "bytea_domain": "hex"}.get(payload_type, "text")
        size = conn.execute(
            sql.SQL("SELECT {} FROM {} o WHERE o.id = %s").format(
                rule.size_sql("o", "payload"), sql.Identifier(table)
            ),
            (event_id,),
        ).fetchone()
        assert size == (len(published),)


# --------------------------------------------------------------------------- 50 MB

BIG_CHARS = 25 * 1024 * 1024  # 'é' is two bytes in UTF-8: a 50 MiB string


def test_a_50_mb_payload_is_fetched_exactly_sync_and_async(db: str):
    create_outbox(db, "outbox", "jsonb")
    event_id = add_row(db, "jsonb_build_object('blob', repeat('é', %s))", BIG_CHARS)
    expected = b'{"blob": "' + "é".encode() * BIG_CHARS + b'"}'
    assert len(expected) > 50 * 1024 * 1024
    assert claimcheck.needs_claim_check(len(expected), 1024 * 1024)
    value, headers = reference_to(event_id, len(expected))
    assert len(value) < 200  # what goes through Kafka instead

    with psycopg.connect(db, autocommit=True) as conn:
        assert fetch_payload(conn, (value, headers)) == expected
        with conn.cursor() as cursor:
            assert fetch_payload(cursor, (value, headers)) == expected

    async def fetch_async() -> tuple[bytes, bytes | None]:
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as aconn:
            fetched = await fetch_payload(aconn, (value, headers))
            async with aconn.cursor() as cursor:
                resolved = await resolve(cursor, (value, headers))
            return fetched, resolved

    fetched, resolved = asyncio.run(fetch_async())
    assert fetched == expected and resolved == expected


# --------------------------------------------------------------------------- errors


def test_a_pruned_row_says_the_retention_was_too_short(db: str):
    create_outbox(db, "outbox", "jsonb")
    event_id = add_row(db, "'{\"a\": 1}'")
    value, headers = reference_to(event_id, len(b'{"a": 1}'))
    with psycopg.connect(db, autocommit=True) as conn:
        assert fetch_payload(conn, (value, headers)) == b'{"a": 1}'
        conn.execute("UPDATE outbox SET payload = '{\"a\": 22}' WHERE id = %s", (event_id,))
        with pytest.raises(
            PayloadChanged, match="holds 9 bytes, but 8 bytes were published"
        ) as changed:
            fetch_payload(conn, (value, headers))
        assert (changed.value.event_id, changed.value.published, changed.value.found) == (
            event_id,
            8,
            9,
        )
        conn.execute("DELETE FROM outbox WHERE id = %s", (event_id,))
        with pytest.raises(PayloadGone) as gone:
            fetch_payload(conn, (value, headers))
        assert (gone.value.event_id, gone.value.table) == (event_id, "public.outbox")
        assert str(gone.value) == (
            f"the outbox row of claim-checked event {event_id} is gone from public.outbox: it "
            "was pruned before this consumer read it, so the claim-check retention "
            "(CDC_RELAY_CLAIM_CHECK_RETENTION, prune) is too short for this consumer's lag and "
            "replay horizon (docs/claim-check.md)"
        )

        async def fetch_async() -> bytes:
            async with await psycopg.AsyncConnection.connect(db, autocommit=True) as aconn:
                return await fetch_payload(aconn, (value, headers))

        with pytest.raises(PayloadGone):
            asyncio.run(fetch_async())
        # An ordinary record is not a reference: fetching it is a mistake, said as such.
        with pytest.raises(MalformedClaimCheck, match="not a claim-check reference"):
            fetch_payload(conn, (b'{"a": 1}', [("id", event_id.encode())]))


def test_a_payload_type_whose_text_depends_on_settings_is_refused(db: str):
    """A timestamptz payload's text depends on TimeZone and DateStyle: the helper cannot
    promise the relay's bytes, and says so rather than return others."""
    create_outbox(db, "outbox", "timestamptz")
    event_id = add_row(db, "now()")
    with psycopg.connect(db, autocommit=True) as conn:
        with pytest.raises(PayloadTypeUnsupported, match="supports payloads of type bytea"):
            fetch_payload(conn, reference_to(event_id, 29))
        rule = prune_module.ClaimCheckRule.of(conn, "public", "outbox", "payload")
    # prune keeps every such row for the retention, as if claim-checked.
    assert rule.form is None and rule.size_sql("o", "payload") is None


def test_a_reference_can_be_read_from_another_table_name(db: str):
    """``table=``: a view (or a replica's copy) that exposes the outbox under another name."""
    create_outbox(db, "outbox", "jsonb")
    execute(db, "CREATE VIEW event_payloads AS SELECT id, payload FROM outbox")
    value, headers = reference_to(add_row(db, "'[1, 2]'"), 6)
    with psycopg.connect(db, autocommit=True) as conn:
        assert fetch_payload(conn, (value, headers), table="public.event_payloads") == b"[1, 2]"


# --------------------------------------------------------------------------- prune


def _settings_of(outbox: Outbox):
    prefix = "CDC_RELAY_"
    env = {k[len(prefix) :].lower(): v for k, v in outbox.env.items() if k.startswith(prefix)}
    return load_settings(_env_file=None, **env)


def test_prune_keeps_claim_checked_rows_for_the_retention(outbox: Outbox, kafka: str):
    rows = {
        "small, old": insert(outbox.url, sized(100), age="2 days"),
        "at the threshold, young": insert(outbox.url, sized(THRESHOLD)),
        "just above, young": insert(outbox.url, sized(THRESHOLD + 1)),
        "large, young": insert(outbox.url, sized(THRESHOLD * 4), age="20 hours"),
        "large, past the retention": insert(outbox.url, sized(THRESHOLD * 4), age="25 hours"),
        "json null, young": query(
            outbox.url,
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
            "VALUES (gen_random_uuid(), 'order', 'k', 'Tested', 'null'::jsonb) RETURNING id::text",
        )[0][0],
    }
    settings = _settings_of(outbox)
    said: list[str] = []
    with RelayProcess(outbox.env) as relay:
        records = consume_all(kafka, [outbox.topic()], expected=len(rows), timeout=60)
        wait_confirmed_past(outbox.url, current_lsn(outbox.url))
        published = {(r.header("id") or b"").decode(): r for r in records}
        with psycopg.connect(outbox.url, autocommit=True) as conn:
            arguments = {
                "older_than": timedelta(0),
                "batch_size": 2,
                "wait_seconds": 60,
                "say": said.append,
                "claim_check_over_bytes": THRESHOLD,
                "claim_check_retention": timedelta(days=1),
            }
            dry = prune_module.prune(conn, settings, dry_run=True, **arguments)
            assert dry.deleted == 0
            assert said[-1].startswith("dry run: would delete 4 confirmed rows created before ")
            assert f"claim-checked rows (payload over {THRESHOLD} bytes) created after" in said[-1]
            result = prune_module.prune(conn, settings, dry_run=False, **arguments)
        assert relay.stop() == 0
    assert result.deleted == 4
    assert said[-1].startswith("deleted 4 confirmed rows created before ")
    left = {r[0] for r in query(outbox.url, "SELECT id::text FROM outbox")}
    assert left == {rows["just above, young"], rows["large, young"]}

    with psycopg.connect(outbox.url, autocommit=True) as conn:
        for name in ("just above, young", "large, young"):
            record = published[rows[name]]
            assert resolve(conn, as_published(record.value, record.headers)) == record.value
        gone = published[rows["large, past the retention"]]
        with pytest.raises(PayloadGone, match="retention"):
            resolve(conn, as_published(gone.value, gone.headers))

    # Without the threshold prune does what it always did: every confirmed row goes.
    with RelayProcess(outbox.env) as relay, psycopg.connect(outbox.url, autocommit=True) as conn:
        wait_until(lambda: slot_active(outbox.url), 60, message="the relay did not start streaming")
        again = prune_module.prune(
            conn,
            settings,
            older_than=timedelta(0),
            batch_size=100,
            wait_seconds=60,
            dry_run=False,
            say=said.append,
        )
        assert relay.stop() == 0
    assert again.deleted == 2
    assert query(outbox.url, "SELECT count(*) FROM outbox") == [(0,)]


def test_prune_refuses_claim_check_without_a_created_at_column(db: str, kafka: str):
    execute(
        db,
        "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregate_type text NOT NULL, "
        "aggregate_id text NOT NULL, event_type text NOT NULL, payload jsonb)",
    )
    box = make_outbox(db, kafka, create_table=False)
    settings = _settings_of(box)
    with (
        psycopg.connect(db, autocommit=True) as conn,
        pytest.raises(ConfigError, match="cannot tell the age of claim-checked rows"),
    ):
        prune_module.prune(
            conn,
            settings,
            older_than=timedelta(0),
            batch_size=100,
            wait_seconds=1,
            dry_run=True,
            say=lambda _: None,
            claim_check_over_bytes=THRESHOLD,
        )


# --------------------------------------------------------------------------- encodings


@pytest.fixture
def latin1_db(pg) -> Iterator[str]:
    """A fresh LATIN1 database: there the relay's UTF-8 bytes differ from the stored ones."""
    name = f"t_claim_latin1_{uuid.uuid4().hex[:8]}"
    pg.execute(
        sql.SQL(
            "CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ).format(sql.Identifier(name))
    )
    try:
        yield pg.url(dbname=name)
    finally:
        pg.drop_database(name)


def test_in_a_latin1_database_the_payload_is_published_and_fetched_in_utf8(
    latin1_db: str, kafka: str
):
    box = make_outbox(latin1_db, kafka)
    event_id = insert(box.url, "jsonb_build_object('text', repeat('é', 100) || 'ÿ')")
    said: list[str] = []
    with RelayProcess(box.env) as relay, psycopg.connect(box.url, autocommit=True) as conn:
        [record] = consume_all(kafka, [box.topic()], expected=1, timeout=60)
        assert record.value is not None
        wait_confirmed_past(box.url, current_lsn(box.url))
        # Prune measures the UTF-8 size here too: 50 bytes under it, the row is claim-checked.
        for over in (len(record.value) - 50, len(record.value)):
            prune_module.prune(
                conn,
                _settings_of(box),
                older_than=timedelta(0),
                batch_size=10,
                wait_seconds=60,
                dry_run=True,
                say=said.append,
                claim_check_over_bytes=over,
            )
        assert relay.stop() == 0
    assert [line.split(" confirmed")[0] for line in said] == [
        "dry run: would delete 0",
        "dry run: would delete 1",
    ]
    assert record.value == ('{"text": "' + "é" * 100 + 'ÿ"}').encode()
    with psycopg.connect(box.url, autocommit=True) as conn:
        assert fetch_payload(conn, as_published(record.value, record.headers)) == record.value
        sizes = [
            conn.execute(
                sql.SQL("SELECT {} FROM outbox o WHERE o.id = %s").format(
                    prune_module.ClaimCheckRule("text", utf8_server=utf8).size_sql("o", "payload")
                ),
                (event_id,),
            ).fetchone()
            for utf8 in (False, True)
        ]
    # What prune uses in this database, and what it would get wrong with the UTF-8 shortcut.
    assert sizes == [(len(record.value),), (len(record.value) - 101,)]


# --------------------------------------------------------------------------- the example

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_example_consumer_reads_ordinary_and_claim_checked_records(db: str):
    spec = importlib.util.spec_from_file_location(
        "example_claim_check_consumer", EXAMPLES / "claim_check_consumer.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    create_outbox(db, "outbox", "jsonb")
    big = add_row(db, "jsonb_build_object('blob', repeat('x', 100000), 'order', 'o-1')")
    size = 100000 + len('{"blob": "", "order": "o-1"}')
    reference = Message(*reference_to(big, size), key=b"o-1")
    ordinary = Message(b'{"order": "o-2"}', [("id", b"e-2")], key=b"o-2")
    with psycopg.connect(db, autocommit=True) as conn:
        assert example.handle(conn, ordinary) == "b'o-2': 16 bytes, keys ['order']"
        assert example.handle(conn, reference) == f"b'o-1': {size} bytes, keys ['blob', 'order']"

    async def handle_async() -> str:
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as aconn:
            return await example.handle_async(aconn, reference)

    assert asyncio.run(handle_async()) == f"b'o-1': {size} bytes, keys ['blob', 'order']"
    execute(db, "DELETE FROM outbox")
    with psycopg.connect(db, autocommit=True) as conn, pytest.raises(PayloadGone):
        example.handle(conn, reference)
