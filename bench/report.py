"""Pure parts of the benchmark: medians, percentiles, the markdown table, profile summaries."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of nothing")
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (the smallest value with at least pct% of values at or below)."""
    if not values:
        raise ValueError("percentile of nothing")
    if not 0 < pct <= 100:
        raise ValueError("pct must be in (0, 100]")
    ordered = sorted(values)
    rank = math.ceil(pct / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]


@dataclass(frozen=True)
class Latency:
    """Milliseconds from commit to visible in Kafka."""

    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    # The relay's CPU over the steady writes, in % of one core (all its threads), when measured.
    cpu_percent: float | None = None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        ms = [s * 1000 for s in seconds]
        return cls(len(ms), percentile(ms, 50), percentile(ms, 99), max(ms))

    def cell(self) -> str:
        return f"{self.p50_ms:.1f} / {self.p99_ms:.1f} / {self.max_ms:.1f}"


@dataclass
class Row:
    """One line of the table: a contender and what was measured of it."""

    name: str
    rates: list[float] = field(default_factory=list)  # events/s of each repetition
    note: str = ""
    latency: Latency | None = None
    rss_mb: float | None = None
    cpu_us: dict[str, float] = field(default_factory=dict)  # CPU µs/event of each process

    @property
    def rate(self) -> float | None:
        return median(self.rates) if self.rates else None


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}"


def render_table(rows: Sequence[Row], *, ceiling: str, polling: str) -> str:
    """The markdown table; ratios are against the first rows whose names start with
    ``ceiling`` and ``polling``."""
    base = next((row.rate for row in rows if row.name.startswith(ceiling)), None)
    poll = next((row.rate for row in rows if row.name.startswith(polling)), None)
    lines = [
        "| contender | events/s (median) | runs | ratio to (a) | ratio to (d) "
        "| latency p50 / p99 / max ms | peak RSS MB | notes |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        rate = row.rate
        lines.append(
            "| "
            + " | ".join(
                [
                    row.name,
                    f"{rate:,.0f}" if rate is not None else "-",
                    ", ".join(f"{r:,.0f}" for r in row.rates) or "-",
                    _ratio(rate, base),
                    _ratio(rate, poll),
                    row.latency.cell() if row.latency else "-",
                    f"{row.rss_mb:.0f}" if row.rss_mb is not None else "-",
                    row.note,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


_LINE = re.compile(r":\d+\)$")


def top_self_time(collapsed: Iterable[str], limit: int = 15) -> list[tuple[str, float]]:
    """From py-spy's collapsed stacks ("frame;frame;leaf count" lines), the leaf frames with
    the largest share of samples (self time), as (frame, percent)."""
    counts: Counter[str] = Counter()
    total = 0
    for line in collapsed:
        line = line.strip()
        if not line:
            continue
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        # Per function, not per line: "decode (cdc_relay/pgoutput.py:807)" → "... .py)".
        leaf = _LINE.sub(")", stack.rsplit(";", 1)[-1])
        counts[leaf] += count
        total += count
    if not total:
        return []
    return [(frame, 100.0 * n / total) for frame, n in counts.most_common(limit)]


# ------------------------------------------------------------------ bench.scale_out


@dataclass(frozen=True)
class SlotRun:
    """One repetition of a bench.scale_out case: every walsender's CPU seconds and the
    Inserts its stream carried, all streaming the same backlog at once."""

    walsender_cpu: tuple[float, ...]
    inserts: tuple[int, ...]
    seconds: float  # wall clock, the first stream's start to the last one's end
    relay_cpu: tuple[float, ...] = ()  # each relay process's, when cdc-relay read the streams


@dataclass
class SlotCase:
    """N slots streaming the same backlog concurrently; each publication covers ``covers``."""

    slots: int
    covers: str  # e.g. "the whole outbox", "1/4 of it", "none of it"
    runs: list[SlotRun] = field(default_factory=list)

    def per_slot_cpu(self) -> float:
        """Median over runs of the mean walsender CPU seconds."""
        return median([sum(r.walsender_cpu) / len(r.walsender_cpu) for r in self.runs])

    def total_cpu(self) -> float:
        return median([sum(r.walsender_cpu) for r in self.runs])

    def relay_cpu(self) -> float | None:
        """Median over runs of all relays' CPU seconds together (None: no relays ran)."""
        if not all(r.relay_cpu for r in self.runs):
            return None
        return median([sum(r.relay_cpu) for r in self.runs])

    def sent(self) -> int:
        """Inserts sent by all streams together (the same in every run)."""
        return sum(self.runs[0].inserts)


def scale_out_table(cases: Sequence[SlotCase], *, events: int, wal_bytes: int) -> str:
    """Walsender CPU per event of the backlog and per MB of its WAL: per slot, and for all
    slots together; plus per event actually sent, the ratio of the total to one slot streaming
    everything (the first case with one slot), the relays' CPU per event when cdc-relay read
    the streams, and the wall time from the first stream's start to the last one's end."""
    mb = wal_bytes / 1e6
    base = next((c.total_cpu() for c in cases if c.slots == 1 and c.sent() == events), None)
    lines = [
        "| slots | each publication carries | walsender CPU per slot, µs/event | per slot, "
        "µs/MB of WAL | all slots, µs/event | all slots, µs/MB of WAL | all slots, µs per "
        "event sent | total vs 1 slot | relays, µs/event | wall s (median) | events/s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        per_slot, total = case.per_slot_cpu(), case.total_cpu()
        sent, relays = case.sent(), case.relay_cpu()
        seconds = median([r.seconds for r in case.runs])
        lines.append(
            "| "
            + " | ".join(
                [
                    str(case.slots),
                    case.covers,
                    f"{per_slot / events * 1e6:.2f}",
                    f"{per_slot / mb * 1e6:,.0f}",
                    f"{total / events * 1e6:.2f}",
                    f"{total / mb * 1e6:,.0f}",
                    f"{total / sent * 1e6:.2f}" if sent else "-",
                    f"{total / base:.2f}" if base else "-",
                    f"{relays / events * 1e6:.2f}" if relays is not None else "-",
                    f"{seconds:.1f}",
                    f"{events / seconds:,.0f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)
