"""What an operator sees of a running relay: /metrics after N events, /healthz and /readyz
(streaming, hot standby, broker unreachable), JSON logs, and `status` with the oldest
unconfirmed event and --watch."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Outbox, make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    cli,
    confirmed_lsn,
    execute,
    insert_events,
    query,
    slot_active,
    wait_confirmed_past,
)
from tests.servers import free_port, wait_until


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    status, text = get(port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def with_http(env: dict[str, str], **extra: str) -> tuple[dict[str, str], int]:
    port = free_port()
    return {**env, "CDC_RELAY_HTTP_PORT": str(port), **extra}, port


def test_metrics_after_n_events_show_the_right_numbers(outbox: Outbox):
    env, port = with_http(
        outbox.env, CDC_RELAY_LAG_SAMPLE_INTERVAL_SECONDS="0.5", CDC_RELAY_LOG_FORMAT="json"
    )
    events, per_txn = 500, 10
    with RelayProcess(env) as relay:
        wait_until(lambda: get(port, "/readyz")[0] == 200, 60, message=relay.log)
        end = insert_events(outbox.url, count=events, per_txn=per_txn)
        wait_confirmed_past(outbox.url, end)
        topic = (("table", "public.outbox"), ("topic", outbox.topic()))

        def settled() -> bool:
            m = scrape(port)
            return (
                m.get(("cdc_relay_events_published_total", topic)) == events
                and m[("cdc_relay_in_flight_events", ())] == 0
                and m[("cdc_relay_confirmed_lsn_bytes", ())] == confirmed_lsn(outbox.url)
                and ("cdc_relay_replication_lag_bytes", ()) in m
            )

        wait_until(settled, 60, message=lambda: f"metrics did not settle: {scrape(port)}")
        metrics = scrape(port)
        assert metrics[("cdc_relay_in_flight_bytes", ())] == 0
        assert metrics[("cdc_relay_events_dead_lettered_total", ())] == 0
        # One latency observation per transaction that carried events, no more.
        assert metrics[("cdc_relay_end_to_end_latency_seconds_count", ())] == events / per_txn
        assert metrics[("cdc_relay_end_to_end_latency_seconds_sum", ())] > 0
        assert metrics[("cdc_relay_last_ack_timestamp_seconds", ())] > time.time() - 120
        assert metrics[("cdc_relay_slot_wal_status", (("status", "reserved"),))] == 1
        assert metrics[("cdc_relay_replication_lag_bytes", ())] >= 0
        assert metrics[("cdc_relay_streaming", ())] == 1
        assert metrics[("cdc_relay_sessions_total", ())] == 1
        assert get(port, "/healthz") == (200, "ok\n")
        assert get(port, "/readyz") == (200, "ok\n")
        assert relay.stop() == 0
        log = relay.log()

    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    streaming = [line for line in lines if line["message"].startswith("streaming")]
    assert streaming and streaming[0]["slot"] == "cdc_relay" and "/" in streaming[0]["lsn"]
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    # Nothing per event at INFO: a handful of lines for 500 events.
    assert len(lines) < 20, lines


def test_a_hot_standby_is_healthy_but_not_ready(outbox: Outbox):
    active_env, active_port = with_http(outbox.env, CDC_RELAY_STANDBY_RETRY_SECONDS="0.5")
    standby_env, standby_port = with_http(outbox.env, CDC_RELAY_STANDBY_RETRY_SECONDS="0.5")
    with RelayProcess(active_env) as active:
        wait_until(lambda: get(active_port, "/readyz")[0] == 200, 60, message=active.log)
        with RelayProcess(standby_env) as standby:
            in_use = ("cdc_relay_reconnects_total", (("cause", "slot_in_use"),))
            wait_until(lambda: scrape(standby_port)[in_use] >= 2, 60, message=standby.log)
            assert get(standby_port, "/healthz")[0] == 200
            status, reason = get(standby_port, "/readyz")
            assert status == 503 and "hot standby" in reason
            assert scrape(standby_port)[("cdc_relay_streaming", ())] == 0
            assert get(active_port, "/readyz")[0] == 200
            # The standby takes over when the active relay dies, and becomes ready.
            active.kill()
            wait_until(lambda: get(standby_port, "/readyz")[0] == 200, 60, message=standby.log)
            assert standby.stop() == 0


def test_readyz_fails_while_the_broker_is_unreachable(db: str, kafka: str):
    box = make_outbox(db, kafka)
    env, port = with_http(box.env, CDC_RELAY_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    with RelayProcess(env) as relay:
        wait_until(lambda: get(port, "/healthz")[0] == 200, 60, message=relay.log)
        status, reason = get(port, "/readyz")
        assert status == 503, reason
        broker = scrape(port)[("cdc_relay_broker_reachable", ())]
        assert broker == 0
        assert not slot_active(db)
        assert relay.stop() == 0


def test_a_port_in_use_is_one_line_and_exit_1(outbox: Outbox):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**outbox.env, "CDC_RELAY_HTTP_PORT": str(port), "CDC_RELAY_HTTP_HOST": "127.0.0.1"}
        done = cli(env, "run", timeout=60)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def oldest(env: dict[str, str]) -> dict[str, object] | None:
    done = cli(env, "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["oldest_unconfirmed"]


def test_status_reports_the_oldest_unconfirmed_event(outbox: Outbox):
    # A first event, relayed and confirmed.
    with RelayProcess(outbox.env) as relay:
        end = insert_events(outbox.url, count=1, per_txn=1)
        wait_confirmed_past(outbox.url, end)

        def confirmed_in_status() -> bool:
            # The slot's catalog_xmin moves with the server's running-transactions snapshots:
            # a checkpoint logs one, the relay confirms past it.
            execute(outbox.url, "CHECKPOINT")
            return oldest(outbox.env) == {"created_at": None, "age_seconds": 0.0}

        wait_until(confirmed_in_status, 90, interval=1, message=relay.log)
        assert relay.stop() == 0
    # A second one while no relay runs: that one is the oldest unconfirmed, not the first.
    insert_events(outbox.url, count=1, per_txn=1, start=1)
    created = query(
        outbox.url,
        "SELECT created_at::text, extract(epoch FROM now() - created_at)::float8 FROM outbox "
        "WHERE payload->>'seq' = '1'",
    )[0]
    report = oldest(outbox.env)
    assert report is not None and report["created_at"] == created[0]
    assert isinstance(report["age_seconds"], float) and report["age_seconds"] >= created[1]
    text = cli(outbox.env, "status")
    assert text.returncode == 0 and "unconfirmed oldest event" in text.stdout
    assert created[0] in text.stdout


def test_status_watch_refreshes_until_ctrl_c(outbox: Outbox):
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdc_relay", "status", "--json", "--watch", "0.2"],
        env=outbox.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        second = json.loads(proc.stdout.readline())
        assert first["slot"]["slot_name"] == second["slot"]["slot_name"] == "cdc_relay"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_readyz_follows_a_broker_outage_mid_stream(db: str, proxied_kafka):
    box = make_outbox(db, proxied_kafka.bootstrap)
    env, port = with_http(box.env, CDC_RELAY_LAG_SAMPLE_INTERVAL_SECONDS="0.5")
    with RelayProcess(env) as relay:
        wait_until(lambda: get(port, "/readyz")[0] == 200, 60, message=relay.log)
        proxied_kafka.proxy.cut(refuse=True)
        wait_until(lambda: get(port, "/readyz")[0] == 503, 60, message=relay.log)
        assert "Kafka" in get(port, "/readyz")[1]
        assert get(port, "/healthz")[0] == 200  # alive: it keeps the replication link
        proxied_kafka.proxy.restore()
        wait_until(lambda: get(port, "/readyz")[0] == 200, 60, message=relay.log)
        end = insert_events(db, count=20, per_txn=10)
        wait_confirmed_past(db, end)
        assert relay.stop() == 0


def test_status_watch_on_a_terminal_redraws_in_place(outbox: Outbox):
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdc_relay", "status", "--watch", "0.2"],
        env=outbox.env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        cwd=tempfile.gettempdir(),
    )
    os.close(follower)
    output = b""
    try:

        def redrawn_twice() -> bool:
            nonlocal output
            if select.select([leader], [], [], 0.5)[0]:
                output += os.read(leader, 65536)
            return output.count(b"\x1b[H\x1b[2J") >= 2

        wait_until(redrawn_twice, 60, message=lambda: output.decode(errors="replace"))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        text = output.decode(errors="replace")
        assert "slot          cdc_relay" in text and "Ctrl-C" in text
        assert "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(leader)
