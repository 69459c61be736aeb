"""Apache Kafka for the tests, the fault suite and the benchmark: KRaft nodes started with
``java -cp`` from the broker jars that ``make kafka`` copies from Maven Central
(tests/kafka/pom.xml) into ``.cache/kafka-<version>/``.

- ``KafkaBroker``: one combined broker+controller node on free ports (the regular suite, the
  benchmark), optionally advertising a ``TcpProxy`` in front of it.
- ``KafkaCluster``: a dedicated KRaft controller and three brokers, each with its own log folder
  so that a broker can be SIGKILLed and started again with its data (the fault suite); an
  optional SASL_SSL listener (SCRAM-SHA-512 over TLS, with a CA made here by ``openssl``).

Every process is stopped by its own PID, from a context manager, a fixture finalizer or, as a
last resort, ``atexit``; a ``_Watchdog`` SIGKILLs whatever runs in the node folders if the test
process itself is SIGKILLed. Waits poll a condition with a deadline.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from tests.servers import (
    _LIVE,
    TcpProxy,
    WaitTimeout,
    _keep_logs,
    _ManagedMixin,
    _port_accepts,
    _set_pdeathsig,
    _Watchdog,
    free_port,
    wait_until,
)

KAFKA_JARS_ENV = "CDC_RELAY_TEST_KAFKA_JARS"
ROOT = Path(__file__).resolve().parents[1]
POM = ROOT / "tests" / "kafka" / "pom.xml"
CACHE = ROOT / ".cache"
STAMP = ".complete"  # written by `make kafka` once every jar is copied
HOST = "127.0.0.1"

# --------------------------------------------------------------------------- the jars


def pinned_version() -> str:
    """The Kafka version tests/kafka/pom.xml pins."""
    m = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if m is None:
        raise ValueError(f"{POM} has no <kafka.version>")
    return m.group(1).strip()


def find_kafka_jars() -> Path:
    """The folder of broker jars: $CDC_RELAY_TEST_KAFKA_JARS, or the cache `make kafka` fills."""
    env = os.environ.get(KAFKA_JARS_ENV)
    if env:
        jars = Path(env)
        if not list(jars.glob("kafka_2.13-*.jar")):
            raise FileNotFoundError(f"{KAFKA_JARS_ENV}={env} holds no kafka_2.13-*.jar")
        return jars
    jars = CACHE / f"kafka-{pinned_version()}"
    if not (jars / STAMP).exists():
        raise FileNotFoundError(f"no Apache Kafka jars in {jars}: run `make kafka`")
    return jars


def kafka_version(jars: Path) -> str:
    """The broker version of a jar folder (from the name of its kafka_2.13 jar)."""
    for jar in jars.glob("kafka_2.13-*.jar"):
        m = re.fullmatch(r"kafka_2\.13-(.+)\.jar", jar.name)
        if m and not m.group(1).endswith(("-test", "-sources", "-javadoc")):
            return m.group(1)
    raise FileNotFoundError(f"no kafka_2.13-<version>.jar in {jars}")


def find_java() -> str:
    """A java launcher: $JAVA_HOME/bin/java, or java on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise FileNotFoundError("no java found (Java 17 or later): run `make kafka`")
    return found


def describe() -> str:
    """One line naming the broker the harness starts (for the pytest header)."""
    try:
        jars = find_kafka_jars()
    except FileNotFoundError as exc:
        return f"Apache Kafka: not available ({exc})"
    return f"Apache Kafka {kafka_version(jars)} (KRaft, jars in {jars})"


def new_cluster_id() -> str:
    """A KRaft cluster id: a UUID in URL-safe base64 without padding, as `kafka-storage
    random-uuid` prints; never with a leading "-", which the tool would take for an option."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA and a broker certificate for 127.0.0.1/localhost, made by openssl."""

    ca_pem: Path  # what clients trust (ssl.ca.location)
    broker_keystore_pem: Path  # the broker's private key (PKCS#8) and certificate chain

    @classmethod
    def create(cls, folder: Path) -> TlsFiles:
        folder.mkdir(parents=True, exist_ok=True)
        openssl = shutil.which("openssl")
        if openssl is None:
            raise FileNotFoundError("the openssl command is needed for the test CA")

        def run(*args: str) -> None:
            done = subprocess.run(
                [openssl, *args], cwd=folder, capture_output=True, text=True, timeout=60
            )
            if done.returncode != 0:
                raise RuntimeError(f"openssl {args[0]} failed: {done.stderr}")

        run(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3",
            "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=cdc-relay test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        run(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key",
            "-out", "broker.csr", "-subj", "/CN=localhost",
        )  # fmt: skip
        (folder / "broker.ext").write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
            "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        )
        run(
            "x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", str(secrets.randbits(63)), "-days", "3",
            "-extfile", "broker.ext", "-out", "broker.pem",
        )  # fmt: skip
        keystore = folder / "broker-keystore.pem"
        key, cert = (folder / "broker.key").read_text(), (folder / "broker.pem").read_text()
        keystore.write_text(key + cert)
        return cls(ca_pem=folder / "ca.pem", broker_keystore_pem=keystore)


# --------------------------------------------------------------------------- one JVM

_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
# every component prints its whole configuration at start: once is in server.properties
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


def _as_properties(props: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in props.items())


class _Format:
    def __init__(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.proc = proc

    def result(self, timeout: float = 120) -> None:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(
                f"kafka-storage format of {self.name} failed ({self.proc.returncode}):\n"
                + out.decode(errors="replace")
            )


class KafkaNode:
    """One Kafka JVM (a broker, a controller, or both) in its own folder: ``server.properties``,
    its data (``data/``) and its logs (``kafka.log`` from log4j, ``stdout.log`` for the JVM).

    ``spawn()`` starts it, ``kill()`` SIGKILLs it, ``terminate()`` asks it to stop (SIGTERM) and
    escalates; the data stays, so ``spawn()`` again restarts the node with its logs.
    """

    def __init__(
        self,
        *,
        name: str,
        node_id: int,
        folder: Path,
        properties: dict[str, str],
        jars: Path,
        heap_mb: int,
    ) -> None:
        self.name = name
        self.node_id = node_id
        self.folder = folder
        self.properties = properties
        self.jars = jars
        self.heap_mb = heap_mb
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def config_path(self) -> Path:
        return self.folder / "server.properties"

    @property
    def log_path(self) -> Path:
        return self.folder / "kafka.log"

    @property
    def stdout_path(self) -> Path:
        return self.folder / "stdout.log"

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def running(self) -> bool:
        return self.pid is not None

    def write_config(self) -> None:
        props = {**self.properties, "node.id": str(self.node_id), "log.dirs": str(self.data_dir)}
        self.config_path.write_text("# written by tests/kafka_servers.py\n" + _as_properties(props))
        (self.folder / "log4j2.properties").write_text(_LOG4J2.format(log=self.log_path))

    def _java(self, main: str, *args: str, heap_mb: int | None = None) -> list[str]:
        return [
            find_java(),
            f"-Xmx{heap_mb or self.heap_mb}m",
            "-Xms64m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.folder / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.folder}",
            "-cp",
            f"{self.jars}/*",  # the JVM expands the wildcard itself
            main,
            *args,
        ]

    def format(self, cluster_id: str, *extra: str) -> None:
        """kafka-storage format: write meta.properties (and, on a controller, the bootstrap
        metadata) into the data folder."""
        self.start_format(cluster_id, *extra).result()

    def start_format(self, cluster_id: str, *extra: str) -> _Format:
        """``format`` in the background; ``.result()`` waits for it and raises on failure."""
        self.write_config()
        cmd = self._java(
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            cluster_id,
            "--config",
            str(self.config_path),
            *extra,
            heap_mb=256,
        )
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.folder
        )
        return _Format(self.name, proc)

    def spawn(self) -> None:
        if self.running():
            return
        self.write_config()
        with self.stdout_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self._java("kafka.Kafka", str(self.config_path)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.folder,  # the watchdog finds our processes by their folder
                start_new_session=True,
                # PDEATHSIG follows the forking *thread*: only safe from the main thread.
                preexec_fn=(
                    _set_pdeathsig
                    if threading.current_thread() is threading.main_thread()
                    else None
                ),
            )

    def check_alive(self) -> None:
        """Raise with the log tail if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"Kafka {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def kill(self) -> None:
        """SIGKILL (a crash: no controlled shutdown, nothing flushed)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)

    def terminate(self, timeout: float = 20.0) -> None:
        """SIGTERM (a controlled shutdown), then SIGKILL after ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)

    def log_text(self) -> str:
        parts = []
        for path in (self.stdout_path, self.log_path):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def log_tail(self, chars: int = 6000) -> str:
        out = ""
        with contextlib.suppress(OSError):
            out += "--- stdout ---\n" + self.stdout_path.read_text(errors="replace")[-2000:]
        with contextlib.suppress(OSError):
            out += "\n--- kafka.log ---\n" + self.log_path.read_text(errors="replace")[-chars:]
        return out

    def lost_port_race(self) -> bool:
        return "Address already in use" in self.log_text()

    def __repr__(self) -> str:
        return f"KafkaNode({self.name}, id={self.node_id}, pid={self.pid})"


def _admin(bootstrap: str, **extra: Any) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, **extra})


def _node_watchdog(root: Path) -> _Watchdog:
    """SIGKILL every process whose working directory is inside ``root`` (only our nodes run
    there), then remove ``root``: run if the test process dies without cleaning up."""
    quoted = shlex.quote(str(root))
    script = (
        "for p in /proc/[0-9]*; do\n"
        f'  case "$(readlink "$p/cwd" 2>/dev/null)" in {quoted}|{quoted}/*)'
        ' kill -KILL "${p#/proc/}" 2>/dev/null;; esac\n'
        "done\n"
    )
    if not _keep_logs():
        script += f"rm -rf {quoted} || (sleep 1; rm -rf {quoted})\n"
    return _Watchdog(script)


def _test_properties(partitions: int, replicas: int, min_isr: int) -> dict[str, str]:
    """Settings that make a node quick to start and to use in tests."""
    return {
        "num.partitions": str(partitions),
        "default.replication.factor": str(replicas),
        "min.insync.replicas": str(min_isr),
        "offsets.topic.replication.factor": str(replicas),
        "offsets.topic.num.partitions": "3",
        "transaction.state.log.replication.factor": str(replicas),
        "transaction.state.log.min.isr": str(min_isr),
        "transaction.state.log.num.partitions": "3",
        "share.coordinator.state.topic.replication.factor": str(replicas),
        "share.coordinator.state.topic.min.isr": str(min_isr),
        "share.coordinator.state.topic.num.partitions": "3",
        "group.initial.rebalance.delay.ms": "0",
        "unclean.leader.election.enable": "false",
        "delete.topic.enable": "true",
        "log.segment.bytes": str(64 * 1024 * 1024),
        # a killed broker is fenced (and leaves the ISRs) after this: seconds, not the
        # default 9 s, so that fault scenarios see failover quickly
        "broker.heartbeat.interval.ms": "500",
        "broker.session.timeout.ms": "4000",
    }


# --------------------------------------------------------------------------- KafkaBroker


class KafkaBroker(_ManagedMixin):
    """One combined broker+controller (KRaft) on 127.0.0.1, data in a temporary folder.

    ``advertised_port`` lets a ``TcpProxy`` sit in front: clients bootstrap through
    ``bootstrap`` (the advertised address) and all their traffic goes through the proxy. The
    node's own traffic (controller, inter-broker) uses listeners of its own, never the proxy.
    ``stop()`` keeps the data (``start()`` again restarts it); ``close()`` removes it.
    """

    host = HOST
    node_id = 1

    def __init__(
        self,
        *,
        advertised_port: int | None = None,
        port: int | None = None,
        jars: str | os.PathLike[str] | None = None,
        heap_mb: int = 384,
        partitions: int = 3,
        auto_create_topics: bool = True,
        properties: dict[str, str] | None = None,
    ) -> None:
        self.jars = Path(jars) if jars else find_kafka_jars()
        self.version = kafka_version(self.jars)
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.advertised_port = advertised_port
        self.heap_mb = heap_mb
        self.partitions = partitions
        self.auto_create_topics = auto_create_topics
        self.extra_properties = dict(properties or {})
        self.root: Path | None = None
        self.node: KafkaNode | None = None
        self._watchdog: _Watchdog | None = None
        _LIVE.add(self)

    @property
    def bootstrap(self) -> str:
        """The address clients should use (the advertised one)."""
        return f"{self.host}:{self.advertised_port or self.port}"

    @property
    def direct_bootstrap(self) -> str:
        """The listening address (bypasses any proxy for the bootstrap connection only)."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.node.pid if self.node is not None else None

    @property
    def log_path(self) -> Path | None:
        return self.node.log_path if self.node is not None else None

    def log_text(self) -> str:
        return self.node.log_text() if self.node is not None else ""

    def _properties(self) -> dict[str, str]:
        internal, controller = free_port(), free_port()
        return {
            "process.roles": "broker,controller",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},INTERNAL://{HOST}:{internal},"
            f"CONTROLLER://{HOST}:{controller}",
            "advertised.listeners": f"PLAINTEXT://{self.bootstrap},INTERNAL://{HOST}:{internal}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,INTERNAL:PLAINTEXT,"
            "CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "INTERNAL",
            "controller.listener.names": "CONTROLLER",
            "controller.quorum.bootstrap.servers": f"{HOST}:{controller}",
            "auto.create.topics.enable": str(self.auto_create_topics).lower(),
            **_test_properties(self.partitions, replicas=1, min_isr=1),
            **self.extra_properties,
        }

    def start(self) -> Self:
        if self.pid is not None:
            return self
        if self.node is not None:  # stopped: start again with its data
            self.node.spawn()
            self._wait_ready()
            return self
        self.root = Path(tempfile.mkdtemp(prefix="cdc-relay-kafka-", dir="/tmp"))
        self._watchdog = _node_watchdog(self.root)
        for attempt in range(5):
            node = KafkaNode(
                name="broker",
                node_id=self.node_id,
                folder=self.root / f"node-{attempt}",
                properties=self._properties(),
                jars=self.jars,
                heap_mb=self.heap_mb,
            )
            node.format(new_cluster_id(), "--standalone")
            self.node = node
            node.spawn()
            try:
                self._wait_ready()
                return self
            except Exception:
                lost_race = node.lost_port_race()
                node.kill()
                if lost_race and attempt < 4:
                    shutil.rmtree(node.folder, ignore_errors=True)
                    if not self._fixed_port:
                        self.port = free_port()
                    continue
                raise
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float = 90.0) -> None:
        node = self.node
        assert node is not None
        admin = _admin(self.direct_bootstrap)

        def registered() -> bool:
            node.check_alive()
            if not _port_accepts(HOST, self.port):
                return False
            return self.node_id in admin.list_topics(timeout=1.0).brokers

        wait_until(
            registered,
            timeout,
            interval=0.1,
            message=lambda: f"Kafka on {self.port} did not become ready:\n{node.log_tail()}",
        )

    def stop(self) -> None:
        """A controlled shutdown; the data stays for the next ``start()``."""
        if self.node is not None:
            self.node.terminate()

    def kill(self) -> None:
        """SIGKILL the broker (its data stays)."""
        if self.node is not None:
            self.node.kill()

    def close(self) -> None:
        _LIVE.discard(self)
        try:
            if self.node is not None:
                self.node.terminate(timeout=10)
        finally:
            if self.root is not None and not _keep_logs():
                shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            self.node = None
            if self._watchdog is not None:
                self._watchdog.disarm()
                self._watchdog = None

    def __repr__(self) -> str:
        return (
            f"KafkaBroker({self.version}, listen={self.port}, bootstrap={self.bootstrap}, "
            f"pid={self.pid})"
        )


@contextlib.contextmanager
def proxied_kafka_broker(**kwargs: Any) -> Iterator[tuple[KafkaBroker, TcpProxy]]:
    """A KafkaBroker that advertises a TcpProxy in front of it: every client connection
    (bootstrap and broker) goes through the proxy. Yields ``(broker, proxy)``."""
    broker_port = free_port()
    with (
        TcpProxy(HOST, broker_port) as proxy,
        KafkaBroker(port=broker_port, advertised_port=proxy.port, **kwargs) as broker,
    ):
        yield broker, proxy


# --------------------------------------------------------------------------- KafkaCluster


@dataclass(frozen=True)
class PartitionState:
    leader: int  # -1 while there is none
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


class KafkaCluster(_ManagedMixin):
    """A dedicated KRaft controller and ``brokers`` brokers (process.roles=broker).

    The controller stays up whatever happens to the brokers, so it can still fence a dead
    broker and shrink the ISRs (with two of three brokers down, producers get
    NOT_ENOUGH_REPLICAS instead of hanging on a leaderless partition). Each broker keeps its
    log folder across ``kill(node)`` / ``start(node)`` / ``restart(node)``.

    Topics default to replication factor 3 with ``min.insync.replicas`` 2, unclean leader
    election off; the internal topics too. ``sasl_ssl=True`` adds a SASL_SSL listener
    (SCRAM-SHA-512 over TLS, certificate from a test CA) on every broker, with the users of
    ``scram_users`` added at format time. ``proxied=True`` puts a TcpProxy in front of each
    broker's client listener (``cut()``, ``restore()``, ``set_latency()``); the brokers'
    replication and the controller never go through a proxy.
    """

    controller_id = 100

    def __init__(
        self,
        *,
        brokers: int = 3,
        min_insync_replicas: int = 2,
        partitions: int = 3,
        auto_create_topics: bool = True,
        sasl_ssl: bool = False,
        scram_users: dict[str, str] | None = None,
        proxied: bool = False,
        jars: str | os.PathLike[str] | None = None,
        heap_mb: int = 320,
        properties: dict[str, str] | None = None,
    ) -> None:
        self.jars = Path(jars) if jars else find_kafka_jars()
        self.version = kafka_version(self.jars)
        self.broker_ids = list(range(1, brokers + 1))
        self.replication_factor = brokers
        self.min_insync_replicas = min_insync_replicas
        self.partitions = partitions
        self.auto_create_topics = auto_create_topics
        self.sasl_ssl = sasl_ssl
        self.scram_users = dict(scram_users or {})
        self.heap_mb = heap_mb
        self.extra_properties = dict(properties or {})
        self.root: Path | None = None
        self.tls: TlsFiles | None = None
        self.controller: KafkaNode | None = None
        self.nodes: dict[int, KafkaNode] = {}
        self.ports: dict[int, int] = {}  # client (PLAINTEXT) listener of each broker
        self.sasl_ports: dict[int, int] = {}
        self.proxies: dict[int, TcpProxy] = {}
        self._proxied = proxied
        self._admin_client: Any = None
        self._watchdog: _Watchdog | None = None
        _LIVE.add(self)

    # -- addresses
    def address(self, node: int) -> str:
        """Where clients reach broker ``node`` (its proxy when proxied)."""
        port = self.proxies[node].port if self._proxied else self.ports[node]
        return f"{HOST}:{port}"

    @property
    def bootstrap(self) -> str:
        return ",".join(self.address(n) for n in self.broker_ids)

    @property
    def direct_bootstrap(self) -> str:
        return ",".join(f"{HOST}:{self.ports[n]}" for n in self.broker_ids)

    @property
    def sasl_bootstrap(self) -> str:
        if not self.sasl_ssl:
            raise RuntimeError("this cluster has no SASL_SSL listener")
        return ",".join(f"{HOST}:{self.sasl_ports[n]}" for n in self.broker_ids)

    def pid(self, node: int) -> int | None:
        return self.nodes[node].pid

    def running(self, node: int) -> bool:
        return self.nodes[node].running()

    # -- configuration
    def _broker_properties(self, node: int, controller_port: int) -> dict[str, str]:
        internal = free_port()
        listeners = [f"PLAINTEXT://{HOST}:{self.ports[node]}", f"INTERNAL://{HOST}:{internal}"]
        advertised = [f"PLAINTEXT://{self.address(node)}", f"INTERNAL://{HOST}:{internal}"]
        protocols = "PLAINTEXT:PLAINTEXT,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT"
        props: dict[str, str] = {"process.roles": "broker"}
        if self.sasl_ssl:
            assert self.tls is not None
            sasl = f"SASL_SSL://{HOST}:{self.sasl_ports[node]}"
            listeners.append(sasl)
            advertised.append(sasl)
            protocols += ",SASL_SSL:SASL_SSL"
            props |= {
                "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                ),
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(self.tls.broker_keystore_pem),
            }
        return {
            **props,
            "listeners": ",".join(listeners),
            "advertised.listeners": ",".join(advertised),
            "listener.security.protocol.map": protocols,
            "inter.broker.listener.name": "INTERNAL",
            "controller.listener.names": "CONTROLLER",
            "controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}",
            "auto.create.topics.enable": str(self.auto_create_topics).lower(),
            "num.replica.fetchers": "1",
            "num.io.threads": "4",
            "num.network.threads": "2",
            **_test_properties(
                self.partitions, replicas=self.replication_factor, min_isr=self.min_insync_replicas
            ),
            **self.extra_properties,
        }

    def _controller_properties(self, controller_port: int) -> dict[str, str]:
        return {
            "process.roles": "controller",
            "listeners": f"CONTROLLER://{HOST}:{controller_port}",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}",
            # the controller decides these for auto-created and internal topics
            **_test_properties(
                self.partitions, replicas=self.replication_factor, min_isr=self.min_insync_replicas
            ),
            **self.extra_properties,
        }

    # -- lifecycle
    def start(self, node: int | None = None) -> Self:
        """Start the whole cluster, or broker ``node`` again (with its data)."""
        if node is not None:
            self.nodes[node].spawn()
            self.wait_registered([node])
            return self
        if self.controller is not None:
            for n in self.broker_ids:
                if not self.running(n):
                    self.nodes[n].spawn()
            self.wait_registered()
            return self
        self.root = Path(tempfile.mkdtemp(prefix="cdc-relay-kafka-cluster-", dir="/tmp"))
        self._watchdog = _node_watchdog(self.root)
        if self.sasl_ssl:
            self.tls = TlsFiles.create(self.root / "tls")
        for attempt in range(5):
            try:
                self._start_once(attempt)
                return self
            except Exception:
                lost_race = any(
                    n.lost_port_race() for n in [self.controller, *self.nodes.values()] if n
                )
                self._kill_all()
                if lost_race and attempt < 4:
                    continue
                raise
        raise AssertionError("unreachable")

    def _start_once(self, attempt: int) -> None:
        assert self.root is not None
        for proxy in self.proxies.values():
            proxy.close()
        self.proxies = {}
        controller_port = free_port()
        self.ports = {n: free_port() for n in self.broker_ids}
        self.sasl_ports = {n: free_port() for n in self.broker_ids} if self.sasl_ssl else {}
        if self._proxied:
            self.proxies = {n: TcpProxy(HOST, self.ports[n]).start() for n in self.broker_ids}
        cluster_id = new_cluster_id()
        scram = [
            arg
            for name, password in self.scram_users.items()
            for arg in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]")
        ]
        base = self.root / f"attempt-{attempt}"
        self.controller = KafkaNode(
            name="controller",
            node_id=self.controller_id,
            folder=base / "controller",
            properties=self._controller_properties(controller_port),
            jars=self.jars,
            heap_mb=256,
        )
        self.nodes = {
            n: KafkaNode(
                name=f"broker {n}",
                node_id=n,
                folder=base / f"broker-{n}",
                properties=self._broker_properties(n, controller_port),
                jars=self.jars,
                heap_mb=self.heap_mb,
            )
            for n in self.broker_ids
        }
        # Formatting is a JVM start each: all at once.
        formats = [self.controller.start_format(cluster_id, "--standalone", *scram)]
        formats += [self.nodes[n].start_format(cluster_id) for n in self.broker_ids]
        for fmt in formats:
            fmt.result()
        self.controller.spawn()
        controller = self.controller

        def listening() -> bool:
            controller.check_alive()
            return _port_accepts(HOST, controller_port)

        wait_until(
            listening,
            90,
            interval=0.1,
            message=lambda: f"the Kafka controller is not listening:\n{controller.log_tail()}",
        )
        for n in self.broker_ids:
            self.nodes[n].spawn()
        self.wait_registered()

    def admin(self) -> Any:
        """An AdminClient on every broker's direct address (cached)."""
        if self._admin_client is None:
            self._admin_client = _admin(self.direct_bootstrap)
        return self._admin_client

    def registered_brokers(self, timeout: float = 2.0) -> set[int]:
        """The brokers the cluster metadata lists now (registered and not fenced)."""
        return set(self.admin().list_topics(timeout=timeout).brokers)

    def wait_registered(self, nodes: Iterable[int] | None = None, timeout: float = 120) -> None:
        """Until every broker of ``nodes`` (all by default) is registered and unfenced."""
        wanted = set(self.broker_ids if nodes is None else nodes)

        def registered() -> bool:
            for n in wanted:
                self.nodes[n].check_alive()
            if self.controller is not None:
                self.controller.check_alive()
            return wanted <= self.registered_brokers()

        wait_until(
            registered,
            timeout,
            interval=0.2,
            message=lambda: (
                f"Kafka brokers {sorted(wanted)} did not register:\n"
                + "\n".join(
                    f"=== {self.nodes[n].name}\n{self.nodes[n].log_tail(3000)}" for n in wanted
                )
            ),
        )

    def kill(self, node: int) -> None:
        """SIGKILL broker ``node``; its data stays for ``start(node)``."""
        self.nodes[node].kill()

    def stop(self, node: int | None = None) -> None:
        """A controlled shutdown of broker ``node`` (data kept), or of every process."""
        if node is not None:
            self.nodes[node].terminate()
            return
        self._terminate_all()

    def restart(self, node: int) -> None:
        """SIGKILL broker ``node`` and start it again with its data."""
        self.kill(node)
        self.start(node)

    def _kill_all(self) -> None:
        for n in self.nodes.values():
            n.kill()
        if self.controller is not None:
            self.controller.kill()

    def _terminate_all(self, timeout: float = 15.0) -> None:
        # Brokers first, all at once (each would wait for the others' controlled shutdown),
        # then the controller they report to.
        running = [n for n in self.nodes.values() if n.proc is not None]
        for n in running:
            with contextlib.suppress(OSError):
                assert n.proc is not None
                n.proc.terminate()
        for n in running:
            n.terminate(timeout)
        if self.controller is not None:
            self.controller.terminate(timeout)

    def close(self) -> None:
        _LIVE.discard(self)
        try:
            # The data is thrown away: no need for controlled shutdowns.
            self._kill_all()
            for proxy in self.proxies.values():
                proxy.close()
        finally:
            if self.root is not None and not _keep_logs():
                shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            self.controller = None
            self.nodes = {}
            if self._watchdog is not None:
                self._watchdog.disarm()
                self._watchdog = None

    # -- the broker link, when proxied
    def cut(self, *, refuse: bool = False) -> None:
        """Partition every broker from the clients (not from each other)."""
        for proxy in self._require_proxies():
            proxy.cut(refuse=refuse)

    def restore(self) -> None:
        for proxy in self._require_proxies():
            proxy.restore()

    def set_latency(self, ms: float) -> None:
        for proxy in self._require_proxies():
            proxy.latency_ms = ms

    def _require_proxies(self) -> list[TcpProxy]:
        if not self._proxied:
            raise RuntimeError("this cluster was started without proxies (proxied=True)")
        return list(self.proxies.values())

    # -- topics and partitions
    def create_topic(
        self,
        name: str,
        partitions: int | None = None,
        replication_factor: int | None = None,
        timeout: float = 30.0,
        **config: str,
    ) -> None:
        """Create ``name`` (per-topic ``config`` such as ``max.message.bytes``) and wait until
        every partition has a leader."""
        from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

        topic = NewTopic(
            name,
            num_partitions=partitions or self.partitions,
            replication_factor=replication_factor or self.replication_factor,
            config=config,
        )
        for fut in self.admin().create_topics([topic], operation_timeout=timeout).values():
            fut.result(timeout)
        wait_until(
            lambda: (
                (states := self.partition_states(name))
                and all(s.leader >= 0 for s in states.values())
            ),
            timeout,
            message=f"topic {name} has partitions without a leader",
        )

    def partition_states(self, topic: str, timeout: float = 5.0) -> dict[int, PartitionState]:
        """Leader, replicas and ISR of each partition of ``topic`` (empty if it does not exist)."""
        md = self.admin().list_topics(topic, timeout=timeout)
        t = md.topics.get(topic)
        if t is None or t.error is not None:
            return {}
        return {
            p: PartitionState(pm.leader, tuple(pm.replicas), tuple(pm.isrs))
            for p, pm in t.partitions.items()
        }

    def leader(self, topic: str, partition: int) -> int:
        """The broker that leads ``partition`` of ``topic`` (-1 while none does)."""
        return self.partition_states(topic)[partition].leader

    def high_watermarks(self, topic: str) -> dict[int, int]:
        """How many records each partition of ``topic`` holds (its high watermark)."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer(
            {
                "bootstrap.servers": self.direct_bootstrap,
                "group.id": f"cdc-relay-test-{uuid.uuid4().hex}",
                "log_level": 0,
            }
        )
        try:
            return {
                p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
                for p in self.partition_states(topic)
            }
        finally:
            consumer.close()

    def busiest_partition(self, topic: str) -> int:
        """The partition of ``topic`` with the most records."""
        marks = self.high_watermarks(topic)
        return max(marks, key=lambda p: marks[p])

    def wait_isr_full(self, topics: Iterable[str], timeout: float = 120) -> None:
        """Until every partition of ``topics`` has a leader and all its replicas in sync."""
        names = list(topics)

        def full() -> bool:
            for name in names:
                states = self.partition_states(name)
                if not states:
                    return False
                for s in states.values():
                    if s.leader < 0 or len(s.isr) < len(s.replicas):
                        return False
            return True

        wait_until(
            full,
            timeout,
            interval=0.25,
            message=lambda: (
                "ISR not full: " + "; ".join(f"{n}: {self.partition_states(n)}" for n in names)
            ),
        )

    def healthy(self) -> bool:
        """Every broker running and registered."""
        return all(self.running(n) for n in self.broker_ids) and set(self.broker_ids) <= (
            self.registered_brokers()
        )

    def __repr__(self) -> str:
        pids = {n: node.pid for n, node in self.nodes.items()}
        return f"KafkaCluster({self.version}, brokers={pids}, bootstrap={self.bootstrap})"


def new_scram_password() -> str:
    """A password for a SCRAM user (letters and digits: safe inside --add-scram's brackets)."""
    return "pw" + secrets.token_hex(12)


__all__ = [
    "KAFKA_JARS_ENV",
    "KafkaBroker",
    "KafkaCluster",
    "KafkaNode",
    "PartitionState",
    "TlsFiles",
    "WaitTimeout",
    "describe",
    "find_kafka_jars",
    "kafka_version",
    "new_scram_password",
    "pinned_version",
    "proxied_kafka_broker",
]
