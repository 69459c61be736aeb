"""The SQL recipes shipped inside the package (cdc_relay/sql/, also linked from sql/ in the
repository), so that an installed wheel can run them: ``psycopg.connect(...).execute(read(...))``.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from psycopg import sql

RECIPES = (
    "add_event.sql",
    "control.sql",
    "emit_event.sql",
    "inbox.sql",
    "outbox_hash.sql",
    "outbox_partitioned.sql",
    "roles.sql",
)


def read(name: str) -> str:
    """The text of one SQL file of cdc_relay/sql/ (e.g. ``"inbox.sql"``)."""
    return resources.files("cdc_relay").joinpath("sql", name).read_text("utf-8")


def composed(name: str, **params: Any) -> sql.Composed:
    """One recipe with its ``{placeholders}`` filled in (psycopg ``sql`` objects), its comment
    lines dropped: a ``psycopg.sql.Composed`` to execute."""
    from psycopg import sql

    body = "\n".join(line for line in read(name).splitlines() if not line.startswith("--"))
    return sql.SQL(body).format(**params)
