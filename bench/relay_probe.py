"""`cdc-relay run` with one hook for the latency runs: the time of each acknowledgement.

``python -m bench.relay_probe run`` (env BENCH_ACK_LOG=<file>) wraps the delivery callback
(a transaction of the ack tracker, called for every record's delivery report) to note when
each ack was seen; the rest is the unchanged relay.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from typing import Any

from bench.acklog import AckLog
from cdc_relay.cli import main
from cdc_relay.core.acks import Transaction


def install(log: AckLog) -> None:
    original = Transaction.__call__
    entries = log.entries

    def on_delivery(self: Transaction, err: Any, msg: Any) -> None:
        if err is None:
            entries.append((msg.value(), time.time()))
        original(self, err, msg)

    Transaction.__call__ = on_delivery  # type: ignore[method-assign]
    atexit.register(log.write)


if __name__ == "__main__":
    install(AckLog(os.environ["BENCH_ACK_LOG"]))
    sys.exit(main(sys.argv[1:]))
