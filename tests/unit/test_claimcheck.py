"""The claim-check reference: what the relay publishes for a large payload, and how a consumer
tells it from an event."""

from __future__ import annotations

import json

import pytest

from cdc_relay.core import claimcheck
from cdc_relay.core.claimcheck import (
    ClaimCheck,
    MalformedClaimCheck,
    needs_claim_check,
    parse_reference,
    reference_headers,
    reference_value,
)

EVENT_ID = "0b6a3f2e-9f7e-4a53-8d0c-3f9a1f2b7c11"


def usual_headers(event_id: str = EVENT_ID) -> list[tuple[str, bytes]]:
    return [
        ("id", event_id.encode()),
        ("event_type", b"OrderPlaced"),
        ("aggregate_type", b"order"),
    ]


def reference(size: int = 52_428_812, table: str = "public.outbox"):
    value = reference_value(EVENT_ID, size, table)
    return value, usual_headers() + reference_headers(size)


@pytest.mark.parametrize(
    ("size", "over", "expected"),
    [
        (1_048_575, 1_048_576, False),  # just below
        (1_048_576, 1_048_576, False),  # at the threshold: still the payload
        (1_048_577, 1_048_576, True),  # just above
        (50 * 1024 * 1024, 1_048_576, True),
        (50 * 1024 * 1024, None, False),  # off (the default): never
        (0, 0, False),
        (1, 0, True),
    ],
)
def test_a_payload_goes_by_reference_only_when_larger_than_the_threshold(size, over, expected):
    assert needs_claim_check(size, over) is expected


def test_the_reference_value_is_the_prefix_and_compact_json():
    value = reference_value(EVENT_ID, 52_428_812, "public.outbox")
    assert value == (
        b'cdc-relay-claim-check:v1 {"id":"0b6a3f2e-9f7e-4a53-8d0c-3f9a1f2b7c11",'
        b'"size":52428812,"table":"public.outbox"}'
    )
    assert len(value) < 200


def test_a_consumer_that_parses_the_value_as_json_fails_instead_of_reading_an_event():
    value, _ = reference()
    with pytest.raises(json.JSONDecodeError):
        json.loads(value)


def test_the_headers_mark_the_reference_and_carry_the_size():
    assert reference_headers(123) == [
        ("cdc-relay-claim-check", b"v1"),
        ("cdc-relay-payload-size", b"123"),
    ]


def test_a_reference_parses_back_to_what_the_relay_wrote():
    value, headers = reference(size=7, table="sales.events")
    assert parse_reference(value, headers) == ClaimCheck(EVENT_ID, 7, "sales.events")


def test_headers_as_str_values_are_read_too():
    value, headers = reference(size=7)
    as_text = [(name, item.decode()) for name, item in headers]
    assert parse_reference(value, as_text) == ClaimCheck(EVENT_ID, 7, "public.outbox")


def test_headers_as_a_dict_are_read_too():
    value, headers = reference(size=7)
    assert parse_reference(value, dict(headers)) == ClaimCheck(EVENT_ID, 7, "public.outbox")
    assert parse_reference(b"{}", {"id": EVENT_ID}) is None


def test_non_ascii_ids_and_table_names_survive():
    value = reference_value("évènement-1", 10, "ventes.boîte")
    headers = [("id", "évènement-1".encode()), *reference_headers(10)]
    assert parse_reference(value, headers) == ClaimCheck("évènement-1", 10, "ventes.boîte")


@pytest.mark.parametrize(
    ("value", "headers"),
    [
        (b'{"order": 1}', usual_headers()),
        (b'{"order": 1}', None),
        (None, None),
        (b"", []),
        # The value alone does not make a reference: the marker header decides.
        (reference_value(EVENT_ID, 7, "public.outbox"), usual_headers()),
    ],
)
def test_an_ordinary_record_has_no_reference(value, headers):
    assert parse_reference(value, headers) is None


def _replace(headers, name, item):
    return [(n, item if n == name else v) for n, v in headers]


@pytest.mark.parametrize(
    "case",
    [
        "marker on an ordinary value",
        "null value",
        "other version",
        "marker twice",
        "size header differs",
        "size header missing",
        "id header differs",
        "not json after the prefix",
        "json list",
        "extra field",
        "negative size",
        "size not an integer",
        "size a boolean",
        "empty id",
        "bad table",
        "huge value",
    ],
)
def test_a_marked_record_that_is_not_a_valid_reference_is_refused_loudly(case):
    value, headers = reference(size=7)
    body = {"id": EVENT_ID, "size": 7, "table": "public.outbox"}

    def with_body(**changes) -> bytes:
        return claimcheck.VALUE_PREFIX + json.dumps({**body, **changes}).encode()

    if case == "marker on an ordinary value":
        value = b'{"order": 1}'
    elif case == "null value":
        value = None
    elif case == "other version":
        headers = _replace(headers, claimcheck.HEADER, b"v2")
    elif case == "marker twice":
        headers = [*headers, (claimcheck.HEADER, b"v1")]
    elif case == "size header differs":
        headers = _replace(headers, claimcheck.SIZE_HEADER, b"8")
    elif case == "size header missing":
        headers = [(n, v) for n, v in headers if n != claimcheck.SIZE_HEADER]
    elif case == "id header differs":
        headers = _replace(headers, "id", b"another")
    elif case == "not json after the prefix":
        value = claimcheck.VALUE_PREFIX + b"{nope"
    elif case == "json list":
        value = claimcheck.VALUE_PREFIX + b"[1, 2]"
    elif case == "extra field":
        value = claimcheck.VALUE_PREFIX + json.dumps({**body, "more": 1}).encode()
    elif case == "negative size":
        value = with_body(size=-1)
    elif case == "size not an integer":
        value = with_body(size=7.0)
    elif case == "size a boolean":
        value = with_body(size=True)
    elif case == "empty id":
        value = with_body(id="")
    elif case == "bad table":
        value = with_body(table="a.b.c")
    elif case == "huge value":
        value = with_body(table="public." + "t" * 5000)
    with pytest.raises(MalformedClaimCheck):
        parse_reference(value, headers)


def test_the_size_header_must_be_the_exact_digits():
    value, headers = reference(size=7)
    with pytest.raises(MalformedClaimCheck, match="cdc-relay-payload-size"):
        parse_reference(value, _replace(headers, claimcheck.SIZE_HEADER, b"07"))


def test_a_negative_size_cannot_be_referenced():
    with pytest.raises(ValueError):
        reference_value(EVENT_ID, -1, "public.outbox")


@pytest.mark.parametrize(
    ("column_type", "base_type", "form"),
    [
        (17, 17, "raw"),  # bytea: its bytes
        (90001, 17, "hex"),  # a domain over bytea: pgoutput names the domain, the relay its hex
        (3802, 3802, "text"),  # jsonb
        (114, 114, "text"),  # json
        (25, 25, "text"),  # text
        (1043, 1043, "text"),  # varchar
        (90002, 3802, "text"),  # a domain over jsonb
        (1184, 1184, None),  # timestamptz: its text depends on TimeZone and DateStyle
        (701, 701, None),  # float8: on extra_float_digits
        (1042, 1042, None),  # char(n): ::text drops the padding that its output keeps
    ],
)
def test_the_payload_form_follows_the_relay(column_type, base_type, form):
    assert claimcheck.payload_form(column_type, base_type) == form
