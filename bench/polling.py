"""(d) The classic polling relay, as the outbox articles write it.

Claim a batch with FOR UPDATE SKIP LOCKED, produce it, flush, mark it published, commit.
Written fairly: the same producer settings as cdc-relay, a partial index on the unpublished
rows, one prepared claim and one UPDATE per batch, and no sleep while batches come back full.

Run as its own process, like the relay: ``python -m bench.polling --url ... --bootstrap ...``.
With ``--drain`` it exits once a claim finds nothing; otherwise it runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import uuid
from typing import Any

import psycopg
from confluent_kafka import Producer

from bench.acklog import AckLog
from bench.workload import POLLING_TABLE
from cdc_relay.settings import relay_producer_defaults

CLAIM = (
    "SELECT position, id::text, aggregate_type, aggregate_id, event_type, payload::text, "
    "(extract(epoch FROM created_at) * 1000)::bigint "
    f"FROM {POLLING_TABLE} WHERE published_at IS NULL ORDER BY position "
    "LIMIT %s FOR UPDATE SKIP LOCKED"
)
MARK = f"UPDATE {POLLING_TABLE} SET published_at = now() WHERE position = ANY(%s)"


class _Deliveries:
    __slots__ = ("acks", "failed", "ok")

    def __init__(self, acks: AckLog | None) -> None:
        self.ok = 0
        self.failed = 0
        self.acks = acks

    def __call__(self, err: Any, msg: Any) -> None:
        if err is None:
            self.ok += 1
            if self.acks is not None:
                self.acks.entries.append((msg.value(), time.time()))
        else:
            self.failed += 1


def run(
    url: str,
    producer_config: dict[str, Any],
    *,
    topic_prefix: str,
    batch: int,
    poll_interval: float,
    drain: bool,
    acks: AckLog | None = None,
) -> int:
    """Relay until stopped (or, with ``drain``, until a claim finds nothing); returns the
    number of events published."""
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    producer = Producer(producer_config)
    deliveries = _Deliveries(acks)
    topics: dict[str, str] = {}
    published = 0
    with psycopg.connect(url) as conn:
        while not stopping:
            with conn.transaction():
                rows = conn.execute(CLAIM, (batch,), prepare=True).fetchall()
                if rows:
                    before = deliveries.ok
                    for _, event_id, agg_type, agg_id, event_type, payload, ts in rows:
                        topic = topics.get(agg_type)
                        if topic is None:
                            topic = topics[agg_type] = f"{topic_prefix}.{agg_type}"
                        headers = [
                            ("id", event_id.encode()),
                            ("event_type", event_type.encode()),
                            ("aggregate_type", agg_type.encode()),
                        ]
                        while True:
                            try:
                                producer.produce(
                                    topic,
                                    payload.encode(),
                                    agg_id.encode(),
                                    headers=headers,
                                    timestamp=ts,
                                    on_delivery=deliveries,
                                )
                                break
                            except BufferError:
                                producer.poll(0.05)
                    if (
                        producer.flush(60)
                        or deliveries.failed
                        or deliveries.ok - before != len(rows)
                    ):
                        raise RuntimeError("the broker did not acknowledge the batch")
                    conn.execute(MARK, ([row[0] for row in rows],), prepare=True)
                    published += len(rows)
            if len(rows) < batch:
                if drain and not rows:
                    break
                time.sleep(poll_interval)
    return published


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic-prefix", default=f"polling-{uuid.uuid4().hex[:8]}")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--poll-interval", type=float, default=0.1)
    parser.add_argument("--drain", action="store_true")
    parser.add_argument("--kafka-config", default="{}", help="JSON merged over the defaults")
    parser.add_argument("--ack-log", help="write each ack's time here on exit (latency runs)")
    args = parser.parse_args(argv)
    config = {**relay_producer_defaults(args.bootstrap), **json.loads(args.kafka_config)}
    config["client.id"] = "polling-relay"
    acks = AckLog(args.ack_log) if args.ack_log else None
    published = run(
        args.url,
        config,
        topic_prefix=args.topic_prefix,
        batch=args.batch,
        poll_interval=args.poll_interval,
        drain=args.drain,
        acks=acks,
    )
    if acks is not None:
        acks.write()
    print(f"published={published}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
