"""Names of database objects as the relay's settings spell them."""

from __future__ import annotations


def split_table_name(qualified: str) -> tuple[str, str]:
    """Split ``schema.table`` (default schema public); names are taken literally, no quoting."""
    parts = qualified.split(".")
    if len(parts) == 1:
        parts = ["public", parts[0]]
    if len(parts) != 2 or not all(parts) or any('"' in p or "\x00" in p for p in parts):
        raise ValueError("must be a table name, optionally schema-qualified (schema.table)")
    return parts[0], parts[1]
