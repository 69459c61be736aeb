"""Claim-check through `cdc-relay run` (CDC_RELAY_CLAIM_CHECK_OVER_BYTES set): payloads up to
the threshold go as they are, larger ones as references, a 50 MB one included, and the
consumer's helper gets back the exact bytes an unchecked relay would have published."""

from __future__ import annotations

import json

import psycopg

from cdc_relay.claimcheck import fetch_payload, resolve
from cdc_relay.core import claimcheck
from cdc_relay.outbox import add_event
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import RelayProcess
from tests.kafka_helpers import consume_all

THRESHOLD = 1_000


def payload_of(size: int) -> bytes:
    """A JSON string of exactly ``size`` bytes as jsonb prints it back."""
    return json.dumps("x" * (size - 2)).encode()


def test_payloads_over_the_threshold_go_by_reference_and_come_back_exactly(db: str, kafka: str):
    box = make_outbox(db, kafka, claim_check_over_bytes=str(THRESHOLD))
    sizes = [THRESHOLD - 1, THRESHOLD, THRESHOLD + 1, 50 * 1024 * 1024]
    with psycopg.connect(db, autocommit=True) as conn:
        for n, size in enumerate(sizes):
            with conn.transaction():
                add_event(
                    conn,
                    aggregate_type="document",
                    aggregate_id=f"d-{n}",
                    event_type="Uploaded",
                    payload=payload_of(size),
                    headers={"n": n},
                )
    with RelayProcess(box.env) as relay:
        records = consume_all(kafka, [box.topic("document")], expected=len(sizes), timeout=120)
        assert relay.stop() == 0, relay.log()
    by_key = {r.key: r for r in records}
    assert len(records) == len(sizes)
    with psycopg.connect(db) as conn:
        for n, size in enumerate(sizes):
            record = by_key[f"d-{n}".encode()]
            assert record.header("n") == str(n).encode()  # everything else as usual
            reference = claimcheck.parse_reference(record.value, record.headers)
            if size <= THRESHOLD:
                assert reference is None
                assert record.value == payload_of(size)
                continue
            assert reference is not None
            assert reference.size == size and reference.table == "public.outbox"
            assert len(record.value or b"") < 200, "the reference, not the payload"
            assert record.header(claimcheck.SIZE_HEADER) == str(size).encode()
            fetched = fetch_payload(conn, (record.value, record.headers))
            assert fetched == payload_of(size)
            assert resolve(conn, (record.value, record.headers)) == fetched
