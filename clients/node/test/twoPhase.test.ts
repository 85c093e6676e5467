// twoPhase: publish after the caller's own commit, discard when the caller's
// work fails; recoverPrepared settles what a dead process left.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Client as PgClient } from "pg";
import { FailedPrecondition, OutboxClient, Transaction, recoverPrepared, twoPhase, type Event } from "../src";
import { KafkaReader, eventIdOf, services, unique } from "./harness";

const { target, brokers, shopUrl } = services();
const kafka = new KafkaReader(brokers);

class OutOfStock extends Error {}

function orderEvent(topic: string, order: string): Event {
  return { topic, aggregateType: "order", aggregateId: order, eventType: "OrderPlacedV1", payload: { order } };
}

describe("twoPhase", () => {
  let client: OutboxClient;
  let db: PgClient;
  before(async () => {
    client = new OutboxClient(target, { producer: unique("shop") });
    db = new PgClient({ connectionString: shopUrl });
    await db.connect();
  });
  after(async () => {
    client.close();
    await db.end();
  });

  test("commits the events after the caller's commit", async () => {
    const topic = await kafka.createTopic();
    const order = unique("order");
    const outcome = await twoPhase(
      client,
      [orderEvent(topic, order)],
      async (tx) => {
        // Appended, not publishable until Commit.
        const [status] = await client.status(tx.eventIds);
        assert.equal(status.state, "PENDING");
        await db.query("BEGIN");
        await db.query("INSERT INTO orders (id, total, outbox_transaction_id) VALUES ($1, 5, $2)", [order, tx.transactionId]);
        await db.query("COMMIT");
        return "placed";
      },
      { transactionId: order },
    );
    assert.equal(outcome.value, "placed");
    assert.equal(outcome.committedEvents, 1);
    const [eventId] = outcome.eventIds;
    const finals = await client.waitFinal([eventId], { timeoutMs: 60_000 });
    assert.equal(finals.get(eventId)?.state, "PUBLISHED");
    const [record] = await kafka.read(topic, [eventId]);
    assert.deepEqual(JSON.parse(record.value.toString()), { order });
    // Resolved: Abort now is refused.
    await assert.rejects(client.abort(order), FailedPrecondition);
  });

  test("aborts the events when the caller's work fails, and rethrows", async () => {
    const topic = await kafka.createTopic();
    const order = unique("order");
    let eventIds: string[] = [];
    await assert.rejects(
      twoPhase(client, [orderEvent(topic, order)], async (tx) => {
        eventIds = [...tx.eventIds];
        await db.query("BEGIN");
        await db.query("INSERT INTO orders (id, total) VALUES ($1, 5)", [order]);
        await db.query("ROLLBACK");
        throw new OutOfStock();
      }),
      OutOfStock,
    );
    assert.equal(eventIds.length, 1);
    const finals = await client.waitFinal(eventIds, { timeoutMs: 60_000 });
    assert.equal(finals.get(eventIds[0])?.state, "DISCARDED");
    // A later event of the same key is not held back, and the discarded one never reaches Kafka.
    const later = await client.append([orderEvent(topic, order)]);
    const records = await kafka.read(topic, later.eventIds);
    assert.deepEqual(records.map(eventIdOf), later.eventIds);
    const { rows } = await db.query("SELECT count(*)::int AS n FROM orders WHERE id = $1", [order]);
    assert.equal(rows[0].n, 0);
  });

  test("recoverPrepared commits what the business committed and aborts the rest", async () => {
    const topic = await kafka.createTopic();
    const producer = unique("recovering");
    const committedOrder = unique("order");
    const lostOrder = unique("order");
    // A process appended two transactions and died before Commit; one business
    // transaction had committed.
    for (const order of [committedOrder, lostOrder]) {
      await client.append([orderEvent(topic, order)], {
        transaction: Transaction.twoPhase(producer, order, 60_000),
      });
    }
    await db.query("INSERT INTO orders (id, total, outbox_transaction_id) VALUES ($1, 5, $1)", [committedOrder]);
    const recovery = await recoverPrepared(
      client,
      async (prepared) => (await db.query("SELECT 1 FROM orders WHERE outbox_transaction_id = $1", [prepared.transactionId])).rowCount === 1,
      { producer, olderThanMs: 0 },
    );
    assert.deepEqual(recovery.committed.map((t) => t.transactionId), [committedOrder]);
    assert.deepEqual(recovery.aborted.map((t) => t.transactionId), [lostOrder]);
    const statuses = await client.status({ transactions: [{ producer, transactionId: committedOrder }, { producer, transactionId: lostOrder }] });
    const byTransaction = new Map(statuses.map((s) => [s.transactionId, s.state]));
    assert.notEqual(byTransaction.get(committedOrder), "PENDING");
    assert.equal(byTransaction.get(lostOrder), "DISCARDED");
  });
});
