"""Logging setup, and the redaction that keeps secrets out of every log line and error."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

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


def configure_logging(*, debug: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(_RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # The pool logs every failed reconnect attempt; the relay logs the state change itself.
    logging.getLogger("psycopg.pool").setLevel(logging.DEBUG if debug else logging.ERROR)
    # librdkafka's log repeats what the producer's error callback reports, once per attempt.
    logging.getLogger("cdc_relay.librdkafka").setLevel(logging.DEBUG if debug else logging.CRITICAL)
