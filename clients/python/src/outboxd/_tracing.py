"""The W3C trace context of the current OpenTelemetry span, as gRPC metadata.

Active when `opentelemetry-api` is installed (the `otel` extra); outboxd stores
it with each event and writes it into the Kafka record's headers, so the
caller's trace continues through outboxd to the consumer.
"""

from __future__ import annotations

from typing import Any

_propagator: Any
try:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the otel extra is not installed
    _propagator = None
else:
    _propagator = TraceContextTextMapPropagator()


def available() -> bool:
    return _propagator is not None


def trace_metadata() -> list[tuple[str, str]]:
    """`traceparent` (and `tracestate`) of the current span; empty without one."""
    if _propagator is None:
        return []
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return [(key, value) for key, value in carrier.items() if key in ("traceparent", "tracestate")]
