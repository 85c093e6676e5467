// The client against the real gateway (PostgreSQL store) and the real broker,
// checked with an independent consumer.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  AlreadyExists,
  Cancelled,
  DeadlineExceeded,
  InvalidEvent,
  OutboxClient,
  Transaction,
  isFinal,
  type Batch,
  type Event,
  type StatusUpdate,
} from "../src";
import { KafkaReader, eventIdOf, firstSightings, header, services, unique } from "./harness";

const { target, brokers } = services();
const kafka = new KafkaReader(brokers);

function orderEvent(topic: string, order: string, step: string, extra: Record<string, unknown> = {}): Event {
  return { topic, aggregateType: "order", aggregateId: order, eventType: step, payload: { order, step, ...extra } };
}

describe("OutboxClient", () => {
  let client: OutboxClient;
  let producer: string;
  before(() => {
    producer = unique("svc");
    client = new OutboxClient(target, { producer });
  });
  after(() => client.close());

  test("append then watch to PUBLISHED, where the consumer finds it", async () => {
    const topic = await kafka.createTopic();
    const occurredAt = new Date(Date.UTC(2026, 2, 1, 12, 30));
    const events: Event[] = [
      {
        topic,
        key: "customer-7",
        payload: { order: "o-1", total: 42, note: "café" },
        headers: [
          ["content-type", "application/json"],
          ["x-tenant", Buffer.from("\x00acme", "latin1")],
        ],
        aggregateType: "order",
        aggregateId: "o-1",
        eventType: "OrderPlacedV1",
        occurredAt,
      },
      { topic, payload: Buffer.from([1, 2, 0x72]), aggregateType: "order", aggregateId: "o-2", eventType: "OrderPlacedV1" },
    ];
    const result = await client.append(events, { transaction: "tx-published" });
    assert.equal(result.eventIds.length, 2);
    assert.equal(result.duplicate, false);

    const updates: StatusUpdate[] = [];
    for await (const update of client.watch(result.eventIds)) updates.push(update);
    const final = new Map(updates.filter((u) => isFinal(u.status.state)).map((u) => [u.status.eventId, u.status]));
    assert.deepEqual(new Set(final.keys()), new Set(result.eventIds));
    for (const status of final.values()) {
      assert.equal(status.state, "PUBLISHED");
      assert.equal(typeof status.partition, "number");
      assert.equal(typeof status.offset, "number");
      assert.deepEqual([status.producer, status.transactionId, status.topic], [producer, "tx-published", topic]);
    }

    const records = new Map((await kafka.read(topic, result.eventIds)).map((r) => [eventIdOf(r), r]));
    const [first, second] = result.eventIds.map((id) => records.get(id)!);
    for (const [id, record] of [[result.eventIds[0], first], [result.eventIds[1], second]] as const) {
      assert.deepEqual([record.partition, record.offset], [final.get(id)!.partition, final.get(id)!.offset]);
    }
    assert.equal(first.key?.toString(), "customer-7");
    assert.deepEqual(JSON.parse(first.value.toString("utf8")), { order: "o-1", total: 42, note: "café" });
    assert.deepEqual(first.headers.slice(0, 2), [
      ["content-type", Buffer.from("application/json")],
      ["x-tenant", Buffer.from("\x00acme", "latin1")],
    ]);
    assert.equal(header(first, "outbox-event-type"), "OrderPlacedV1");
    assert.equal(header(first, "outbox-producer"), producer);
    assert.equal(first.timestamp, occurredAt.getTime());
    assert.deepEqual(second.value, Buffer.from([1, 2, 0x72]));
    assert.equal(second.key?.toString(), "o-2"); // no key: the aggregate id

    const statuses = await client.status(result.eventIds);
    assert.deepEqual(statuses.map((s) => s.state), ["PUBLISHED", "PUBLISHED"]);
    const byTransaction = await client.status({ transactions: [{ producer, transactionId: "tx-published" }] });
    assert.deepEqual(new Set(byTransaction.map((s) => s.eventId)), new Set(result.eventIds));
  });

  test("a retried append stores nothing twice; another body under the same key is refused", async () => {
    const topic = await kafka.createTopic();
    const events = [orderEvent(topic, "o-9", "OrderPlacedV1")];
    const first = await client.append(events, { transaction: "tx-retry" });
    const again = await client.append(events, { transaction: "tx-retry" });
    assert.equal(first.duplicate, false);
    assert.equal(again.duplicate, true);
    assert.deepEqual(again.eventIds, first.eventIds);

    await assert.rejects(client.append([orderEvent(topic, "o-9", "OrderCancelledV1")], { transaction: "tx-retry" }), AlreadyExists);

    // A later sequence of the same transaction is a new append.
    const next = await client.append([orderEvent(topic, "o-9", "OrderPaidV1")], { transaction: "tx-retry", sequence: 1 });
    assert.equal(next.duplicate, false);
    const finals = await client.waitFinal([...first.eventIds, ...next.eventIds], { timeoutMs: 60_000 });
    assert.ok([...finals.values()].every((s) => s.state === "PUBLISHED"));

    // The consumer sees each event once (at-least-once: first sightings), in order.
    const records = firstSightings(await kafka.read(topic, [...first.eventIds, ...next.eventIds]));
    assert.deepEqual(records.map(eventIdOf), [...first.eventIds, ...next.eventIds]);
  });

  test("a bad event is refused with the fields at fault, and nothing is stored", async () => {
    const topic = await kafka.createTopic();
    const error = await client
      .append([orderEvent(topic, "o-1", "ok"), { topic: "bad topic!", payload: {}, aggregateId: "a\u0000b" }], { transaction: "tx-bad" })
      .then(
        () => assert.fail("the append succeeded"),
        (e: unknown) => e,
      );
    assert.ok(error instanceof InvalidEvent, String(error));
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.ok(error.fields.includes("events[1].topic"), error.fields.join(", "));
    assert.ok(error.fields.includes("events[1].aggregate_id"), error.fields.join(", "));
    assert.ok(error.violations.every((v) => v.description.length > 0));
    assert.ok(!error.fields.some((f) => f.startsWith("events[0]")));
    assert.deepEqual(await client.status({ transactions: [{ producer, transactionId: "tx-bad" }] }), []);
  });

  test("a failed batch of a stream fails only itself", async () => {
    const topic = await kafka.createTopic();
    const batches: Batch[] = [
      { events: [orderEvent(topic, "s-1", "a")], transaction: Transaction.immediate(producer, "stream-ok-1") },
      { events: [{ topic: "", payload: {} }], transaction: Transaction.immediate(producer, "stream-bad") },
      { events: [orderEvent(topic, "s-1", "b")], transaction: Transaction.immediate(producer, "stream-ok-2") },
    ];
    const outcomes = [];
    for await (const outcome of client.appendStream(batches, { maxInFlight: 2 })) outcomes.push(outcome);
    assert.deepEqual(
      outcomes.map((o) => o.batch.transaction.transactionId),
      ["stream-ok-1", "stream-bad", "stream-ok-2"],
    );
    assert.equal(outcomes[0].error, undefined);
    assert.ok(outcomes[1].error instanceof InvalidEvent);
    assert.deepEqual((outcomes[1].error as InvalidEvent).fields, ["events[0].topic"]);
    assert.equal(outcomes[2].error, undefined);
    assert.equal(outcomes[2].eventIds.length, 1);
  });

  test("waitFinal gives up after its timeout, and an aborted watch ends at once", async () => {
    const topic = await kafka.createTopic();
    const { eventIds } = await client.append([orderEvent(topic, "w-1", "held")], {
      transaction: Transaction.twoPhase(producer, "tx-held", 60_000),
    });
    await assert.rejects(client.waitFinal(eventIds, { timeoutMs: 300 }), DeadlineExceeded);

    const abort = new AbortController();
    const seen: StatusUpdate[] = [];
    const watching = (async () => {
      for await (const update of client.watch({ producer }, { signal: abort.signal })) {
        seen.push(update);
        if (update.status.eventId === eventIds[0]) abort.abort();
      }
    })();
    await assert.rejects(watching, Cancelled);
    assert.ok(seen.some((u) => u.status.eventId === eventIds[0] && u.status.state === "PENDING"));
    assert.equal(await client.abort("tx-held"), 1);
  });
});
