"""`make demo`: see events flow from a business transaction to Kafka, and the slot advance.

Starts a throw-away PostgreSQL (wal_level=logical) and a local Kafka-protocol broker (Tansu),
runs `cdc-relay setup --create-table` and `cdc-relay run`, commits orders together with their
outbox events, consumes the topic, and stops everything it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdc_relay.outbox import add_event  # noqa: E402
from tests.kafka_helpers import consume_all  # noqa: E402
from tests.servers import PostgresServer, TansuBroker, free_port, wait_until  # noqa: E402

ORDERS = 12
CUSTOMERS = ["alice", "bob", "chen"]


def say(text: str = "") -> None:
    print(text, flush=True)


def cdc_relay(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cdc_relay", *args], env=env, text=True, capture_output=True
    )
    if done.returncode != 0:
        raise SystemExit(f"cdc-relay {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def slot_json(env: dict[str, str]) -> dict[str, object]:
    slot: dict[str, object] = json.loads(cdc_relay(env, "status", "--json"))["slot"]
    return slot


def place_orders(pg: PostgresServer) -> None:
    """Each order and its OrderPlaced event commit in one transaction: no dual write."""
    with pg.connect(dbname="shop") as conn:
        conn.autocommit = False
        for n in range(ORDERS):
            customer = CUSTOMERS[n % len(CUSTOMERS)]
            order_id = f"order-{n + 1:03d}"
            total = 10 + 7.5 * n
            with conn.transaction():
                conn.execute(
                    "INSERT INTO orders (id, customer, total) VALUES (%s, %s, %s)",
                    (order_id, customer, total),
                )
                add_event(
                    conn,
                    aggregate_type="order",
                    aggregate_id=order_id,
                    event_type="OrderPlaced",
                    payload={"order": order_id, "customer": customer, "total": total},
                    headers={"source": "demo-shop"},
                )
        # A business transaction that rolls back publishes nothing.
        try:
            with conn.transaction():
                conn.execute("INSERT INTO orders VALUES ('order-bad', 'mallory', -1)")
                add_event(
                    conn,
                    aggregate_type="order",
                    aggregate_id="order-bad",
                    event_type="OrderPlaced",
                    payload={},
                )
                raise RuntimeError("payment declined")
        except RuntimeError:
            pass


def main() -> int:
    say("== cdc-relay demo: PostgreSQL outbox → WAL → Kafka ==")
    with PostgresServer() as pg, TansuBroker() as broker:
        say(
            f"started PostgreSQL on port {pg.port} (wal_level=logical) and a Kafka-protocol "
            f"broker on {broker.bootstrap}"
        )
        pg.create_database("shop")
        pg.execute(
            "CREATE TABLE orders (id text PRIMARY KEY, customer text NOT NULL, total numeric)",
            dbname="shop",
        )
        env = {
            **os.environ,
            "CDC_RELAY_DATABASE_URL": pg.url(dbname="shop"),
            "CDC_RELAY_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "CDC_RELAY_STATUS_INTERVAL_SECONDS": "0.5",
            "CDC_RELAY_HTTP_PORT": str(free_port()),
            "CDC_RELAY_LOG_FORMAT": "text",
        }
        say("\n$ cdc-relay setup --create-table")
        say(cdc_relay(env, "setup", "--create-table").rstrip())
        before = slot_json(env)

        say("\n$ cdc-relay run   (in the background)")
        relay = subprocess.Popen([sys.executable, "-m", "cdc_relay", "run"], env=env)
        try:
            say(
                f"\nplacing {ORDERS} orders, each with its outbox event in the same transaction,"
                " and one that rolls back"
            )
            place_orders(pg)
            records = consume_all(
                broker.bootstrap, ["outbox.event.order"], expected=ORDERS, timeout=60
            )
            say(f"\nconsumed {len(records)} events from topic outbox.event.order:")
            for r in records:
                payload = (r.value or b"").decode()
                key = (r.key or b"").decode()
                event_id = (r.header("id") or b"").decode()[:8]
                say(
                    f"  partition {r.partition} offset {r.offset:>2}  key={key:<10} "
                    f"id={event_id}…  {payload}"
                )
            if len(records) != ORDERS:
                raise SystemExit(f"expected {ORDERS} events, got {len(records)}")
            after = wait_until(
                lambda: (
                    (s := slot_json(env))["confirmed_flush_lsn"] != before["confirmed_flush_lsn"]
                    and s
                ),
                timeout=30,
                message="the slot did not advance",
            )
            say(
                f"\nslot {after['slot_name']}: confirmed_flush_lsn {before['confirmed_flush_lsn']}"
                f" → {after['confirmed_flush_lsn']} (lag {after['lag_bytes']} bytes): the relay "
                "confirmed only what Kafka acknowledged"
            )
            metrics_url = f"http://127.0.0.1:{env['CDC_RELAY_HTTP_PORT']}/metrics"
            say(f"\n$ curl {metrics_url}   (a few of the relay's metrics)")
            with urllib.request.urlopen(metrics_url, timeout=10) as response:
                for line in response.read().decode().splitlines():
                    if line.startswith(
                        ("cdc_relay_events_published_total", "cdc_relay_confirmed_lsn_bytes")
                    ):
                        say(f"  {line}")
        finally:
            relay.send_signal(signal.SIGTERM)
            try:
                relay.wait(timeout=60)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait()
        say(f"relay stopped (exit code {relay.returncode})")
    say("stopped PostgreSQL and the broker. Done.")
    return 0 if relay.returncode == 0 else 1


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"({time.monotonic() - started:.1f} s)")
    raise SystemExit(code)
