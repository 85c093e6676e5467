// postgresXid with node-postgres: events of a business transaction that
// commits reach Kafka; those of one that rolls back never do.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Client as PgClient, Pool } from "pg";
import { NotInTransaction, OutboxClient, postgresXid, readXidToken, type Event } from "../src";
import { KafkaReader, eventIdOf, services, unique } from "./harness";

const { target, brokers, shopUrl } = services();
const kafka = new KafkaReader(brokers);

class Rollback extends Error {}

describe("postgresXid", () => {
  let client: OutboxClient;
  let pool: Pool;
  before(() => {
    client = new OutboxClient(target, { producer: unique("shop") });
    pool = new Pool({ connectionString: shopUrl, max: 2 });
  });
  after(async () => {
    client.close();
    await pool.end();
  });

  function orderEvent(topic: string, order: string, n: number): Event {
    return { topic, aggregateType: "order", aggregateId: order, eventType: "OrderPlacedV1", payload: { order, n } };
  }

  /** One business transaction: insert an order, append its event, then COMMIT, or fail and ROLLBACK. */
  async function place(order: string, event: Event, fail: boolean): Promise<string[]> {
    const db = await pool.connect();
    try {
      await db.query("BEGIN");
      try {
        await db.query("INSERT INTO orders (id, total) VALUES ($1, 42)", [order]);
        const result = await postgresXid(client, db, [event]);
        if (fail) throw new Rollback(result.eventIds.join(","));
        await db.query("COMMIT");
        return result.eventIds;
      } catch (error) {
        await db.query("ROLLBACK");
        throw error;
      }
    } finally {
      db.release();
    }
  }

  test("events publish with the commit and are discarded with the rollback", async () => {
    const topic = await kafka.createTopic();
    const committed: string[] = [];
    const rolledBack: string[] = [];
    for (let n = 0; n < 4; n++) {
      const order = unique("order");
      const fail = n % 2 === 1;
      try {
        committed.push(...(await place(order, orderEvent(topic, order, n), fail)));
        assert.ok(!fail);
      } catch (error) {
        assert.ok(error instanceof Rollback && fail, String(error));
        rolledBack.push(...error.message.split(","));
      }
    }
    assert.equal(committed.length, 2);
    assert.equal(rolledBack.length, 2);

    const finals = await client.waitFinal([...committed, ...rolledBack], { timeoutMs: 60_000 });
    for (const id of committed) assert.equal(finals.get(id)?.state, "PUBLISHED");
    for (const id of rolledBack) assert.equal(finals.get(id)?.state, "DISCARDED");

    const records = await kafka.read(topic, committed);
    assert.deepEqual(new Set(records.map(eventIdOf)), new Set(committed));

    // The business rows agree: only the committed orders exist.
    const statuses = await client.status(committed);
    assert.deepEqual(
      statuses.map((s) => s.transactionId.startsWith("pg-")),
      [true, true],
    );
  });

  test("the token is the transaction's xid and the cluster's system identifier", async () => {
    const db = new PgClient({ connectionString: shopUrl });
    await db.connect();
    try {
      await db.query("BEGIN");
      const token = await readXidToken(db);
      const { rows } = await db.query(
        "SELECT pg_current_xact_id()::text AS xid, system_identifier::text AS system_id FROM pg_control_system()",
      );
      assert.equal(token.xid, BigInt(rows[0].xid));
      assert.equal(token.systemId, BigInt(rows[0].system_id));
      assert.ok(token.systemId > BigInt(Number.MAX_SAFE_INTEGER), "a system identifier needs 64 bits");
      await db.query("ROLLBACK");
    } finally {
      await db.end();
    }
  });

  test("a connection outside a transaction is refused before anything is appended", async () => {
    const db = new PgClient({ connectionString: shopUrl });
    await db.connect();
    try {
      await assert.rejects(postgresXid(client, db, [orderEvent("never-used", "o", 0)]), NotInTransaction);
    } finally {
      await db.end();
    }
  });
});
