"""One timed run of each contender over the same backlog."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Producer
from psycopg import pq

from bench.workload import AGGREGATE_TYPE, EVENT_TYPE, Workload
from tests.integration.relay_process import RelayProcess, lsn_int, relay_env
from tests.servers import cpu_seconds

PUBLICATION = "cdc_relay"
_XLOG_DATA = ord("w")
_COMMIT = ord("C")
_INSERT = ord("I")
_MESSAGE = ord("M")
_HEADER = 25  # 'w' + start LSN + end LSN + send time


@dataclass(frozen=True)
class Timed:
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def copy_slot(conn: psycopg.Connection[Any], origin: str) -> str:
    """A fresh copy of ``origin``, which stays at the start of the backlog: each run replays
    the same WAL."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    conn.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", (origin, name))
    return name


def drop_slot(conn: psycopg.Connection[Any], name: str) -> None:
    def gone() -> bool:
        rows = conn.execute(
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (name,)
        ).fetchall()
        if not rows:
            return True
        if not rows[0][0]:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
            return True
        return False

    deadline = time.monotonic() + 30
    while not gone():
        if time.monotonic() > deadline:
            raise RuntimeError(f"slot {name} stayed active")
        time.sleep(0.05)


class ConsumerBeside:
    """bench/beside.py in its own process, started before the relay: a consumer reading the
    topic on the same machine while the backlog drains."""

    def __init__(self, bootstrap: str, topic: str, expected: int) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.beside", bootstrap, topic, str(expected)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def finish(self, timeout: float = 300) -> float:
        """Wait until it has read every record; its CPU seconds."""
        out, err = self._proc.communicate(timeout=timeout)
        if self._proc.returncode != 0:
            raise RuntimeError(f"the consumer beside failed: {err.decode()[-2000:]}")
        return float(json.loads(out)["cpu_seconds"])

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(30)


# ------------------------------------------------------------------ (a) ceiling, stream


def stream_ceiling(
    url: str, slot: str, transactions: int, *, messages: bool = False
) -> tuple[Timed, int, int]:
    """Read the pgoutput stream of the backlog and nothing else: stop at its last Commit.
    Returns the timing, the number of events seen (Inserts; with ``messages``, the stream
    carries logical decoding messages too and those are counted instead) and the last Commit's
    end LSN."""
    event = _MESSAGE if messages else _INSERT
    options = f"proto_version '1', publication_names '{PUBLICATION}'"
    if messages:
        options += ", messages 'true'"
    inserts = 0
    commits = 0
    end_lsn = 0
    started = time.perf_counter()
    # No context manager: leaving one would try to COMMIT on a connection in COPY mode.
    conn = psycopg.connect(url, autocommit=True, replication="database")
    try:
        pg = conn.pgconn
        pg.send_query(f"START_REPLICATION SLOT {slot} LOGICAL 0/0 ({options})".encode())
        result = pg.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            raise RuntimeError(f"START_REPLICATION failed: {pg.get_error_message()}")
        while commits < transactions:
            nbytes, data = pg.get_copy_data(0)
            if nbytes <= 0:
                raise RuntimeError(f"replication ended: {pg.get_error_message()}")
            if data[0] != _XLOG_DATA:
                continue
            kind = data[_HEADER]
            if kind == event:
                inserts += 1
            elif kind == _COMMIT:
                commits += 1
                end_lsn = int.from_bytes(data[_HEADER + 10 : _HEADER + 18], "big")
        seconds = time.perf_counter() - started
    finally:
        conn.close()
    return Timed(inserts, seconds), inserts, end_lsn


# ------------------------------------------------------------------ (b) ceiling, broker


def broker_ceiling(config: dict[str, Any], workload: Workload, topic: str) -> Timed:
    """A bare producer: the same number of records, sizes, keys and headers as the relay
    produces, with its settings; done when every delivery report is in."""
    aggregates = workload.aggregates
    keys = [f"a-{i}".encode() for i in range(aggregates)]
    values = [
        b'{"pad": "' + b"x" * workload.pad + b'", "seq": ' + str(100_000 + i).encode() + b"}"
        for i in range(aggregates)
    ]
    ids = [str(uuid.uuid4()).encode() for _ in range(aggregates)]
    event_type, agg_type = EVENT_TYPE.encode(), AGGREGATE_TYPE.encode()
    delivered = [0, 0]

    def on_delivery(err: Any, msg: Any) -> None:
        delivered[0 if err is None else 1] += 1

    started = time.perf_counter()
    producer = Producer(config)
    timestamp = int(time.time() * 1000)
    for n in range(workload.events):
        i = n % aggregates
        headers: list[tuple[str, str | bytes | None]] = [
            ("id", ids[i]),
            ("event_type", event_type),
            ("aggregate_type", agg_type),
        ]
        while True:
            try:
                producer.produce(
                    topic,
                    values[i],
                    keys[i],
                    headers=headers,
                    timestamp=timestamp,
                    on_delivery=on_delivery,
                )
                break
            except BufferError:
                producer.poll(0.05)
        if n % 1000 == 999:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("the bare producer did not get every delivery report")
    seconds = time.perf_counter() - started
    if delivered != [workload.events, 0]:
        raise RuntimeError(f"bare producer: delivered/failed = {delivered}")
    return Timed(workload.events, seconds)


# ------------------------------------------------------------------ (c) cdc-relay


@dataclass(frozen=True)
class RelayRun:
    timed: Timed
    peak_rss_mb: float
    published: int
    cpu_seconds: float  # user + system time of the relay process, all threads
    main_thread_cpu_seconds: float  # the relay's Python thread (the rest is librdkafka's)
    walsender_cpu_seconds: float  # the walsender that decoded for it
    broker_cpu_seconds: float  # the broker, over the run
    startup_seconds: float  # from process start until its walsender was streaming
    # CPU seconds of the relay (all threads, and its Python thread) by then: imports,
    # connections, checks; subtracted for the per-event cost of streaming itself.
    startup_cpu_seconds: float = 0.0
    startup_main_cpu_seconds: float = 0.0


_PUBLISHED = re.compile(r"published=(\d+)")

# A library preloaded into every relay the bench starts (``--relay-preload``: an allocator, as a
# deployment may preload one), and into nothing else it starts; "" for none.
relay_preload = ""


def relay_env_for(
    url: str, bootstrap: str, *, slot: str, topic_prefix: str, kafka_config: str
) -> dict[str, str]:
    settings: dict[str, str] = {
        "slot_name": slot,
        "publication_name": PUBLICATION,
        "topic_template": f"{topic_prefix}.{{aggregate_type}}",
        "dead_letter_topic": f"{topic_prefix}.dead-letter",
        "status_interval_seconds": "0.05",
    }
    if kafka_config:
        settings["kafka_config"] = kafka_config
    env = relay_env(url, bootstrap, **settings)
    if relay_preload:
        env["LD_PRELOAD"] = relay_preload
    return env


def relay_drain(
    url: str,
    env: dict[str, str],
    *,
    slot: str,
    end_lsn: int,
    expected: int,
    timeout: float,
    profile: Path | None = None,
    broker_pid: int | None = None,
) -> RelayRun:
    """`cdc-relay run` from start until the slot is confirmed past ``end_lsn`` (it only
    confirms after every record before it is acknowledged)."""
    relay = RelayProcess(env)
    try:
        return _relay_drain(relay, url, slot, end_lsn, expected, timeout, profile, broker_pid)
    finally:
        relay.kill()
        relay.log_path.unlink(missing_ok=True)


def _relay_drain(
    relay: RelayProcess,
    url: str,
    slot: str,
    end_lsn: int,
    expected: int,
    timeout: float,
    profile: Path | None,
    broker_pid: int | None,
) -> RelayRun:
    broker_cpu = cpu_seconds(broker_pid) if broker_pid else 0.0
    walsender_cpu = 0.0
    startup: float | None = None
    startup_cpu = startup_main_cpu = 0.0
    spy: subprocess.Popen[bytes] | None = None
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        relay.start()
        if profile is not None:
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(relay.pid),
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--output",
                    str(profile),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        deadline = started + timeout
        while True:
            row = conn.execute(
                "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (slot,),
            ).fetchone()
            if startup is None and row and row[1]:
                startup = time.perf_counter() - started
                startup_cpu = cpu_seconds(relay.pid)
                startup_main_cpu = cpu_seconds(relay.pid, thread=relay.pid)
            if row and row[0] and lsn_int(str(row[0])) >= end_lsn:
                if row[1]:
                    walsender_cpu = cpu_seconds(int(row[1]))
                break
            if not relay.running():
                raise RuntimeError(f"the relay exited early:\n{relay.log()[-3000:]}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the relay did not drain in {timeout:.0f} s")
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        rss = relay.peak_rss_mb()
        cpu = cpu_seconds(relay.pid)
        main_cpu = cpu_seconds(relay.pid, thread=relay.pid)
        if broker_pid:
            broker_cpu = cpu_seconds(broker_pid) - broker_cpu
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            spy.wait(60)
        code = relay.stop()
        log = relay.log()
    counts = _PUBLISHED.findall(log)
    published = int(counts[-1]) if counts else -1
    if code != 0 or published != expected:
        raise RuntimeError(
            f"relay exit code {code}, published {published} of {expected}:\n{log[-3000:]}"
        )
    return RelayRun(
        Timed(expected, seconds),
        rss,
        published,
        cpu,
        main_cpu,
        walsender_cpu,
        broker_cpu,
        startup or seconds,
        startup_cpu,
        startup_main_cpu,
    )


# ------------------------------------------------------------------ (d) polling relay


def polling_command(
    url: str,
    bootstrap: str,
    *,
    topic_prefix: str,
    batch: int,
    kafka_config: str,
    drain: bool,
    poll_interval: float = 0.1,
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "bench.polling",
        "--url",
        url,
        "--bootstrap",
        bootstrap,
        "--topic-prefix",
        topic_prefix,
        "--batch",
        str(batch),
        "--kafka-config",
        kafka_config or "{}",
        "--poll-interval",
        str(poll_interval),
    ]
    return [*cmd, "--drain"] if drain else cmd


def polling_drain(
    url: str, bootstrap: str, *, topic_prefix: str, batch: int, kafka_config: str, expected: int
) -> Timed:
    cmd = polling_command(
        url,
        bootstrap,
        topic_prefix=topic_prefix,
        batch=batch,
        kafka_config=kafka_config,
        drain=True,
    )
    started = time.perf_counter()
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=1800, cwd=_project_root(), check=False
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0 or f"published={expected}" not in done.stdout:
        raise RuntimeError(f"polling relay failed: {done.stdout[-500:]} {done.stderr[-3000:]}")
    return Timed(expected, seconds)


def _project_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="cdc-relay-bench-"))
