"""The pure core: bytes and values in, values out. No I/O, no clocks read behind the caller's
back, and no import of psycopg, confluent_kafka, pydantic, socket, select or threading
(import-linter contract in pyproject.toml). Unit-, property- and fuzz-tested without servers.

Its per-event modules may run compiled (mypyc); ``native`` decides which, before any of them is
imported (see native.py)."""

from cdc_relay.core import native as native
