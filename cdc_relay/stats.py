"""Counters of a relay's life, logged at shutdown (and the base of future metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RelayStats:
    published: int = 0
    dead_lettered: int = 0
    sessions: int = 0
    resets: int = 0
    confirmed_lsn: int = 0
    reconnects_by_cause: dict[str, int] = field(default_factory=dict)

    def count_reconnect(self, cause: str) -> None:
        self.reconnects_by_cause[cause] = self.reconnects_by_cause.get(cause, 0) + 1
