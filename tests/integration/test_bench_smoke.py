"""`make bench` in miniature: every contender runs end to end and the report is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_a_tiny_bench_run_writes_the_table(tmp_path: Path) -> None:
    output = tmp_path / "performance.md"
    output.write_text("# Performance\n\nhand-written analysis stays\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--events",
            "2000",
            "--repeat",
            "1",
            "--sweep-events",
            "1000",
            "--latency-seconds",
            "1",
            "--rate",
            "500",
            "--skip-rss",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = output.read_text()
    assert "hand-written analysis stays" in text
    for row in ("| (a) ceiling, stream |", "| (b) ceiling, broker |", "| (c) cdc-relay |"):
        assert row in text
    assert "| (d) polling relay, batch " in text
    # (g): the same events as logical decoding messages, and the producer side.
    assert "| (g) ceiling, stream of message events |" in text
    assert "| (g) cdc-relay, message events |" in text
    assert "| `emit_event` | 1 |" in text and "| `add_event` | 1 |" in text
    # Both relays delivered every event of the latency run and have a latency figure.
    assert "(c) p99 latency" in text
    assert text.count(" / ") >= 2


def test_a_tiny_scale_out_run_writes_its_table(tmp_path: Path) -> None:
    output = tmp_path / "performance.md"
    output.write_text("# Performance\n\nhand-written analysis stays\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.scale_out",
            "--events",
            "2000",
            "--repeat",
            "1",
            "--slots",
            "1,2",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = output.read_text()
    assert "hand-written analysis stays" in text
    # Bare loops: 1 and 2 slots over the whole outbox, 2 over half of it each, 1 decoding only;
    # cdc-relay: one relay on the root, and one per partition.
    rows = [line for line in text.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 6, text
    assert "Reader cdc-relay" in text
