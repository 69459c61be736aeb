"""The SQL recipes shipped inside the package (cdc_relay/sql/, also linked from sql/ in the
repository), so that an installed wheel can run them: ``psycopg.connect(...).execute(read(...))``.
"""

from __future__ import annotations

from importlib import resources

RECIPES = (
    "add_event.sql",
    "control.sql",
    "inbox.sql",
    "outbox_hash.sql",
    "outbox_partitioned.sql",
    "roles.sql",
)


def read(name: str) -> str:
    """The text of one SQL file of cdc_relay/sql/ (e.g. ``"inbox.sql"``)."""
    return resources.files("cdc_relay").joinpath("sql", name).read_text("utf-8")
