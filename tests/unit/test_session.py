"""The driver carries out the pipeline's decisions over simulated I/O (tests/sim.py): a reset
purges and drains before the session ends (bug 2: nothing of the old session may land after
the replay's records), a record produced alone has nothing else in flight around it."""

from __future__ import annotations

import random

import pytest

from cdc_relay.core.pipeline import Memory, Pipeline, PipelineConfig, State
from cdc_relay.errors import DeliveryError
from cdc_relay.runtime.session import Session, settle_publisher
from tests import sim


def rig(memory: Memory | None = None):
    server = sim.Server()
    clock = sim.Clock()
    broker = sim.Broker()
    producer = sim.Producer(broker, random.Random(1), clock)
    pipeline = Pipeline(
        PipelineConfig(outbox_table=("public", "outbox"), dead_letter_topic=sim.DEAD_LETTER_TOPIC),
        start=server.slot_confirmed,
        memory=memory,
        now=clock.now,
    )
    stop = sim.StopFlag()
    session = Session(
        pipeline=pipeline,
        stream=sim.Stream(server, server.slot_confirmed),
        publisher=producer,
        stop=stop,
        clock=clock,
    )
    return server, producer, pipeline, session, stop


def test_a_reset_purges_what_was_not_sent_and_ends_the_session_only_when_nothing_is_in_flight():
    server, producer, pipeline, session, _ = rig()
    server.landed = lambda event: True
    server.write(["a", "b", "c", "a", "b", "c"], [20] * 6)
    session.step()
    assert producer.outstanding() == 6
    partitions = producer.partitions()
    producer.send(partitions[0], 1)  # on the wire: answered, whatever happens next
    message = producer.queued[partitions[-1]].popleft()
    producer.reports.append((message, sim.Error(-195, "Local: Broker transport failure")))
    session.step()  # the report is judged: a reset, and what was not sent is purged
    assert pipeline.state is State.DRAINING and not any(producer.queued.values())
    with pytest.raises(DeliveryError, match="transport failure"):
        for _ in range(1_000):
            session.step()  # the in-flight batch is answered before the session ends
    assert producer.outstanding() == 0
    assert producer.broker.logs  # the batch on the wire was answered (it landed) first


def test_the_old_producer_is_settled_before_a_replay():
    _, producer, _, session, stop = rig()
    server = session.stream.server  # type: ignore[attr-defined]
    server.write(["a", "b"], [20, 20])
    session.step()
    partition = producer.partitions()[0]
    producer.send(partition, 1)
    assert producer.outstanding() == 2
    settle_publisher(producer, stop, lambda: None)
    assert producer.outstanding() == 0  # purged or answered: nothing can land later
    assert not any(producer.queued.values())


def test_a_record_produced_alone_waits_for_everything_else_before_and_after():
    memory = Memory()
    server, producer, _, session, _ = rig(memory)
    server.landed = lambda event: True
    server.write(["a", "b", "c"], [20, 20, 20])
    isolated = server.write(["a", "b"], [20, 20])
    memory.isolate.add((isolated.final_lsn, sim.TOPIC))
    alone = {event.event_id for event in isolated.events}
    in_flight_at_produce: list[int] = []
    original = producer.produce

    def produce(record, on_delivery, while_waiting=None):
        if dict(record.headers)["id"].decode() in alone:
            in_flight_at_produce.append(producer.outstanding())
        original(record, on_delivery, while_waiting)
        if dict(record.headers)["id"].decode() in alone:
            assert producer.outstanding() == 1

    producer.produce = produce  # type: ignore[method-assign]
    for _ in range(5):
        session.step()
    assert in_flight_at_produce == [0, 0]  # the first three were answered before
