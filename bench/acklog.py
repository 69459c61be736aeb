"""Ack times for the latency runs: each delivery report's wall-clock time, by event seq.

Both relays note the time their delivery callback saw each acknowledgement and write
``<seq> <unix time>`` lines to a file when they exit; the bench subtracts the commit time.
The acknowledgement seen by the producer is the honest end of the interval: a consumer would add
its own fetch path (20-50 ms on Tansu, the first broker of the bench), and log-append timestamps
are the broker's clock, not the relay's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

_SEQ = re.compile(rb'"seq": (\d+)')


class AckLog:
    """Collects (value, time) on the hot path; parses the seq only when written out."""

    __slots__ = ("entries", "path")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: list[tuple[bytes | None, float]] = []

    def write(self) -> None:
        self.path.write_text("".join(format_lines(self.entries)))


def format_lines(entries: Iterable[tuple[bytes | None, float]]) -> Iterable[str]:
    for value, at in entries:
        found = _SEQ.search(value or b"")
        if found:
            yield f"{int(found.group(1))} {at:.6f}\n"


def read(path: str | Path) -> dict[int, float]:
    acks: dict[int, float] = {}
    for line in Path(path).read_text().splitlines():
        seq, at = line.split()
        acks.setdefault(int(seq), float(at))  # the first ack counts (a replay would be later)
    return acks
