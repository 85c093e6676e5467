// appendStream: 10,000 events on one pipelined stream reach Kafka in order
// per key, as an independent consumer reads them.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { OutboxClient, Transaction, type Batch } from "../src";
import { KafkaReader, eventIdOf, firstSightings, services, unique } from "./harness";

const { target, brokers } = services();
const kafka = new KafkaReader(brokers);
const client = new OutboxClient(target, { producer: unique("stream") });
after(() => client.close());

test("appendStream of 10,000 events keeps per-key order into Kafka", { timeout: 240_000 }, async () => {
  const topic = await kafka.createTopic(undefined, 3);
  const producer = client.producer!;
  const keys = Array.from({ length: 50 }, (_, k) => `account-${k}`);
  const sent = new Map<string, number[]>(keys.map((k) => [k, []]));
  let pulled = 0;

  // An async source, pulled only as the pipeline has room.
  async function* batches(): AsyncGenerator<Batch> {
    let n = 0;
    for (let b = 0; b < 500; b++) {
      const events = [];
      for (let i = 0; i < 20; i++, n++) {
        const key = keys[n % keys.length];
        events.push({ topic, key, aggregateId: key, payload: { n } });
        sent.get(key)!.push(n);
      }
      pulled += 1;
      yield { events, transaction: Transaction.immediate(producer, `stream-${b}`) };
    }
  }

  const ids: string[] = [];
  let maxAhead = 0;
  let answered = 0;
  for await (const outcome of client.appendStream(batches(), { maxInFlight: 64 })) {
    assert.equal(outcome.error, undefined, String(outcome.error));
    assert.equal(outcome.batch.transaction.transactionId, `stream-${answered}`);
    answered += 1;
    maxAhead = Math.max(maxAhead, pulled - answered);
    ids.push(...outcome.eventIds);
  }
  assert.equal(ids.length, 10_000);
  assert.equal(new Set(ids).size, 10_000);
  // Bounded: never more than maxInFlight batches pulled and unanswered.
  assert.ok(maxAhead <= 64, `${maxAhead} batches ahead`);

  const records = firstSightings(await kafka.read(topic, ids, { timeoutMs: 180_000 }));
  const received = new Map<string, number[]>(keys.map((k) => [k, []]));
  const seen = new Set<string | undefined>();
  for (const record of records) {
    // (partition, offset) order; one key lives on one partition.
    seen.add(eventIdOf(record));
    received.get(record.key!.toString())!.push(JSON.parse(record.value.toString()).n);
  }
  assert.ok(ids.every((id) => seen.has(id)));
  assert.deepEqual(received, sent);
});
