"""Logging setup, and the redaction that keeps secrets out of every log line and error.

Two formats, one event per line: readable text, or one JSON object (ts, level, logger,
message, then the structured fields given with ``extra=``, such as slot and lsn). Both go
through the same redaction.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", re.IGNORECASE)
_DSN_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


class Redactor:
    """Replaces known secrets, URL passwords and ``password=`` values with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True)

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= 3 and secret not in self._secrets:
            self._secrets = sorted([*self._secrets, secret], key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = _URL_PASSWORD.sub(r"\g<head>***@", text)
        return _DSN_PASSWORD.sub(r"\g<head>***", text)


REDACT = Redactor()


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = REDACT(message)
        if record.exc_info and record.exc_info[1] is not None:
            # Tracebacks (only with --debug) go through the formatter; clean their text too.
            record.exc_text = REDACT(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        record.msg, record.args = cleaned, None
        return True


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record (its ``extra=``), redacted when they are text."""
    return {
        key: REDACT(value) if isinstance(value, str) else value
        for key, value in vars(record).items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value …``; fields already in the message are not
    repeated."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        message = record.getMessage()
        extra = [
            f"{key}={value}"
            for key, value in extra_fields(record).items()
            if f"{key}={value}" not in message
        ]
        if not extra:
            return line
        head, sep, tail = line.partition("\n")  # a traceback stays below the fields
        return f"{head} {' '.join(extra)}{sep}{tail}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_text:
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = REDACT(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


LogFormat = Literal["auto", "text", "json"]


def resolve_format(log_format: LogFormat, stream: TextIO) -> Literal["text", "json"]:
    """auto: text on a terminal, JSON otherwise (a container, a file, a pipe)."""
    if log_format != "auto":
        return log_format
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def configure_logging(*, debug: bool, log_format: LogFormat = "auto") -> None:
    stream = sys.stderr
    handler = logging.StreamHandler(stream)
    chosen = resolve_format(log_format, stream)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    handler.addFilter(_RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # The pool logs every failed reconnect attempt; the relay logs the state change itself.
    logging.getLogger("psycopg.pool").setLevel(logging.DEBUG if debug else logging.ERROR)
    # librdkafka's log repeats what the producer's error callback reports, once per attempt.
    logging.getLogger("cdc_relay.librdkafka").setLevel(logging.DEBUG if debug else logging.CRITICAL)
