"""Claim-check through `cdc-relay run` (CDC_RELAY_CLAIM_CHECK_OVER_BYTES set): payloads up to
the threshold go as they are, larger ones as references, a 50 MB one included, and the
consumer's helper gets back the exact bytes an unchecked relay would have published."""

from __future__ import annotations

import json
import random

import psycopg

from cdc_relay.claimcheck import fetch_payload, resolve
from cdc_relay.core import claimcheck
from cdc_relay.outbox import add_event
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import RelayProcess
from tests.kafka_helpers import ConsumedRecord, consume_all, create_topic

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


def test_a_row_too_large_for_its_topic_goes_by_reference_not_to_dead_letters(db: str, kafka: str):
    """The topic's max.message.bytes (8 KiB) is below the row and the claim-check threshold
    is above it: the broker refuses the record, and the relay sends a reference instead."""
    box = make_outbox(db, kafka, claim_check_over_bytes=str(100_000))
    create_topic(kafka, box.topic("document"), **{"max.message.bytes": "8192"})
    # Incompressible (the producer compresses with lz4): random hex, 32,002 bytes of JSON.
    big, small = json.dumps(random.Random(1).randbytes(16_000).hex()).encode(), payload_of(100)
    with psycopg.connect(db, autocommit=True) as conn, conn.transaction():
        for n, payload in enumerate([small, big, small]):
            add_event(
                conn,
                aggregate_type="document",
                aggregate_id="d-1",
                event_type="Uploaded",
                payload=payload,
                headers={"n": n},
            )
    with RelayProcess(box.env) as relay:
        records = consume_all(kafka, [box.topic("document")], expected=3, timeout=120)
        assert relay.stop() == 0, relay.log()
        log = relay.log()
    firsts: dict[bytes, ConsumedRecord] = {}
    for record in records:  # at-least-once: the resets may resend; first occurrences count
        firsts.setdefault(record.header("n") or b"", record)
    assert [firsts[str(n).encode()].value == small for n in (0, 2)] == [True, True]
    reference = firsts[b"1"]
    assert claimcheck.parse_reference(reference.value, reference.headers) is not None
    with psycopg.connect(db) as conn:
        assert fetch_payload(conn, (reference.value, reference.headers)) == big
    in_order = [r.header("n") for r in sorted(records, key=lambda r: r.offset)]
    assert list(dict.fromkeys(in_order)) == [b"0", b"1", b"2"], "per-key order of firsts"
    print(f"{len(records) - 3} duplicates after the resets")
    assert consume_all(kafka, [box.topic("dead-letter")], timeout=5, watermarks=False) == []
    assert "published by reference (claim-check)" in log
