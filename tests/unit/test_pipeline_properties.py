"""Stateful property tests: whole histories played against the real driver and pipeline over
simulated I/O (tests/sim.py). Hypothesis interleaves writers' transactions, reads, broker
batches and answers (in order per partition, in any order across partitions), batch-wide
refusals, records too large for the producer or the topic, fatal producer errors, keepalives
with and without reply requests, lost replication connections, crashes, clean stops and, under
the halt policy, operator skips. Events are outbox rows or logical decoding messages with the
relay's prefix, mixed within transactions.

After every step: the confirmed position never passes an event that is neither on its topic
nor dead-lettered, and never moves back (tests/sim.py, Server.status); per key, the first
occurrences of events on the topic are in commit order, across resets and crashes; in-flight
events, bytes and the ack tracker's queue stay within the configured bounds. At the end, with
the broker answering everything: every insert is on its topic, dead-lettered, or behind a halt.

Profiles: ``ci`` (the default, run by `make test`: a bounded number of examples, well under a
minute) and ``faults`` (`make test-faults`: many more, longer histories), chosen with
CDC_RELAY_FAULTS_SCALE like the fault suite.
"""

from __future__ import annotations

import logging
import os
import random

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cdc_relay.core.pipeline import PipelineConfig
from cdc_relay.core.transactions import TransactionLimits
from tests import sim

settings.register_profile(
    "ci",
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "faults",
    max_examples=1_500,
    stateful_step_count=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Dead letters and halts log a line each: thousands per run here, none worth reading.
QUIET = logging.getLogger("cdc_relay.runtime.session")
PROFILE = "faults" if os.environ.get("CDC_RELAY_FAULTS_SCALE", "ci") == "full" else "ci"

KEYS = st.sampled_from("abcdefgh")
# Mostly ordinary events; now and then one too large for the topic or for the producer.
SIZES = st.sampled_from([20] * 12 + [300, sim.BROKER_LIMIT + 100, sim.CLIENT_LIMIT + 100])
EXTRA_BYTES = sim.CLIENT_LIMIT + 200  # one record may cross the bytes bound before reading stops


class PipelineHistories(RuleBasedStateMachine):
    @initialize(
        seed=st.integers(0, 2**32 - 1),
        halt=st.booleans(),
        exactly_once=st.booleans(),
        max_events=st.integers(2, 40),
        max_bytes=st.integers(100, 20_000),
        backlog=st.lists(st.lists(st.tuples(KEYS, st.booleans()), max_size=8), max_size=25),
        data=st.data(),
    )
    def start(
        self,
        seed: int,
        halt: bool,
        exactly_once: bool,
        max_events: int,
        max_bytes: int,
        backlog: list[list[tuple[str, bool]]],
        data: st.DataObject,
    ) -> None:
        QUIET.disabled = True
        self.server = sim.Server()
        self.server.landed = self.landed
        self.config = PipelineConfig(
            outbox_table=("public", "outbox"),
            message_prefix="cdc_relay.outbox",
            dead_letter_topic=sim.DEAD_LETTER_TOPIC,
            halt_on_bad_row=halt,
            max_in_flight_events=max_events,
            max_in_flight_bytes=max_bytes,
            status_interval=1.0,
            max_silence=10.0,
            shutdown_timeout=30.0,
            exactly_once=exactly_once,
            transaction_limits=TransactionLimits(
                max_events=max(1, max_events // 2), max_seconds=1.0
            ),
            progress_topic=sim.PROGRESS_TOPIC,
        )
        self.relay = sim.Relay(self.server, self.config, random.Random(seed))
        for events in backlog:  # what is in the WAL before the relay starts
            keys = [key for key, _ in events]
            messages = [message for _, message in events]
            self.server.write(keys, [data.draw(SIZES) for _ in keys], messages)

    # ------------------------------------------------------------------ what landed

    def landed(self, event: sim.Event) -> bool:
        for (_topic, _partition), log in self.relay.broker.logs.items():
            for message in log:
                if dict(message.headers()).get("id") == event.event_id.encode():
                    return True
        return False

    # ------------------------------------------------------------------ rules

    @rule(events=st.lists(st.tuples(KEYS, st.booleans()), max_size=6), data=st.data())
    def write(self, events: list[tuple[str, bool]], data: st.DataObject) -> None:
        if len(self.server.txns) < 60:
            keys = [key for key, _ in events]
            sizes = [data.draw(SIZES) for _ in keys]
            self.server.write(keys, sizes, [message for _, message in events])

    @rule(turns=st.integers(1, 8))
    def drive(self, turns: int) -> None:
        for _ in range(turns):
            self.relay.step()

    @rule(choice=st.integers(0, 100), max_batch=st.integers(1, 6))
    def broker_sends(self, choice: int, max_batch: int) -> None:
        partitions = self.relay.producer.partitions()
        if partitions:
            self.relay.producer.send(partitions[choice % len(partitions)], max_batch)

    @rule(choice=st.integers(0, 100))
    def broker_answers(self, choice: int) -> None:
        partitions = self.relay.producer.partitions()
        if partitions:
            self.relay.producer.respond(partitions[choice % len(partitions)])

    @rule()
    def producer_fails_for_good(self) -> None:
        if self.relay.producer.outstanding():
            self.relay.producer.fail_everything("a fatal producer error (simulated)")

    @rule(reply=st.booleans())
    def keepalive(self, reply: bool) -> None:
        self.server.keepalive(reply)

    @rule(seconds=st.floats(0.1, 15.0))
    def time_passes(self, seconds: float) -> None:
        self.relay.clock.now += seconds

    @rule()
    def connection_lost(self) -> None:
        self.relay.stream.broken = True

    @rule()
    def crash(self) -> None:
        self.relay.crash()

    @rule()
    def stop(self) -> None:
        self.relay.stop.value = True

    @precondition(lambda self: self.relay.halted is not None)
    @rule()
    def operator_skips(self) -> None:
        self.relay.skip_halted()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def within_bounds(self) -> None:
        tracker = self.relay.pipeline.tracker
        assert tracker.in_flight_events <= self.config.max_in_flight_events
        assert tracker.in_flight_bytes <= self.config.max_in_flight_bytes + EXTRA_BYTES
        assert tracker.queued <= self.config.max_in_flight_events + 1

    @invariant()
    def only_refused_events_are_dead_lettered(self) -> None:
        """A batch refused for one record's sake must not dead-letter its innocent batch-mates
        (KIP-467's _INVALID_DIFFERENT_RECORD, or a batch over the topic's size limit)."""
        skipped = self.relay.skipped_ever
        for message in self.relay.broker.logs.get((sim.DEAD_LETTER_TOPIC, 0), []):
            event = self.server.events[dict(message.headers())["id"].decode()]
            assert event.size > sim.BROKER_LIMIT or event.lsn in skipped, (
                f"event {event.seq} ({event.size} bytes) was dead-lettered, but Kafka never "
                "refused it for its own sake"
            )

    @invariant()
    def exactly_once_means_once(self) -> None:
        """In exactly-once mode a read_committed consumer sees every event at most once, on its
        topic or the dead-letter topic, whatever crashed or was replayed."""
        if not self.config.exactly_once:
            return
        seen: set[str] = set()
        for log in self.relay.broker.logs.values():
            for message in log:
                event_id = dict(message.headers())["id"].decode()
                assert event_id not in seen, f"event {self.server.events[event_id].seq} twice"
                seen.add(event_id)

    @invariant()
    def counters_never_go_down(self) -> None:
        stats = self.relay.stats
        now = (stats.published, stats.dead_lettered, dict(stats.published_by_topic))
        before = getattr(self, "_counters", (0, 0, {}))
        assert now[0] >= before[0] and now[1] >= before[1]
        assert all(now[2].get(topic, 0) >= count for topic, count in before[2].items())
        self._counters = now

    @invariant()
    def per_key_order(self) -> None:
        for (topic, _partition), log in self.relay.broker.logs.items():
            if topic == sim.DEAD_LETTER_TOPIC:
                continue
            seen: set[str] = set()
            last: dict[str, int] = {}
            for message in log:
                event_id = dict(message.headers())["id"].decode()
                if event_id in seen:
                    continue
                seen.add(event_id)
                event = self.server.events[event_id]
                assert event.seq > last.get(event.key, -1), (
                    f"key {event.key}: event {event.seq} first landed after event {last[event.key]}"
                )
                last[event.key] = event.seq

    def teardown(self) -> None:
        try:
            self._run_to_the_end()
        finally:
            QUIET.disabled = False

    def _run_to_the_end(self) -> None:
        if not hasattr(self, "relay"):
            return
        relay, server = self.relay, self.server
        relay.stream.broken = False
        for _ in range(5_000):
            if relay.halted is not None or not server.txns:
                break
            if server.slot_confirmed >= server.txns[-1].end_lsn:
                break
            relay.step()
            relay.producer.progress()
            relay.clock.now += 0.5
        if relay.halted is None:
            assert not server.txns or server.slot_confirmed >= server.txns[-1].end_lsn, (
                "the relay did not get through the WAL"
            )
        stats = relay.stats
        event(f"sessions: {min(relay.sessions, 5)}+")
        for name, _count in sorted(stats.delivery_errors.items()):
            event(f"delivery errors: {name}")
        if stats.dead_lettered:
            event("dead letters")
        if relay.halted is not None:
            event("halted")
        if self.config.exactly_once:
            event(f"exactly-once, progress records: {min(len(relay.broker.progress), 5)}+")
        if relay.memory.skips:
            event("operator skip")
        if relay.kept:
            event("kept rows")
        event(f"events written: {min(len(server.events) // 20 * 20, 100)}+")
        # Everything confirmed is on its topic or dead-lettered (checked at every status);
        # what is not confirmed is behind the halt.
        if relay.halted is not None:
            assert relay.halted.lsn is None or relay.halted.lsn > server.slot_confirmed - 2**40
            halted_txn = next(
                (t for t in server.txns if any(e.lsn == relay.halted.lsn for e in t.events)),
                None,
            )
            if halted_txn is not None:
                assert server.slot_confirmed < halted_txn.end_lsn


PipelineHistories.TestCase.settings = settings.get_profile(PROFILE)
test_pipeline_histories = PipelineHistories.TestCase
