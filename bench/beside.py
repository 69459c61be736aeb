"""A consumer on the relay's machine: what a sidecar shares its cores with.

Run as its own process (``python -m bench.beside BOOTSTRAP TOPIC EXPECTED``) while the relay
drains, it reads the topic from the beginning and parses every value, the way a downstream
service would, until it has seen EXPECTED records; then prints one JSON line with what it read
and the CPU it used (all its threads: librdkafka's fetchers too).
"""

from __future__ import annotations

import json
import sys
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

BATCH = 500


def consume(bootstrap: str, topic: str, expected: int, timeout: float) -> dict[str, float]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-beside-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "allow.auto.create.topics": False,
            "log_level": 0,
        }
    )
    deadline = time.monotonic() + timeout
    seen = 0
    try:
        while True:  # the relay creates the topic with its first record
            described = consumer.list_topics(timeout=1.0).topics.get(topic)
            if described is not None and described.error is None and described.partitions:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic} never appeared")
            time.sleep(0.05)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in described.partitions])
        while seen < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"consumed {seen} of {expected} records")
            for msg in consumer.consume(BATCH, 0.5):
                if msg.error() is None:
                    json.loads(msg.value())  # type: ignore[arg-type]
                    seen += 1
    finally:
        consumer.close()
    return {"consumed": seen, "cpu_seconds": time.process_time()}


def main(argv: list[str]) -> int:
    bootstrap, topic, expected = argv[0], argv[1], int(argv[2])
    timeout = float(argv[3]) if len(argv) > 3 else 900.0
    print(json.dumps(consume(bootstrap, topic, expected, timeout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
