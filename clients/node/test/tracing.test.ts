// The active OpenTelemetry span's W3C trace context goes with each call and
// comes out in the Kafka record's headers.
import assert from "node:assert/strict";
import { AsyncLocalStorage } from "node:async_hooks";
import { randomBytes } from "node:crypto";
import { after, test } from "node:test";
import { ROOT_CONTEXT, context, trace, TraceFlags, createTraceState, type Context, type ContextManager } from "@opentelemetry/api";
import { OutboxClient, traceHeaders } from "../src";
import { KafkaReader, eventIdOf, header, services, unique } from "./harness";

class AsyncContextManager implements ContextManager {
  private readonly storage = new AsyncLocalStorage<Context>();
  active(): Context {
    return this.storage.getStore() ?? ROOT_CONTEXT;
  }
  with<A extends unknown[], F extends (...args: A) => ReturnType<F>>(ctx: Context, fn: F, thisArg?: ThisParameterType<F>, ...rest: A): ReturnType<F> {
    return this.storage.run(ctx, () => fn.call(thisArg, ...rest));
  }
  bind<T>(_ctx: Context, target: T): T {
    return target;
  }
  enable(): this {
    return this;
  }
  disable(): this {
    return this;
  }
}
context.setGlobalContextManager(new AsyncContextManager());

const { target, brokers } = services();
const kafka = new KafkaReader(brokers);
const producer = unique("traced");
const client = new OutboxClient(target, { producer });
const untraced = new OutboxClient(target, { producer, traceContext: false });
after(() => {
  client.close();
  untraced.close();
});

test("the active span's traceparent and tracestate reach the Kafka record", async () => {
  const topic = await kafka.createTopic();
  const traceId = randomBytes(16).toString("hex");
  const spanId = randomBytes(8).toString("hex");
  const span = trace.wrapSpanContext({
    traceId,
    spanId,
    traceFlags: TraceFlags.SAMPLED,
    traceState: createTraceState("vendor=abc"),
  });
  const [traced, off] = await context.with(trace.setSpan(context.active(), span), async () => {
    assert.deepEqual(traceHeaders(), [
      ["traceparent", `00-${traceId}-${spanId}-01`],
      ["tracestate", "vendor=abc"],
    ]);
    const a = await client.append([{ topic, aggregateId: "t-1", payload: { n: 1 } }]);
    const b = await untraced.append([{ topic, aggregateId: "t-2", payload: { n: 2 } }]);
    return [a.eventIds[0], b.eventIds[0]];
  });
  const plain = await client.append([{ topic, aggregateId: "t-3", payload: { n: 3 } }]); // no active span
  assert.deepEqual(traceHeaders(), []);

  const records = new Map((await kafka.read(topic, [traced, off, plain.eventIds[0]])).map((r) => [eventIdOf(r), r]));
  assert.equal(header(records.get(traced)!, "traceparent"), `00-${traceId}-${spanId}-01`);
  assert.equal(header(records.get(traced)!, "tracestate"), "vendor=abc");
  assert.equal(header(records.get(off)!, "traceparent"), undefined);
  assert.equal(header(records.get(plain.eventIds[0])!, "traceparent"), undefined);
});
