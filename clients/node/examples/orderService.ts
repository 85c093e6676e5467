// An order service that publishes its events through outboxd, atomically with
// its own PostgreSQL transactions, and a consumer that reads them back.
//
//   tsx examples/orderService.ts --outboxd 127.0.0.1:50051 \
//       --database-url postgresql://postgres@127.0.0.1:5432/shop \
//       --brokers 127.0.0.1:9092 --topic orders [--producer orders]
//
// It places four orders: two with postgresXid (one commits, one rolls back)
// and two with twoPhase (one commits, one fails), each under an OpenTelemetry
// span; then a kafkajs consumer receives exactly the two committed orders'
// events, with the trace context of the request that placed each one.
// outboxd must resolve postgres_xid tokens against the cluster of
// --database-url (its store's cluster, or tokens.postgres_xid_clusters).
import { AsyncLocalStorage } from "node:async_hooks";
import { randomBytes, randomUUID } from "node:crypto";
import { parseArgs } from "node:util";
import { ROOT_CONTEXT, context, trace, TraceFlags, type Context, type ContextManager } from "@opentelemetry/api";
import { Kafka, logLevel } from "kafkajs";
import { Pool } from "pg";
import { OutboxClient, postgresXid, twoPhase, type Event } from "../src";

const { values: args } = parseArgs({
  options: {
    outboxd: { type: "string", default: "127.0.0.1:50051" },
    "database-url": { type: "string" },
    brokers: { type: "string", default: "127.0.0.1:9092" },
    topic: { type: "string", default: "orders" },
    producer: { type: "string", default: "orders" },
  },
});
if (!args["database-url"]) throw new Error("--database-url is required");

/**
 * The active span follows async calls (an OpenTelemetry SDK brings its own
 * context manager; this example keeps to @opentelemetry/api).
 */
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

/** Runs `work` under a new span, as a request handler of an instrumented service would. */
function inRequest<T>(work: (traceId: string) => Promise<T>): Promise<T> {
  const span = trace.wrapSpanContext({
    traceId: randomBytes(16).toString("hex"),
    spanId: randomBytes(8).toString("hex"),
    traceFlags: TraceFlags.SAMPLED,
  });
  return context.with(trace.setSpan(context.active(), span), () => work(span.spanContext().traceId));
}

class OutOfStock extends Error {}

const outbox = new OutboxClient(args.outboxd!, { producer: args.producer });
const db = new Pool({ connectionString: args["database-url"], max: 2 });

function orderPlaced(order: string, total: number): Event {
  return { topic: args.topic!, aggregateType: "order", aggregateId: order, eventType: "OrderPlacedV1", payload: { order, total } };
}

/** postgres_xid: the event is published if and only if this transaction commits. */
async function placeWithPostgresXid(order: string, total: number, fail: boolean): Promise<string[]> {
  const client = await db.connect();
  try {
    await client.query("BEGIN");
    try {
      await client.query("INSERT INTO example_orders (id, total) VALUES ($1, $2)", [order, total]);
      const { eventIds } = await postgresXid(outbox, client, [orderPlaced(order, total)]);
      if (fail) throw new OutOfStock(order);
      await client.query("COMMIT");
      return eventIds;
    } catch (error) {
      await client.query("ROLLBACK");
      throw error;
    }
  } finally {
    client.release();
  }
}

/** two_phase: append, commit the business transaction, then Commit (or Abort when it fails). */
async function placeWithTwoPhase(order: string, total: number, fail: boolean): Promise<string[]> {
  const client = await db.connect();
  try {
    const outcome = await twoPhase(outbox, [orderPlaced(order, total)], async (tx) => {
      await client.query("BEGIN");
      try {
        await client.query("INSERT INTO example_orders (id, total, outbox_transaction_id) VALUES ($1, $2, $3)", [order, total, tx.transactionId]);
        if (fail) throw new OutOfStock(order);
        await client.query("COMMIT");
      } catch (error) {
        await client.query("ROLLBACK");
        throw error;
      }
    });
    return outcome.eventIds;
  } finally {
    client.release();
  }
}

async function main(): Promise<void> {
  await db.query("CREATE TABLE IF NOT EXISTS example_orders (id text PRIMARY KEY, total integer NOT NULL, outbox_transaction_id text)");
  const published = new Map<string, string>(); // event id → trace id of the request
  const discarded: string[] = [];
  const plan: [string, (order: string, total: number, fail: boolean) => Promise<string[]>, boolean][] = [
    ["postgres_xid", placeWithPostgresXid, false],
    ["postgres_xid", placeWithPostgresXid, true],
    ["two_phase", placeWithTwoPhase, false],
    ["two_phase", placeWithTwoPhase, true],
  ];
  for (const [mode, place, fail] of plan) {
    const order = `order-${randomUUID().slice(0, 8)}`;
    await inRequest(async (traceId) => {
      try {
        for (const id of await place(order, 42, fail)) published.set(id, traceId);
        console.log(`${mode}: ${order} placed`);
      } catch (error) {
        if (!(error instanceof OutOfStock)) throw error;
        console.log(`${mode}: ${order} failed and rolled back`);
        const { rows } = await db.query("SELECT 1 FROM example_orders WHERE id = $1", [order]);
        if (rows.length !== 0) throw new Error(`${order} was rolled back but its row exists`);
        discarded.push(order);
      }
    });
  }

  // Watch the committed events to Kafka.
  const finals = await outbox.waitFinal([...published.keys()], { timeoutMs: 60_000 });
  for (const [id, status] of finals) {
    console.log(`outboxd: ${id} ${status.state} at partition ${status.partition} offset ${status.offset}`);
    if (status.state !== "PUBLISHED") throw new Error(`${id} is ${status.state}`);
  }

  // An independent consumer: everything on the topic from the start.
  const kafka = new Kafka({ brokers: [args.brokers!], clientId: "order-consumer", logLevel: logLevel.NOTHING });
  const consumer = kafka.consumer({ groupId: `order-consumer-${randomUUID()}`, maxWaitTimeInMs: 100 });
  await consumer.connect();
  await consumer.subscribe({ topic: args.topic!, fromBeginning: true });
  const received = new Map<string, { order: string; traceparent: string }>();
  let last = Date.now();
  await consumer.run({
    eachMessage: async ({ message }) => {
      last = Date.now();
      const id = message.headers?.["outbox-event-id"]?.toString();
      const traceparent = message.headers?.["traceparent"]?.toString() ?? "";
      if (id) received.set(id, { order: JSON.parse(message.value!.toString()).order, traceparent });
    },
  });
  const deadline = Date.now() + 60_000;
  while (![...published.keys()].every((id) => received.has(id)) || Date.now() - last < 1000) {
    if (Date.now() > deadline) throw new Error("the committed events did not all arrive");
    await new Promise((r) => setTimeout(r, 100));
  }
  await consumer.disconnect();
  for (const [id, { order, traceparent }] of received) {
    console.log(`consumer: ${order} (event ${id}, traceparent ${traceparent})`);
    const traceId = published.get(id);
    if (traceId === undefined) throw new Error(`${order}: an event that was never committed reached Kafka`);
    if (traceparent.split("-")[1] !== traceId) throw new Error(`${order}: the record does not continue its request's trace`);
  }
  if (received.size !== published.size) throw new Error(`${received.size} events arrived, ${published.size} were committed`);
  console.log(`example ok: exactly the committed events arrived (${published.size} of ${plan.length} orders; ${discarded.length} rolled back)`);
}

main()
  .catch((error) => {
    console.error(error);
    process.exitCode = 1;
  })
  .finally(async () => {
    outbox.close();
    await db.end();
  });
