// The W3C trace context of the active OpenTelemetry span, as gRPC metadata.
// Used when the optional peer dependency @opentelemetry/api is installed:
// outboxd writes `traceparent`/`tracestate` into each Kafka record's headers,
// so a consumer continues the caller's trace.
import type { Metadata } from "@grpc/grpc-js";

interface OtelApi {
  trace: {
    getSpan(context: unknown): { spanContext(): SpanContext } | undefined;
  };
  context: { active(): unknown };
  isSpanContextValid(spanContext: SpanContext): boolean;
}

interface SpanContext {
  traceId: string;
  spanId: string;
  traceFlags: number;
  traceState?: { serialize(): string };
}

let api: OtelApi | null | undefined;

function otel(): OtelApi | null {
  if (api === undefined) {
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      api = require("@opentelemetry/api") as OtelApi;
    } catch {
      api = null; // not installed: no trace context
    }
  }
  return api;
}

/** Whether @opentelemetry/api could be loaded. */
export function available(): boolean {
  return otel() !== null;
}

/**
 * `traceparent` (and `tracestate`) of the active span, in W3C form; empty when
 * there is no valid active span or no @opentelemetry/api. The span context is
 * formatted here rather than through the global propagator, so it is sent
 * whatever propagator the application configured.
 */
export function traceHeaders(): [string, string][] {
  const otelApi = otel();
  if (otelApi === null) return [];
  const span = otelApi.trace.getSpan(otelApi.context.active());
  if (span === undefined) return [];
  const spanContext = span.spanContext();
  if (!otelApi.isSpanContextValid(spanContext)) return [];
  const flags = (spanContext.traceFlags & 0xff).toString(16).padStart(2, "0");
  const headers: [string, string][] = [["traceparent", `00-${spanContext.traceId}-${spanContext.spanId}-${flags}`]];
  const state = spanContext.traceState?.serialize();
  if (state) headers.push(["tracestate", state]);
  return headers;
}

export function addTraceContext(metadata: Metadata): void {
  for (const [key, value] of traceHeaders()) metadata.set(key, value);
}
