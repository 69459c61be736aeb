"""The demo broker still works: `make demo` runs the relay against Tansu (one PyPI wheel, no
Java), so one end-to-end run pins it: setup, a few events delivered byte for byte."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    current_lsn,
    execute,
    query,
    wait_confirmed_past,
)
from tests.kafka_helpers import consume_all
from tests.servers import TansuBroker, find_tansu


@pytest.fixture(scope="module")
def tansu() -> Iterator[TansuBroker]:
    try:
        find_tansu()
    except FileNotFoundError as exc:
        pytest.fail(f"cannot start the Tansu demo broker: {exc}", pytrace=False)
    with TansuBroker() as broker:
        yield broker


def test_the_relay_delivers_to_the_tansu_demo_broker_byte_for_byte(db: str, tansu: TansuBroker):
    box = make_outbox(db, tansu.bootstrap)
    payloads = ['{"b": 2, "a": [1, 2.50, "é"]}', '"just a string"', "[]", '{"emoji": "🎉"}']
    for i, payload in enumerate(payloads):
        execute(
            db,
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
            "VALUES (%s, 'order', %s, 'Tested', %s)",
            (uuid.uuid4(), f"k-{i % 2}", payload),
        )
    expected = {
        row[0]: (row[1], row[2])
        for row in query(db, "SELECT id::text, aggregate_id, payload::text FROM outbox")
    }
    end = current_lsn(db)
    with RelayProcess(box.env) as relay:
        wait_confirmed_past(db, end)
        assert relay.stop() == 0
        log = relay.log()
    assert "Traceback" not in log
    # Tansu reports no true high watermarks: read up to the count.
    records = consume_all(
        tansu.bootstrap, [box.topic()], expected=len(payloads), timeout=60, watermarks=False
    )
    got = {(r.header("id") or b"").decode(): (r.key, r.value) for r in records}
    assert got == {
        event_id: (key.encode(), payload.encode()) for event_id, (key, payload) in expected.items()
    }
