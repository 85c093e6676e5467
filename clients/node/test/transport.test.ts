// The client over a connection that drops: outboxd is killed and started
// again on the same port and store. A watch resumes where it was, an
// appendStream sends its unanswered batches again, a unary call is retried.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { DEFAULT_RETRY, OutboxClient, Transaction, isFinal, type Batch, type Event, type StatusUpdate } from "../src";
import { KafkaReader, Serve, createDatabase, services, sleep, unique, within } from "./harness";

const { brokers } = services();
const kafka = new KafkaReader(brokers);

describe("a dropped connection", { timeout: 240_000 }, () => {
  let store: string;
  let serve: Serve;
  let client: OutboxClient;
  let producer: string;
  before(async () => {
    store = await createDatabase(unique("transport"));
    serve = await Serve.start(store, brokers);
    producer = unique("svc");
    // More attempts than the default: the channel's own reconnect backoff
    // (up to 5 s) may still be running when the restarted gateway is ready.
    client = new OutboxClient(serve.target, { producer, retry: { ...DEFAULT_RETRY, maxAttempts: 12 } });
  });
  after(async () => {
    client.close();
    await serve.stop();
  });

  /** SIGKILL, then the same gateway again on the same port and store. */
  async function restart(): Promise<void> {
    await serve.kill();
    const port = serve.port;
    await serve.stop();
    serve = await Serve.start(store, brokers, { port });
  }

  function event(topic: string, id: string): Event {
    return { topic, aggregateId: id, eventType: "Noted", payload: { id } };
  }

  test("watches resume after outboxd restarts: a producer watch from its cursor, an id watch to the final state", async () => {
    const topic = await kafka.createTopic();
    const earlier = await client.append([event(topic, "a1"), event(topic, "a2")]);
    const pending = await client.append([event(topic, "p1")], { transaction: Transaction.twoPhase(producer, "tx-pending", 120_000) });

    let later = { eventIds: ["(not yet appended)"] };
    const feed: StatusUpdate[] = [];
    const producerWatch = client.watch({ producer });
    const idWatch = client.watch(pending.eventIds);
    const finalOf = new Map<string, string>();
    const following = (async () => {
      for await (const update of producerWatch) {
        feed.push(update);
        if (isFinal(update.status.state)) finalOf.set(update.status.eventId, update.status.state);
        if (later.eventIds.every((id) => finalOf.has(id)) && pending.eventIds.every((id) => finalOf.has(id))) return;
      }
    })();
    const idUpdates: StatusUpdate[] = [];
    const followingIds = (async () => {
      for await (const update of idWatch) idUpdates.push(update);
    })();

    // Wait (bounded) until the watch saw the first events published.
    const deadline = Date.now() + 60_000;
    while (!earlier.eventIds.every((id) => finalOf.has(id))) {
      assert.ok(Date.now() < deadline, "the first events were not seen published");
      await sleep(50);
    }
    const cursorBefore = feed.reduce((max, u) => (u.status.cursor > max ? u.status.cursor : max), 0n);

    await restart();
    // The client's channel reconnects by itself; append retries on UNAVAILABLE.
    later = await client.append([event(topic, "b1"), event(topic, "b2")]);
    assert.equal(await client.commit("tx-pending"), 1);

    await within(Promise.all([following, followingIds]), 90_000, () => `watches did not finish: ${JSON.stringify([...finalOf])}`);
    for (const id of [...earlier.eventIds, ...later.eventIds, ...pending.eventIds]) assert.equal(finalOf.get(id), "PUBLISHED", id);
    // The producer watch resumed after its cursor: what it saw after the
    // restart is newer than what it saw before, except a few repeats.
    const resumed = feed.filter((u) => later.eventIds.includes(u.status.eventId));
    assert.ok(resumed.every((u) => u.status.cursor > cursorBefore));
    // The id watch reported the final state once, and nothing after it.
    assert.deepEqual(
      idUpdates.filter((u) => isFinal(u.status.state)).map((u) => u.status.state),
      ["PUBLISHED"],
    );
    assert.equal(idUpdates[idUpdates.length - 1].status.state, "PUBLISHED");
  });

  test("a broken appendStream sends the unanswered batches again, storing nothing twice", async () => {
    const topic = await kafka.createTopic();
    const total = 60;
    let restarts = 0;
    // The gateway dies twice with batches of this stream in flight: once while
    // the stream waits for the next batch of its source, once while the
    // caller is busy with an outcome and the pipeline is full.
    async function* batches(): AsyncGenerator<Batch> {
      for (let b = 0; b < total; b++) {
        if (b === 20) {
          await restart();
          restarts += 1;
        }
        yield { events: [event(topic, `s${b}`)], transaction: Transaction.immediate(producer, `broken-stream-${b}`) };
      }
    }
    const outcomes = [];
    for await (const outcome of client.appendStream(batches(), { maxInFlight: 8 })) {
      outcomes.push(outcome);
      if (outcomes.length === 40) {
        await sleep(200); // the stream fills its pipeline meanwhile
        await restart();
        restarts += 1;
      }
    }
    assert.equal(restarts, 2);
    assert.deepEqual(
      outcomes.map((o) => o.batch.transaction.transactionId),
      Array.from({ length: total }, (_, b) => `broken-stream-${b}`),
    );
    assert.ok(outcomes.every((o) => o.error === undefined && o.eventIds.length === 1));
    const ids = outcomes.flatMap((o) => o.eventIds);
    assert.equal(new Set(ids).size, total);
    const finals = await client.waitFinal(ids, { timeoutMs: 60_000 });
    assert.ok([...finals.values()].every((s) => s.state === "PUBLISHED"));
    // One event per batch was stored: nothing twice.
    const stored = await client.status({ transactions: outcomes.map((o) => o.batch.transaction) });
    assert.equal(stored.length, total);
    const records = await kafka.read(topic, ids);
    assert.ok(records.length >= total);
  });
});
