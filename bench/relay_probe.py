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
from cdc_relay.core.acks import Transaction, record_size
from cdc_relay.core.pipeline import RowProducer


class _NotingRows:
    """The C row path (Publisher.rows()), each record produced with a noting token; the
    record's value comes from Rows.map(), which shares produce()'s code and caches."""

    def __init__(self, rows: Any, noting: Any) -> None:
        self._rows, self._noting = rows, noting

    def plan(self, relid: int, spec: Any, counts: dict[str, int], /) -> None:
        self._rows.plan(relid, spec, counts)

    def forget(self, relid: int, /) -> bool:
        return bool(self._rows.forget(relid))

    def produce(self, frame: Any, token: Any, /) -> int:
        mapped = self._rows.map(frame)
        if mapped is None:
            return -1  # produce() would leave it too: the pipeline's feed() takes it
        return int(self._rows.produce(frame, self._noting(token, mapped[2])))

    def fold_counts(self) -> None:
        self._rows.fold_counts()


def install(log: AckLog) -> None:
    """Every way a record reaches librdkafka: ``Publisher.produce`` (the driver's careful
    path), ``Publisher.enqueue`` (confluent-kafka's produce() itself, which Pipeline.pump calls
    for plain records) and the C row path (``Publisher.rows()``, which the pump offers plain
    inserts first)."""
    produce, init, rows_of = Publisher.produce, Publisher.__init__, Publisher.rows
    entries = log.entries

    def noting(on_delivery: Any, value: bytes | None) -> Any:
        """A callback for one record. On the C ack path (cdc_relay/adapters/native_acks.py)
        a token that is not a transaction is called once per acknowledged record with no
        message; the transaction it stands for is then told of its one record."""

        def noted(err: Any, msg: Any) -> None:
            if err is None:
                entries.append((value, time.time()))
                if msg is None and type(on_delivery) is Transaction:
                    on_delivery.acked(1, record_size(value))
                    return
            on_delivery(err, msg)

        return noted

    def noting_produce(self: Publisher, record: Any, on_delivery: Any, *rest: Any) -> None:
        produce(self, record, noting(on_delivery, record.value), *rest)

    def noting_init(self: Publisher, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        enqueue = self.enqueue

        def noting_enqueue(
            topic: Any, value: Any, key: Any, partition: Any, callback: Any, *rest: Any
        ) -> object:
            return enqueue(topic, value, key, partition, noting(callback, value), *rest)

        self.enqueue = noting_enqueue

    def noting_rows(self: Publisher) -> RowProducer | None:  # mypy holds it to the protocol
        rows = rows_of(self)
        return None if rows is None else _NotingRows(rows, noting)

    Publisher.produce = noting_produce  # type: ignore[method-assign, assignment]
    Publisher.rows = noting_rows  # type: ignore[method-assign]
    Publisher.__init__ = noting_init  # type: ignore[method-assign]
    atexit.register(log.write)


if __name__ == "__main__":
    install(AckLog(os.environ["BENCH_ACK_LOG"]))
    sys.exit(main(sys.argv[1:]))
