"""Smoke tests that pin the integration harness itself (servers, proxy, helpers)."""

from __future__ import annotations

import socket
import threading
import time

import psycopg
import pytest
from confluent_kafka import Producer

from tests.conftest import ProxiedKafka
from tests.kafka_helpers import by_partition, consume_all, count_records, create_topic, list_topics
from tests.kafka_servers import KafkaBroker
from tests.servers import PgClientMixin, PostgresServer, TcpProxy, free_port, wait_until

# --------------------------------------------------------------------------- PostgreSQL


def test_pg_is_logical_and_accepts_a_replication_connection(pg: PgClientMixin, db: str) -> None:
    assert pg.query("SHOW wal_level") == [("logical",)]
    with psycopg.connect(db + "?replication=database", autocommit=True) as conn:
        rows = conn.execute("IDENTIFY_SYSTEM").fetchall()
    assert len(rows) == 1
    systemid, timeline, xlogpos, dbname = rows[0]
    assert systemid and int(timeline) >= 1 and "/" in xlogpos
    assert dbname == db.rsplit("/", 1)[1]


def test_wrong_password_fails(pg: PgClientMixin) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.url(password="not-the-password"), connect_timeout=10).close()


def test_db_fixture_drops_database_with_a_slot(pg: PgClientMixin) -> None:
    name = f"t_slotdrop_{free_port()}"
    url = pg.create_database(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    with psycopg.connect(url + "?replication=database", autocommit=True) as repl:
        repl.execute("IDENTIFY_SYSTEM")
        pg.drop_database(name)  # with a replication connection still open
    assert pg.query("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)) == [(0,)]
    assert pg.query("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (name,)) == [
        (0,)
    ]


@pytest.mark.pg_restart
def test_immediate_restart_comes_back_on_the_same_port(
    restartable_pg: PostgresServer, db: str
) -> None:
    pg = restartable_pg
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 100)")
    port, pid = pg.port, pg.pid
    started = time.monotonic()
    pg.restart(mode="immediate")
    elapsed = time.monotonic() - started
    assert pg.port == port and pg.pid is not None and pg.pid != pid
    with psycopg.connect(db, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (100,)
    assert elapsed < 10, f"restart took {elapsed:.1f}s"


@pytest.mark.pg_restart
def test_a_connection_sees_the_server_going_away(restartable_pg: PostgresServer, db: str) -> None:
    pg = restartable_pg
    conn = psycopg.connect(db, autocommit=True)
    try:
        pg.stop("fast")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
        pg.start()
    assert pg.query("SELECT 1") == [(1,)]


# --------------------------------------------------------------------------- Kafka


def _producer(bootstrap: str, **extra: object) -> Producer:
    conf = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "log_level": 3,
    }
    conf.update(extra)
    return Producer(conf)


def test_idempotent_producer_round_trip(kafka: str, topic_name: str) -> None:
    create_topic(kafka, topic_name, partitions=3)
    assert topic_name in list_topics(kafka)
    n = 1000
    base_ts = 1_700_000_000_000
    reports: list[tuple[object, int, int]] = []

    def on_delivery(err: object, msg: object) -> None:
        reports.append((err, msg.partition(), msg.offset()))  # type: ignore[attr-defined]

    p = _producer(kafka)
    for i in range(n):
        p.produce(
            topic_name,
            key=f"key-{i % 17}".encode(),
            value=f'{{"seq": {i}}}'.encode(),
            headers=[("seq", str(i).encode()), ("kind", b"test"), ("empty", b"")],
            timestamp=base_ts + i,
            on_delivery=on_delivery,
        )
        p.poll(0)
    assert p.flush(30) == 0
    assert len(reports) == n and all(err is None for err, _, _ in reports)

    started = time.monotonic()
    records = consume_all(kafka, [topic_name], expected=n, timeout=30)
    elapsed = time.monotonic() - started
    assert len(records) == n
    assert len({(r.partition, r.offset) for r in records}) == n
    assert elapsed < 10, f"consume_all took {elapsed:.1f}s for {n} records"

    seen_partition: dict[bytes, int] = {}
    last_seq: dict[bytes, int] = {}
    for (topic, _partition), recs in by_partition(records).items():
        assert topic == topic_name
        assert [r.offset for r in recs] == sorted(r.offset for r in recs)
    for r in records:
        assert r.key is not None and r.value is not None
        seq = int(r.header("seq") or b"")
        assert r.value == f'{{"seq": {seq}}}'.encode()
        assert r.key == f"key-{seq % 17}".encode()
        assert r.headers == [("seq", str(seq).encode()), ("kind", b"test"), ("empty", b"")]
        assert r.timestamp_ms == base_ts + seq
        # same key: same partition, in production order
        assert seen_partition.setdefault(r.key, r.partition) == r.partition
        assert seq > last_seq.get(r.key, -1)
        last_seq[r.key] = seq


def test_consume_all_waits_for_a_topic_that_appears_later(kafka: str, topic_name: str) -> None:
    assert topic_name not in list_topics(kafka)

    def produce_later() -> None:
        time.sleep(0.5)  # the point: the topic does not exist when consume_all starts
        p = _producer(kafka)
        p.produce(topic_name, key=b"k", value=b"v")
        p.flush(10)

    t = threading.Thread(target=produce_later)
    t.start()
    try:
        records = consume_all(kafka, [topic_name], expected=1, timeout=20)
    finally:
        t.join()
    assert [(r.key, r.value) for r in records] == [(b"k", b"v")]
    # with expected=None it returns after `idle` seconds of silence
    started = time.monotonic()
    assert len(consume_all(kafka, [topic_name], idle=1.0, timeout=20)) == 1
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("refuse", [False, True], ids=["blackhole", "refuse"])
def test_proxy_cut_stalls_deliveries_and_restore_completes_them(
    proxied_kafka: ProxiedKafka, topic_name: str, refuse: bool
) -> None:
    proxy = proxied_kafka.proxy
    bootstrap = proxied_kafka.bootstrap
    assert bootstrap.endswith(f":{proxy.port}")
    delivered: list[object] = []
    failed: list[object] = []

    def on_delivery(err: object, msg: object) -> None:
        (failed if err is not None else delivered).append(msg)

    p = _producer(bootstrap, **{"message.timeout.ms": 60_000, "reconnect.backoff.max.ms": 500})
    for i in range(10):
        p.produce(topic_name, key=b"k", value=f"before-{i}".encode(), on_delivery=on_delivery)
    assert p.flush(15) == 0
    assert len(delivered) == 10 and not failed
    assert proxy.bytes_up > 0 and proxy.bytes_down > 0

    proxy.cut(refuse=refuse)
    assert proxy.active_connections == 0
    for i in range(10):
        p.produce(topic_name, key=b"k", value=f"during-{i}".encode(), on_delivery=on_delivery)
    stall_until = time.monotonic() + 3.0  # a negative check: nothing may arrive meanwhile
    while time.monotonic() < stall_until:
        p.poll(0.1)
    assert len(delivered) == 10 and not failed, "deliveries completed through a cut link"
    if not refuse:
        assert proxy.connections_held > 0  # the client kept reconnecting into the blackhole

    proxy.restore()
    wait_until(
        lambda: p.poll(0.1) >= 0 and len(delivered) == 20,
        30,
        message=lambda: f"only {len(delivered)} of 20 delivered after restore",
    )
    assert not failed and p.flush(10) == 0

    records = consume_all(bootstrap, [topic_name], expected=20, timeout=30, linger=0.5)
    values = [r.value for r in records]
    assert values == [f"before-{i}".encode() for i in range(10)] + [
        f"during-{i}".encode() for i in range(10)
    ]


def test_a_killed_kafka_broker_starts_again_with_its_data(topic_name: str) -> None:
    with KafkaBroker() as broker:
        p = _producer(broker.bootstrap)
        for i in range(100):
            p.produce(topic_name, key=f"k-{i % 7}".encode(), value=str(i).encode())
        assert p.flush(30) == 0
        assert count_records(broker.bootstrap, topic_name) == 100  # true high watermarks
        pid = broker.pid
        broker.kill()
        assert broker.pid is None
        broker.start()
        assert broker.pid not in (None, pid)
        records = consume_all(broker.bootstrap, [topic_name], timeout=60)
        assert sorted(int(r.value or b"") for r in records) == list(range(100))
        root = broker.root
    assert root is not None and not root.exists(), "close() removes the broker's folder"


def test_a_kafka_broker_that_cannot_start_says_why() -> None:
    broker = KafkaBroker(properties={"num.partitions": "many"})
    with pytest.raises(RuntimeError, match=r"num\.partitions"):
        broker.start()
    broker.close()


# --------------------------------------------------------------------------- proxy


def test_proxy_latency_and_counters(pg: PgClientMixin) -> None:
    with TcpProxy(pg.host, pg.port, latency_ms=100) as proxy:
        with pg.connect(host="127.0.0.1", port=proxy.port) as conn:
            started = time.monotonic()
            assert conn.execute("SELECT 1").fetchone() == (1,)
            elapsed = time.monotonic() - started
            assert elapsed >= 0.2, "a round trip crosses the proxy twice"
            proxy.latency_ms = 0
            conn.execute("SELECT 1")  # first query after the change may carry old delays
            started = time.monotonic()
            conn.execute("SELECT 1")
            assert time.monotonic() - started < 0.2, "latency_ms=0 still delays"
            assert proxy.bytes_up > 0 and proxy.bytes_down > 0
            assert proxy.active_connections == 1

            # idle connections through the proxy cost no CPU (no busy loop)
            cpu = time.process_time()
            wall = time.monotonic()
            while time.monotonic() - wall < 0.5:
                time.sleep(0.05)
            assert time.process_time() - cpu < 0.1

            proxy.cut()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        assert proxy.active_connections == 0


def test_proxy_refuse_and_blackhole_connects() -> None:
    with TcpProxy("127.0.0.1", free_port()) as proxy:
        proxy.cut(refuse=True)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
        proxy.cut()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(b"hello")
            s.settimeout(0.3)
            with pytest.raises(TimeoutError):
                s.recv(1)  # held: accepted, never answered
            wait_until(lambda: proxy.connections_held == 1, 5)
        proxy.restore()
        # target port has no listener: the proxy closes the client's connection
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.settimeout(5)
            try:
                data = s.recv(1)
            except ConnectionResetError:
                data = b""
            assert data == b""
