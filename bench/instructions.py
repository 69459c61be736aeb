"""Instructions per event of the relay's hot path, counted by valgrind's callgrind: unlike CPU
time, the count is the same run after run, whatever else the shared machine is doing.

``python -m bench.instructions [--transactions N] [--core VARIANT] [--parts ...]`` runs, for
each variant (``pure``: the pure-Python core, CDC_RELAY_PURE_PYTHON=1; ``callbacks``: the
compiled core with confluent-kafka's per-record delivery callbacks, CDC_RELAY_ACKS_BY_CALLBACKS=1;
``acks``: the compiled core with acknowledgements counted in C and inserts decoded in Python,
CDC_RELAY_ROWS_IN_PYTHON=1; ``compiled``: as built, plain inserts decoded, mapped and produced
in C too; ``both``: pure and compiled; ``all``, the default: the four), one callgrind child per
part and prints instructions per event:

- ``session``: bench/hotpath.py's run, the whole in-process hot path (frames → the session's
  read loop → the pipeline → records → a fake producer → delivery callbacks);
- ``pipeline``: ``Pipeline.feed`` over the same frames, and the delivery callbacks;
- ``decode``: ``Decoder.decode`` of each frame's pgoutput message, in place;
- ``map``: ``TablePlan.map`` of each decoded insert;
- ``ack``: the ack tracker's work per event: begin/commit per transaction, a record counted
  in flight and its delivery callback per event;
- ``kafka``: ``session`` with the relay's real producer (cdc_relay/adapters/kafka.py, the
  relay's producer settings) against librdkafka's in-process mock broker
  (``test.mock.num.brokers``), polled until every record is acknowledged: real ``produce()``
  calls and real delivery reports. Only the main thread is counted (what `make bench` calls
  the relay's Python thread); librdkafka's own threads, and the mock broker's, are not.

Only the measured region is counted: the child enters it through ``functools.reduce``, a C
function that nothing else here calls, and callgrind collects inside it alone
(``--toggle-collect``), so start-up, imports and building the frames are left out.
``--keep DIR`` keeps the callgrind files for ``callgrind_annotate --inclusive=yes``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import hotpath
from tests.integration.relay_process import IMPLEMENTATION_SWITCHES

PARTS = ("session", "pipeline", "decode", "map", "ack", "kafka")
TOGGLE = "functools_reduce"


# --------------------------------------------------------------------------- the child


def _region(frames: list[bytes], part: str) -> Callable[[], int]:
    """The measured work of ``part`` over ``frames``, made ready: returns the events handled."""
    from cdc_relay.core.acks import AckTracker
    from cdc_relay.core.copydata import XLOG_DATA_HEADER_SIZE
    from cdc_relay.core.lsn import Lsn
    from cdc_relay.core.mapping import ColumnMapping, OutboxRecord, TablePlan
    from cdc_relay.core.pgoutput import Begin, Commit, Decoder, Insert, Relation
    from cdc_relay.core.pipeline import Pipeline, PipelineConfig

    if part == "session":
        return lambda: hotpath.run_once(frames)[1]
    if part == "kafka":
        return _with_mock_kafka(frames)
    if part == "pipeline":
        pipeline = Pipeline(PipelineConfig(outbox_table=("public", "outbox")), start=Lsn(0))

        def feed_all() -> int:
            publisher = hotpath._AcknowledgingPublisher()
            feed, produce = pipeline.feed, publisher.produce
            for n, frame in enumerate(frames):
                out = feed(frame)
                if type(out) is OutboxRecord:
                    produce(out, pipeline.delivery)
                if n % 2_000 == 0:
                    publisher.poll()
            publisher.poll()
            return pipeline.stats.published

        return feed_all
    decoder = Decoder()
    messages = [decoder.decode(f, offset=XLOG_DATA_HEADER_SIZE) for f in frames]
    inserts = [m for m in messages if type(m) is Insert]
    if part == "decode":

        def decode_all() -> int:
            decode = Decoder().decode
            for frame in frames:
                decode(frame, offset=XLOG_DATA_HEADER_SIZE)
            return len(inserts)

        return decode_all
    relation = next(m for m in messages if type(m) is Relation)
    plan = TablePlan(relation, ColumnMapping(), "outbox.event.{aggregate_type}")
    if part == "map":
        rows = [m.new for m in inserts]
        plan.map(rows[0])  # the topic, cached as in a running relay

        def map_all() -> int:
            map_row = plan.map
            for row in rows:
                map_row(row)
            return len(rows)

        return map_all
    if part == "ack":
        acks: list[Any] = []
        record = plan.map(inserts[0].new)
        ack = hotpath._Acknowledgement(record.key, record.value)
        size = len(record.key or b"") + len(record.value or b"")
        shape = [type(m) for m in messages if type(m) in (Begin, Insert, Commit)]
        begins = [m for m in messages if type(m) is Begin]
        commits = [m for m in messages if type(m) is Commit]

        def ack_all() -> int:
            tracker = AckTracker(Lsn(0))
            sent, begin, commit = tracker.sent, tracker.begin, tracker.commit
            b = c = 0
            txn: Any = None
            for kind in shape:
                if kind is Insert:
                    sent(txn, size)
                    acks.append(txn)
                elif kind is Begin:
                    txn = begin(begins[b].final_lsn, begins[b].commit_time)
                    b += 1
                else:
                    commit(txn, commits[c].end_lsn)
                    c += 1
                    if len(acks) >= 2_000:
                        for delivery in acks:
                            delivery(None, ack)
                        acks.clear()
            for delivery in acks:
                delivery(None, ack)
            return len(inserts)

        return ack_all
    raise ValueError(part)


def _with_mock_kafka(frames: list[bytes]) -> Callable[[], int]:
    import threading

    from cdc_relay.adapters.kafka import Publisher
    from cdc_relay.core.lsn import Lsn
    from cdc_relay.core.pipeline import Pipeline, PipelineConfig
    from cdc_relay.runtime.session import Session
    from cdc_relay.settings import relay_producer_defaults

    config = relay_producer_defaults("")
    del config["bootstrap.servers"]  # the mock cluster's own
    config["test.mock.num.brokers"] = 1
    publisher = Publisher(config, on_error=lambda error: None)
    # The C row path, where the tree has one (a baseline from before it has not).
    rows: dict[str, Any] = {"rows": publisher.rows()} if hasattr(publisher, "rows") else {}
    pipeline = Pipeline(PipelineConfig(outbox_table=("public", "outbox")), start=Lsn(0), **rows)
    session = Session(
        pipeline=pipeline,
        stream=hotpath._FrameStream(frames),
        publisher=publisher,
        stop=threading.Event(),
    )
    publisher.wait_for_broker(10.0)

    def run() -> int:
        stats = pipeline.stats
        while True:  # as Session.step: read a batch, serve delivery reports
            before = stats.published
            session.read_batch()
            publisher.poll(0)
            if stats.published == before:
                break
        while pipeline.tracker.in_flight_events:
            publisher.poll(0.05)
        return stats.published

    return run


def _child(transactions: int, part: str) -> None:
    try:
        from cdc_relay.core import native

        core = native.describe()
    except ImportError:  # a tree from before the compiled core (a baseline)
        core = "pure-Python core"
    try:
        from cdc_relay.adapters import native_acks

        core += f"; {native_acks.describe()}"
    except ImportError:  # a tree from before the C ack path
        pass
    frames = hotpath.make_frames(transactions)
    work = _region(frames, part)
    events = functools.reduce(lambda _none, _item: work(), (0,), 0)
    print(json.dumps({"events": events, "core": core}))


# --------------------------------------------------------------------------- the parent


# What each --core variant sets: the pure-Python core; the compiled core with confluent-kafka's
# per-record callbacks counting acknowledgements; with the C acknowledgement path but inserts
# decoded in Python; the compiled core as built (acknowledgements and plain inserts in C).
VARIANTS = {
    "pure": {"CDC_RELAY_PURE_PYTHON": "1"},
    "callbacks": {"CDC_RELAY_ACKS_BY_CALLBACKS": "1"},
    "acks": {"CDC_RELAY_ROWS_IN_PYTHON": "1"},
    "compiled": {},
}
CORE_CHOICES = {
    "pure": ["pure"],
    "callbacks": ["callbacks"],
    "acks": ["acks"],
    "compiled": ["compiled"],
    "both": ["pure", "compiled"],
    "all": ["pure", "callbacks", "acks", "compiled"],
}


def _count(transactions: int, part: str, variant: str, keep: Path | None) -> tuple[int, int, str]:
    """(instructions, events, core) of one child run under callgrind."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    for name in IMPLEMENTATION_SWITCHES:
        env.pop(name, None)
    env.update(VARIANTS[variant])
    with tempfile.TemporaryDirectory() as tmp:
        folder = keep or Path(tmp)
        out = folder / f"callgrind.{variant}.{part}.out"
        result = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--collect-atstart=no",
                f"--toggle-collect={TOGGLE}",
                # Threads apart: the main thread's file ends in -01 (the only one for the
                # other parts, which start no thread).
                "--separate-threads=yes",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                "bench.instructions",
                "--child",
                part,
                "--transactions",
                str(transactions),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        report = json.loads(result.stdout.strip().splitlines()[-1])
        text = Path(f"{out}-01").read_text()
    match = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no totals in {out}")
    return int(match.group(1)), int(report["events"]), str(report["core"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--transactions", type=int, default=1_000, help="of 10 events each")
    parser.add_argument("--core", choices=tuple(CORE_CHOICES), default="all")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--keep", type=Path, help="keep the callgrind files in this folder")
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.transactions, args.child)
        return 0
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    variants = CORE_CHOICES[args.core]
    rows: dict[str, dict[str, float]] = {}
    for variant in variants:
        for part in args.parts:
            total, events, core = _count(args.transactions, part, variant, args.keep)
            rows.setdefault(part, {})[variant] = total / events
            print(f"{core:>40}  {part:<9} {total / events:>9,.0f} instructions/event", flush=True)
    if len(variants) > 1:
        first, last = variants[0], variants[-1]
        print()
        print(f"| part | {' | '.join(variants)} | {first} / {last} |")
        print("|---|" + "---:|" * (len(variants) + 1))
        for part, by_variant in rows.items():
            counts = " | ".join(f"{by_variant[v]:,.0f}" for v in variants)
            print(f"| {part} | {counts} | {by_variant[first] / by_variant[last]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
