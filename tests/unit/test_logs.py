"""Log lines: one JSON object per line or readable text, structured fields, redaction in both."""

from __future__ import annotations

import io
import json
import logging

import pytest

from cdc_relay.logs import (
    REDACT,
    JsonFormatter,
    TextFormatter,
    _RedactingFilter,
    resolve_format,
)


def emit(formatter: logging.Formatter, message: str, *args: object, **extra: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(_RedactingFilter())
    logger = logging.getLogger("cdc_relay.test_logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        logger.info(message, *args, extra=extra or None)
    finally:
        logger.handlers[:] = []
    return stream.getvalue()


def test_json_is_one_object_per_line_with_the_structured_fields():
    out = emit(
        JsonFormatter(),
        "streaming slot=%s from lsn=%s",
        "s1",
        "0/16B3748",
        slot="s1",
        lsn="0/16B3748",
    )
    assert out.count("\n") == 1
    entry = json.loads(out)
    assert entry["level"] == "INFO" and entry["logger"] == "cdc_relay.test_logs"
    assert entry["message"] == "streaming slot=s1 from lsn=0/16B3748"
    assert entry["slot"] == "s1" and entry["lsn"] == "0/16B3748"
    assert entry["ts"].endswith("+00:00")


def test_a_multi_line_message_stays_one_json_line():
    out = emit(JsonFormatter(), "first\nsecond")
    assert out.count("\n") == 1 and json.loads(out)["message"] == "first\nsecond"


def test_secrets_are_redacted_in_both_formats_and_in_fields():
    REDACT.add("hunter2-observe")
    url = "postgresql://relay:s3cr3t@db/app"
    for formatter in (JsonFormatter(), TextFormatter()):
        out = emit(formatter, "cannot connect to %s with hunter2-observe", url, detail=url)
        assert "s3cr3t" not in out and "hunter2-observe" not in out
        assert "***" in out


def test_text_appends_fields_not_already_in_the_message():
    out = emit(TextFormatter(), "confirmed slot=s1 lsn=0/10", slot="s1", lsn="0/10", pid=42)
    assert out.rstrip().endswith("confirmed slot=s1 lsn=0/10 pid=42")
    assert out.count("slot=s1") == 1


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("chosen", "stream", "expected"),
    [
        ("auto", Tty(), "text"),
        ("auto", io.StringIO(), "json"),
        ("json", Tty(), "json"),
        ("text", io.StringIO(), "text"),
    ],
)
def test_auto_means_text_on_a_terminal_and_json_otherwise(chosen, stream, expected):
    assert resolve_format(chosen, stream) == expected
