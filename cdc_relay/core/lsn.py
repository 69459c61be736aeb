"""Log sequence numbers: the 64-bit WAL positions PostgreSQL prints as ``X/Y``."""

from __future__ import annotations

from typing import NewType

Lsn = NewType("Lsn", int)


def format_lsn(lsn: int) -> str:
    """Render an LSN the way PostgreSQL does (``16/B374D848``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> Lsn:
    """Parse PostgreSQL's ``X/Y`` notation; raises ValueError on anything else."""
    high, sep, low = text.strip().partition("/")
    if not sep or not high or not low:
        raise ValueError(f"not an LSN: {text!r}")
    hi, lo = int(high, 16), int(low, 16)
    if not (0 <= hi <= 0xFFFFFFFF and 0 <= lo <= 0xFFFFFFFF):
        raise ValueError(f"not an LSN: {text!r}")
    return Lsn((hi << 32) | lo)
