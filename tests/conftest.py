"""Shared fixtures: a session PostgreSQL (``pg``) and Apache Kafka broker (``kafka``).

By default both are started locally (tests/servers.py, tests/kafka_servers.py: Apache Kafka
in KRaft mode from the jars `make kafka` fetches). Set
``CDC_RELAY_TEST_DATABASE_URL`` (a superuser postgresql:// URL on a server with
wal_level=logical) and/or ``CDC_RELAY_TEST_KAFKA_BOOTSTRAP_SERVERS`` to use external ones;
tests that restart PostgreSQL are then deselected (``pg.can_restart`` is False; mark them
``@pytest.mark.pg_restart`` or request the ``restartable_pg`` fixture).
"""

from __future__ import annotations

import os
import re
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cdc_relay.core import native
from tests import kafka_servers, pg_versions
from tests.kafka_servers import KafkaBroker, proxied_kafka_broker
from tests.servers import (
    ExternalPostgres,
    PgClientMixin,
    PostgresServer,
    TcpProxy,
    find_pg_bindir,
)

DATABASE_URL_ENV = "CDC_RELAY_TEST_DATABASE_URL"
KAFKA_ENV = "CDC_RELAY_TEST_KAFKA_BOOTSTRAP_SERVERS"

_INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "pg_restart: restarts/crashes PostgreSQL; deselected on an external server"
    )
    config.addinivalue_line(
        "markers",
        "compat: the compatibility subset that `make test` runs on every other PostgreSQL "
        "version (CDC_RELAY_TEST_PG)",
    )
    config.addinivalue_line(
        "markers", "min_pg(major): needs PostgreSQL `major` or later; deselected on older servers"
    )
    config.addinivalue_line(
        "markers", "local_pg: makes servers of its own from the session's binaries (a standby)"
    )
    config.addinivalue_line(
        "markers",
        "compiled_core: checks the compiled core against the pure-Python one; deselected when "
        "the pure-Python core runs (not built, or CDC_RELAY_PURE_PYTHON=1)",
    )
    # A plain SIGTERM would end the run without finalizers or atexit: turn it into a
    # KeyboardInterrupt so fixtures stop the servers they started.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def _on_term(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, _on_term)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)
    # Tests that cannot apply to this run are deselected at collection, with the reason in the
    # summary, never skipped while they run: a feature the server's version lacks (min_pg), or
    # a server the tests must stop or copy when they were pointed at one they did not start.
    external = bool(os.environ.get(DATABASE_URL_ENV))
    kept, dropped, reasons = [], [], set()
    major: int | None = None
    for item in items:
        min_pg = item.get_closest_marker("min_pg")
        if external and (
            item.get_closest_marker("pg_restart")
            or item.get_closest_marker("local_pg")
            or "restartable_pg" in getattr(item, "fixturenames", ())
        ):
            dropped.append(item)
            reasons.add(f"need servers the tests start ({DATABASE_URL_ENV} is set)")
            continue
        if item.get_closest_marker("compiled_core") and not native.compiled():
            dropped.append(item)
            reasons.add(f"need the compiled core (this run: {native.describe_why()})")
            continue
        if min_pg is not None:
            major = major if major is not None else _session_pg_major()
            if major < min_pg.args[0]:
                dropped.append(item)
                reasons.add(f"need PostgreSQL {min_pg.args[0]}+ (this run: {major})")
                continue
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
        config.stash[_DESELECTED] = f"{len(dropped)} deselected: " + "; ".join(sorted(reasons))


_DESELECTED = pytest.StashKey[str]()


def pytest_report_collectionfinish(config: pytest.Config) -> str | None:
    return config.stash.get(_DESELECTED, None)


_PG_MAJOR = pytest.StashKey[int]()


def _session_pg_major() -> int:
    """The major version of the session's server, without starting it: the binaries' (or the
    external server's)."""
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        return ExternalPostgres(url).major_version()
    return int(pg_versions.major_version(find_pg_bindir()))


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg() -> Iterator[PgClientMixin]:
    """The session's PostgreSQL: a local PostgresServer, or an ExternalPostgres."""
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        yield ExternalPostgres(url)
        return
    try:
        find_pg_bindir()
    except FileNotFoundError as exc:
        # A run that asked for a version it cannot start has tested nothing: fail, never skip.
        pytest.fail(f"no PostgreSQL server binaries: {exc}", pytrace=False)
    server = PostgresServer(wal_level="logical")
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def pg_major(pg: PgClientMixin) -> int:
    """The session server's major version (15, 16, ...)."""
    return pg.major_version()


@pytest.fixture
def restartable_pg(pg: PgClientMixin) -> PostgresServer:
    """The session server, for tests that stop, crash or restart it (deselected when the tests
    were pointed at an external server)."""
    assert isinstance(pg, PostgresServer) and pg.can_restart
    if not pg.running:  # an earlier test left it down
        pg.start()
    return pg


def _db_name(request: pytest.FixtureRequest) -> str:
    base = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:30]
    return f"t_{base}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def db(pg: PgClientMixin, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database on the session server; yields its (superuser) URL. Afterwards its
    replication slots are dropped (their walsenders terminated) and the database with them."""
    name = _db_name(request)
    url = pg.create_database(name)
    try:
        yield url
    finally:
        if isinstance(pg, PostgresServer) and not pg.running:
            pg.start()  # a test that stopped the server must not leak its database
        pg.drop_database(name)


# --------------------------------------------------------------------------- Kafka

# What the fixtures started, for the summary line at the end of the run.
STARTED_BROKERS: list[str] = []


def pytest_report_header(config: pytest.Config) -> str:
    external = os.environ.get(KAFKA_ENV)
    if external:
        return f"kafka: external ({KAFKA_ENV}={external})"
    return f"kafka: {kafka_servers.describe()}"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for line in dict.fromkeys(STARTED_BROKERS):
        terminalreporter.write_line(f"started {line}")


def started(what: str) -> None:
    STARTED_BROKERS.append(what)


def require_kafka_jars() -> None:
    """A test that needs a broker the harness cannot start fails; it does not skip."""
    try:
        kafka_servers.find_kafka_jars()
        kafka_servers.find_java()
    except FileNotFoundError as exc:
        pytest.fail(f"cannot start Apache Kafka: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker | None]:
    """The session's local KafkaBroker (Apache Kafka, one KRaft node), or None when an
    external broker is configured."""
    if os.environ.get(KAFKA_ENV):
        yield None
        return
    require_kafka_jars()
    with KafkaBroker() as broker:
        started(f"Apache Kafka {broker.version} (1 node, KRaft) for the session")
        yield broker


@pytest.fixture(scope="session")
def kafka(kafka_broker: KafkaBroker | None) -> str:
    """Bootstrap servers of the session's broker ("127.0.0.1:PORT")."""
    if kafka_broker is None:
        return os.environ[KAFKA_ENV]
    return kafka_broker.bootstrap


@dataclass
class ProxiedKafka:
    broker: KafkaBroker
    proxy: TcpProxy

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap  # the proxy's address


@pytest.fixture(scope="session")
def _proxied_kafka_session() -> Iterator[ProxiedKafka]:
    require_kafka_jars()
    with proxied_kafka_broker() as (broker, proxy):
        started(f"Apache Kafka {broker.version} (1 node behind a TCP proxy)")
        yield ProxiedKafka(broker=broker, proxy=proxy)


def _heal(proxied: ProxiedKafka) -> None:
    proxied.proxy.restore()
    proxied.proxy.latency_ms = 0
    if proxied.broker.pid is None:
        proxied.broker.start()


@pytest.fixture
def proxied_kafka(_proxied_kafka_session: ProxiedKafka) -> Iterator[ProxiedKafka]:
    """A local Apache Kafka broker that advertises a TcpProxy in front of it, so every client
    connection goes through ``proxy`` (cut / restore / latency_ms). Always local; shared by
    the session (topics are unique per test): the link is healed before and after each test."""
    _heal(_proxied_kafka_session)
    try:
        yield _proxied_kafka_session
    finally:
        _heal(_proxied_kafka_session)


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """A topic name unique to this test."""
    base = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name).strip("-")[:40]
    return f"t-{base}-{uuid.uuid4().hex[:8]}"
