"""Durations as operators write them (``90s``, ``30m``, ``12h``, ``7d``, ``2w``): prune's
``--older-than`` and ``--wait``, CDC_RELAY_CLAIM_CHECK_RETENTION."""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w`` → timedelta; anything else → ValueError."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(
            f"{text!r} is not a duration: write a whole number and a unit, e.g. 90s, 30m, 12h, 7d"
        )
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])
