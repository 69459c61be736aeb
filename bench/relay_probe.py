"""`cdc-relay run` with one hook for the latency runs: the time of each acknowledgement.

``python -m bench.relay_probe run`` (env BENCH_ACK_LOG=<file>) wraps the delivery callback
that the publisher hands to librdkafka with each record (a transaction of the ack tracker) to
note when each ack was seen; the rest is the unchanged relay. The wrap is done in the publisher,
a Python class: the ack tracker's classes may be compiled (cdc_relay/core/native.py), and a
compiled class's methods cannot be replaced.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from typing import Any

from bench.acklog import AckLog
from cdc_relay.adapters.kafka import Publisher
from cdc_relay.cli import main


def install(log: AckLog) -> None:
    produce = Publisher.produce
    entries = log.entries

    def noting_produce(self: Publisher, record: Any, on_delivery: Any, *rest: Any) -> None:
        def noted(err: Any, msg: Any) -> None:
            if err is None:
                entries.append((msg.value(), time.time()))
            on_delivery(err, msg)

        produce(self, record, noted, *rest)

    Publisher.produce = noting_produce  # type: ignore[method-assign, assignment]
    atexit.register(log.write)


if __name__ == "__main__":
    install(AckLog(os.environ["BENCH_ACK_LOG"]))
    sys.exit(main(sys.argv[1:]))
