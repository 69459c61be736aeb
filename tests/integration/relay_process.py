"""Drive the relay as users do: the `cdc-relay` command in a subprocess, configured by env."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psycopg

from tests.servers import wait_until

SLOT = "cdc_relay"


# Not settings: which implementation runs (cdc_relay/core/native.py, adapters/native_acks.py).
IMPLEMENTATION_SWITCHES = frozenset(
    {
        "CDC_RELAY_PURE_PYTHON",
        "CDC_RELAY_ACKS_BY_CALLBACKS",
        "CDC_RELAY_ROWS_IN_PYTHON",
        "CDC_RELAY_READ_IN_PYTHON",
    }
)


def relay_env(database_url: str, bootstrap: str | None, **settings: Any) -> dict[str, str]:
    """A clean environment: only the CDC_RELAY_* settings given, plus PATH and friends, and the
    switches that choose an implementation rather than a setting (the pure-Python core, the
    acknowledgement callbacks), which the relay under test inherits."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CDC_RELAY_") or k in IMPLEMENTATION_SWITCHES
    }
    env["CDC_RELAY_DATABASE_URL"] = database_url
    if bootstrap:
        env["CDC_RELAY_KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    env.setdefault("CDC_RELAY_STATUS_INTERVAL_SECONDS", "0.2")
    # Many relays run side by side in the tests: no HTTP endpoint unless a test asks for one
    # (on a free port), and readable log lines unless a test asks for JSON.
    env.setdefault("CDC_RELAY_HTTP_PORT", "0")
    env.setdefault("CDC_RELAY_LOG_FORMAT", "text")
    for name, value in settings.items():
        env[f"CDC_RELAY_{name.upper()}"] = str(value)
    return env


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc_relay", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
        cwd=tempfile.gettempdir(),  # no stray .env file
    )


class RelayProcess:
    """`cdc-relay run` in the background; stopped by its PID whatever happens."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.env = env
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        handle, name = tempfile.mkstemp(prefix="cdc-relay-run-", suffix=".log")
        os.close(handle)
        self.log_path = Path(name)

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.log_path.unlink(missing_ok=True)

    def start(self) -> RelayProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cdc_relay", *self.args, "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tempfile.gettempdir(),
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for a clean exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the relay can tell."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def peak_rss_mb(self) -> float:
        """Peak resident memory so far (VmHWM), read while the process runs."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM in /proc status")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


# --------------------------------------------------------------------------- database side


def execute(url: str, query: str, params: Iterable[Any] | None = None) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(query, params)  # type: ignore[arg-type]


def query(url: str, text: str, params: Iterable[Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(text, params).fetchall()  # type: ignore[arg-type]


def current_lsn(url: str) -> int:
    return lsn_int(query(url, "SELECT pg_current_wal_lsn()::text")[0][0])


def lsn_int(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def confirmed_lsn(url: str, slot: str = SLOT) -> int:
    rows = query(
        url,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    assert rows, f"slot {slot} does not exist"
    return lsn_int(rows[0][0])


def slot_active(url: str, slot: str = SLOT) -> bool:
    rows = query(url, "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    return bool(rows and rows[0][0])


def wait_confirmed_past(url: str, lsn: int, timeout: float = 60, slot: str = SLOT) -> None:
    wait_until(
        lambda: confirmed_lsn(url, slot) >= lsn,
        timeout,
        message=lambda: f"slot {slot} not confirmed past {lsn:X} (at {confirmed_lsn(url, slot):X})",
    )


def insert_events(
    url: str,
    *,
    count: int,
    per_txn: int = 10,
    aggregates: int = 100,
    aggregate_type: str = "order",
    start: int = 0,
    table: str = "outbox",
) -> int:
    """Insert ``count`` events in transactions of ``per_txn``; aggregate ``a-<n % aggregates>``;
    payload {"seq": n, ...}. Returns the WAL position after the last commit."""
    with psycopg.connect(url, autocommit=True) as conn:
        for first in range(start, start + count, per_txn):
            last = min(first + per_txn, start + count)
            conn.execute(
                f"INSERT INTO {table} (id, aggregate_type, aggregate_id, event_type, payload) "
                "SELECT gen_random_uuid(), %s, 'a-' || (n %% %s::int), 'Tested', "
                "jsonb_build_object('seq', n, 'pad', repeat('x', 200)) "
                "FROM generate_series(%s::int, %s::int) AS n",
                (aggregate_type, aggregates, first, last - 1),
            )
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        return lsn_int(row[0])
