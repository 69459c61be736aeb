"""Trace context across the outbox, without servers: the producer's span into outbox headers,
through the relay's mapping into Kafka headers, and back out as the consumer span's parent."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from cdc_relay import tracing
from cdc_relay.core.mapping import ColumnMapping, TablePlan
from cdc_relay.core.pgoutput import Column, Oid, Relation
from cdc_relay.outbox import encode_payload

TEXT_OID, JSONB_OID = 25, 3802


def sdk_provider() -> TracerProvider:
    """The process's global SDK provider (set once: OpenTelemetry refuses to replace it)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    return provider


@contextmanager
def recorded_spans() -> Iterator[InMemorySpanExporter]:
    """The spans finished meanwhile by the global provider's tracers, as an application's."""
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    sdk_provider().add_span_processor(processor)
    try:
        yield exporter
    finally:
        processor.shutdown()  # a provider cannot drop a processor; a shut-down one does nothing


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with recorded_spans() as exporter:
        yield exporter


@pytest.fixture
def tracer(spans: InMemorySpanExporter) -> trace.Tracer:
    return trace.get_tracer("a-service")


def traceparent_of(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def test_headers_get_the_current_spans_traceparent(tracer: trace.Tracer):
    given = {"tenant": "acme"}
    with tracer.start_as_current_span("place order") as span:
        headers = tracing.with_trace_context(given)
    assert headers == {"tenant": "acme", "traceparent": traceparent_of(span.get_span_context())}
    assert given == {"tenant": "acme"}  # the caller's mapping is not changed
    with tracer.start_as_current_span("place order") as span:
        assert tracing.with_trace_context() == {
            "traceparent": traceparent_of(span.get_span_context())
        }


def test_the_tracestate_of_the_current_span_goes_along(tracer: trace.Tracer):
    remote = SpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "v1"), ("other", "x")]),
    )
    parent = trace.set_span_in_context(NonRecordingSpan(remote))
    with tracer.start_as_current_span("child", context=parent) as span:
        headers = tracing.with_trace_context({"tracestate": "stale=1"})
    assert headers == {
        "traceparent": traceparent_of(span.get_span_context()),
        "tracestate": "vendor=v1,other=x",  # a lone tracestate of the caller's is replaced
    }
    assert headers["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")


def test_without_a_span_the_headers_are_unchanged(spans: InMemorySpanExporter):
    given = {"tenant": "acme"}
    assert tracing.with_trace_context(given) is given
    assert tracing.with_trace_context(None) is None
    assert tracing.current_trace_headers() == {}


def test_a_traceparent_the_caller_set_is_kept(tracer: trace.Tracer):
    theirs = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    with tracer.start_as_current_span("place order"):
        assert tracing.with_trace_context(theirs) is theirs
        once = tracing.with_trace_context({"tenant": "acme"})
        assert tracing.with_trace_context(once) is once  # idempotent: add_event may add it again


def relay_kafka_headers(outbox_headers: object) -> list[tuple[str, bytes]]:
    """The Kafka headers the relay's mapping makes of an outbox row whose headers column holds
    what add_event writes for ``outbox_headers``."""
    relation = Relation(
        xid=None,
        relid=Oid(16384),
        namespace="public",
        name="outbox",
        replica_identity="d",
        columns=tuple(
            Column(0, name, Oid(oid), -1)
            for name, oid in [
                ("id", TEXT_OID),
                ("aggregate_type", TEXT_OID),
                ("aggregate_id", TEXT_OID),
                ("event_type", TEXT_OID),
                ("payload", JSONB_OID),
                ("headers", JSONB_OID),
            ]
        ),
    )
    plan = TablePlan(relation, ColumnMapping(created_at=None), "outbox.event.{aggregate_type}")
    headers_json = encode_payload(outbox_headers).encode()  # type: ignore[arg-type]
    record = plan.map((b"e-1", b"order", b"order-42", b"OrderPlaced", b"{}", headers_json))
    return record.headers  # type: ignore[union-attr, return-value]


def test_the_trace_context_survives_the_relay_and_parents_the_consumer_span(
    tracer: trace.Tracer, spans: InMemorySpanExporter
):
    with tracer.start_as_current_span("place order") as producer:
        headers = tracing.with_trace_context({"tenant": "acme"})
    kafka_headers = relay_kafka_headers(headers)
    assert dict(kafka_headers)["traceparent"] == headers["traceparent"].encode("ascii")

    context = tracing.context_from_headers(kafka_headers)
    assert context is not None
    remote = trace.get_current_span(context).get_span_context()
    produced = producer.get_span_context()
    assert (remote.trace_id, remote.span_id, remote.is_remote) == (
        produced.trace_id,
        produced.span_id,
        True,
    )

    with tracing.process_span(
        kafka_headers, topic="outbox.event.order", key=b"order-42", event_id="e-1"
    ) as span:
        assert span is not None and trace.get_current_span() is span
    consumer = spans.get_finished_spans()[-1]
    assert consumer.name == "process outbox.event.order"
    assert consumer.kind is SpanKind.CONSUMER
    assert consumer.parent is not None
    assert (consumer.parent.trace_id, consumer.parent.span_id) == (
        produced.trace_id,
        produced.span_id,
    )
    assert consumer.context.trace_id == produced.trace_id
    assert dict(consumer.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": "outbox.event.order",
        "messaging.kafka.message.key": "order-42",
        "messaging.message.id": "e-1",
    }


@pytest.mark.parametrize(
    "headers",
    [
        None,
        [],
        [("id", b"e-1"), ("event_type", b"OrderPlaced")],
        [("traceparent", None)],
        [("traceparent", b"not a traceparent")],
        [("traceparent", b"00-00000000000000000000000000000000-b7ad6b7169203331-01")],
    ],
)
def test_records_without_a_valid_traceparent_start_no_span(
    headers: tracing.KafkaHeaders, spans: InMemorySpanExporter
):
    assert tracing.context_from_headers(headers) is None
    with tracing.process_span(headers, topic="t") as span:
        assert span is None
    assert spans.get_finished_spans() == ()


def test_str_header_values_are_read_too(spans: InMemorySpanExporter):
    value = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    context = tracing.context_from_headers([("traceparent", value), ("tracestate", "k=v")])
    assert context is not None
    remote = trace.get_current_span(context).get_span_context()
    assert (remote.span_id, remote.trace_state.to_header()) == (0xB7AD6B7169203331, "k=v")


def test_an_exception_in_processing_marks_the_consumer_span_as_failed(
    tracer: trace.Tracer, spans: InMemorySpanExporter
):
    with tracer.start_as_current_span("place order"):
        headers = tracing.with_trace_context({})
    kafka_headers = [(name, value.encode()) for name, value in headers.items()]
    with pytest.raises(RuntimeError), tracing.process_span(kafka_headers, topic="t"):
        raise RuntimeError("downstream unavailable")
    consumer = spans.get_finished_spans()[-1]
    assert consumer.status.status_code is StatusCode.ERROR
    assert [event.name for event in consumer.events] == ["exception"]


@pytest.fixture
def without_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """OpenTelemetry as if not installed: every import of it fails (None in sys.modules)."""
    for name in [name for name in sys.modules if name.split(".")[0] == "opentelemetry"]:
        monkeypatch.setitem(sys.modules, name, None)
    tracing._otel.cache_clear()
    yield
    monkeypatch.undo()
    tracing._otel.cache_clear()


def test_without_opentelemetry_every_helper_is_a_no_op(
    tracer: trace.Tracer, without_opentelemetry: None
):
    given = {"tenant": "acme"}
    traced = [("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]
    with tracer.start_as_current_span("place order"):  # started before the imports broke
        assert tracing.available() is False
        assert tracing.with_trace_context(given) is given
        assert tracing.current_trace_headers() == {}
        assert tracing.context_from_headers(traced) is None
        with tracing.process_span(traced, topic="t") as span:
            assert span is None


def test_the_client_helpers_import_and_work_where_opentelemetry_is_not_installed():
    # A fresh interpreter in which the package cannot be found at all, as after a plain
    # `pip install cdc-relay`.
    script = textwrap.dedent(
        """
        import sys

        class NoOpenTelemetry:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "opentelemetry":
                    raise ModuleNotFoundError(name)
                return None

        sys.meta_path.insert(0, NoOpenTelemetry())
        from cdc_relay import inbox, outbox, tracing

        assert not tracing.available()
        assert tracing.with_trace_context({"a": 1}) == {"a": 1}
        traced = [("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")]
        with tracing.process_span(traced) as span:
            assert span is None
        assert not any(name.startswith("opentelemetry") for name in sys.modules)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
