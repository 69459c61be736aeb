"""The lag sampler: a daemon thread that every few seconds reads the slot's lag in bytes (the
server's WAL position minus ``confirmed_flush_lsn``) and ``wal_status`` over the relay's
connection pool, for the metrics. A failure is logged once and never stops the relay.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from psycopg_pool import ConnectionPool

from cdc_relay.adapters.database import describe_psycopg_error
from cdc_relay.core.stats import RelayStats
from cdc_relay.ops import admin

log = logging.getLogger(__name__)


class LagSampler:
    """Samples at once, then every ``interval`` seconds, until stop()."""

    def __init__(
        self,
        pool: ConnectionPool,
        slot_name: str,
        stats: RelayStats,
        *,
        interval: float,
        probe_broker: Callable[[], None] = lambda: None,
    ) -> None:
        self._pool = pool
        self._slot = slot_name
        self._stats = stats
        self._interval = interval
        self._probe_broker = probe_broker
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="cdc-relay-lag", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            self.sample()
            try:
                self._probe_broker()
            except Exception:  # a probe must never end the sampler
                log.debug("broker probe failed", exc_info=True)
            if self._stop.wait(self._interval):
                return

    def sample(self) -> None:
        stats = self._stats
        try:
            with self._pool.connection(timeout=max(self._interval, 1.0)) as conn:
                slot = admin.fetch_slot(conn, self._slot)
        except Exception as exc:
            stats.lag_sample_errors += 1
            if not self._failing:
                self._failing = True
                log.warning(
                    "cannot sample the lag of slot %s: %s (retrying every %g s)",
                    self._slot,
                    describe_psycopg_error(exc),
                    self._interval,
                    extra={"slot": self._slot},
                )
            return
        if self._failing:
            self._failing = False
            log.info("recovered: sampling the lag of slot %s", self._slot)
        stats.slot_lag_bytes = slot.lag_bytes if slot else None
        stats.slot_wal_status = slot.wal_status if slot else None
        stats.slot_sampled_unix = time.time()
