// The example service runs end to end against the real gateway, PostgreSQL
// and the broker.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { test } from "node:test";
import { CLIENT_DIR, KafkaReader, createDatabase, services, unique } from "./harness";

test("the order service example runs", { timeout: 180_000 }, async () => {
  const { target, brokers } = services();
  const topic = await new KafkaReader(brokers).createTopic();
  const database = await createDatabase();
  const result = spawnSync(
    join(CLIENT_DIR, "node_modules/.bin/tsx"),
    ["examples/orderService.ts", "--outboxd", target, "--database-url", database, "--brokers", brokers, "--topic", topic, "--producer", unique("orders")],
    { cwd: CLIENT_DIR, encoding: "utf8", timeout: 150_000 },
  );
  assert.equal(result.status, 0, result.stdout + result.stderr);
  assert.match(result.stdout, /example ok: exactly the committed events arrived/);
  assert.equal(result.stdout.match(/^consumer: order-/gm)?.length, 2, result.stdout);
});
