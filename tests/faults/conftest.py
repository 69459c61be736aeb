"""The fault-injection suite (marker ``faults``): each scenario attacks a running relay and
records what it measured; the figures go to build/faults-results.json at the end.

Scenarios that attack the broker run on ``cluster``: a KafkaCluster (a dedicated controller and
three brokers, replication factor 3, min.insync.replicas 2) started once for the session, with
a TcpProxy in front of each broker's client listener and a SASL_SSL listener (SCRAM-SHA-512
over TLS, user ``SCRAM_USER``). Always local, whatever CDC_RELAY_TEST_KAFKA_BOOTSTRAP_SERVERS
says: the scenarios kill its brokers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_kafka_jars, started
from tests.faults import results
from tests.faults.scale import scale_name
from tests.kafka_servers import KafkaCluster, new_scram_password

SCRAM_USER = "cdc-relay"

_FAULTS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _FAULTS_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    figures = results.collected()
    if not figures:
        return
    path = results.write(scale_name())
    terminalreporter.section(f"fault scenarios (scale {scale_name()})")
    terminalreporter.write_line(results.table(figures))
    terminalreporter.write_line(f"written to {path}")


@pytest.fixture(scope="session")
def _cluster_session() -> Iterator[KafkaCluster]:
    require_kafka_jars()
    with KafkaCluster(
        proxied=True, sasl_ssl=True, scram_users={SCRAM_USER: new_scram_password()}
    ) as cluster:
        started(
            f"Apache Kafka {cluster.version} (controller + 3 brokers, RF 3, min ISR 2) "
            "for the fault suite"
        )
        yield cluster


def heal(cluster: KafkaCluster) -> None:
    """Every broker running and registered, the client links forwarding without delay."""
    cluster.restore()
    cluster.set_latency(0)
    cluster.start()


@pytest.fixture
def cluster(_cluster_session: KafkaCluster) -> Iterator[KafkaCluster]:
    """The session's three-broker cluster, healed before and after each scenario (topics are
    unique per test)."""
    heal(_cluster_session)
    try:
        yield _cluster_session
    finally:
        heal(_cluster_session)
