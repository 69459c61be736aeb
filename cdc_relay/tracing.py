"""Trace context across the outbox: the producer's W3C ``traceparent`` (and ``tracestate``) go
into an event's headers, the relay publishes them as Kafka headers, and a consumer continues
the trace from them (W3C Trace Context, through OpenTelemetry's TraceContextTextMapPropagator).

OpenTelemetry is optional (``pip install 'cdc-relay[otel]'``): without it every helper here is a
no-op (headers unchanged, no context, no span), and importing this module never imports it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias, overload

from cdc_relay import __version__

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# Set on the consumer's span when the inbox found the event processed before and skipped it.
DUPLICATE_ATTRIBUTE = "cdc_relay.inbox.duplicate"

KafkaHeaders: TypeAlias = Sequence[tuple[str, bytes | str | None]] | None
"""A consumed record's headers, as confluent-kafka's ``message.headers()`` gives them."""


@dataclass(frozen=True, slots=True)
class _Otel:
    trace: ModuleType
    propagator: TraceContextTextMapPropagator
    tracer: Tracer


@functools.cache
def _otel() -> _Otel | None:
    # Imported on first use and remembered, absence included: a service without OpenTelemetry
    # pays one failed import, once.
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return None
    # The W3C propagator itself, not the global one (OTEL_PROPAGATORS may name B3, Jaeger or
    # baggage): the outbox stores exactly traceparent and tracestate. get_tracer on the API's
    # proxy provider follows a provider the application sets later.
    return _Otel(trace, TraceContextTextMapPropagator(), trace.get_tracer(__name__, __version__))


def available() -> bool:
    """Whether OpenTelemetry's API is installed (otherwise the helpers here do nothing)."""
    return _otel() is not None


def current_trace_headers() -> dict[str, str]:
    """``traceparent`` (and ``tracestate`` when not empty) of the current span; empty without a
    valid current span or without OpenTelemetry."""
    otel = _otel()
    carrier: dict[str, str] = {}
    if otel is not None:
        otel.propagator.inject(carrier)
    return carrier


@overload
def with_trace_context(headers: Mapping[str, Any]) -> Mapping[str, Any]: ...


@overload
def with_trace_context(headers: None = None) -> Mapping[str, Any] | None: ...


def with_trace_context(headers: Mapping[str, Any] | None = None) -> Mapping[str, Any] | None:
    """Outbox headers with the current span's trace context added, for ``add_event(headers=)``.

    Returns ``headers`` itself (None included) when it already has a ``traceparent`` (the
    caller's wins, which also makes this idempotent), when there is no valid current span, or
    without OpenTelemetry. Otherwise a new dict: the caller's headers, then ``traceparent`` and
    ``tracestate`` (a caller's lone ``tracestate`` belongs to no trace and is replaced).
    """
    if headers is not None and TRACEPARENT in headers:
        return headers
    context = current_trace_headers()
    if not context:
        return headers
    merged = {name: value for name, value in (headers or {}).items() if name != TRACESTATE}
    merged.update(context)
    return merged


def context_from_headers(headers: KafkaHeaders) -> Context | None:
    """The producer's trace context from a consumed record's Kafka headers, to pass as
    ``context=`` when starting the consumer's span; None when the record carries no valid
    ``traceparent`` or without OpenTelemetry."""
    otel = _otel()
    if otel is None or not headers:
        return None
    carrier: dict[str, str] = {}
    for name, value in headers:
        if name in (TRACEPARENT, TRACESTATE) and value is not None:
            # W3C trace context is ASCII; latin-1 never fails, and anything else the propagator
            # rejects as malformed.
            carrier[name] = value.decode("latin-1") if isinstance(value, bytes) else value
    if TRACEPARENT not in carrier:
        return None
    context = otel.propagator.extract(carrier)
    if not otel.trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


_NO_SPAN: nullcontext[None] = nullcontext()


def process_span(
    headers: KafkaHeaders,
    *,
    topic: str | None = None,
    key: bytes | str | None = None,
    event_id: str | None = None,
) -> AbstractContextManager[Span | None]:
    """A context manager around the processing of one consumed record: when the record carries
    a trace context, the current span inside it is a CONSUMER span ``process {topic}`` whose
    parent is the producer's span, with the messaging attributes of OpenTelemetry's semantic
    conventions (an exception leaving it is recorded and marks it as an error). Otherwise it
    yields None and does nothing.
    """
    if not headers:
        return _NO_SPAN
    context = context_from_headers(headers)
    otel = _otel()
    if context is None or otel is None:
        return _NO_SPAN
    attributes: dict[str, str] = {
        "messaging.system": "kafka",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
    }
    if topic is not None:
        attributes["messaging.destination.name"] = topic
    if key is not None:
        attributes["messaging.kafka.message.key"] = (
            key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        )
    if event_id is not None:
        attributes["messaging.message.id"] = event_id
    # "{operation} {destination}", as the messaging conventions name spans since 1.26.
    name = f"process {topic}" if topic is not None else "process"
    return otel.tracer.start_as_current_span(
        name, context=context, kind=otel.trace.SpanKind.CONSUMER, attributes=attributes
    )
