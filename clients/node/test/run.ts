// Starts the services the test files share — a private PostgreSQL cluster, a
// Tansu broker and one `outboxd serve` on a PostgreSQL store — runs node's
// test runner on the test files with their addresses in the environment, then
// stops them. Exits with the runner's exit code.
//
//   tsx test/run.ts [test files…]    (default: every test/*.test.ts)
import { spawn } from "node:child_process";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { Client as PgClient } from "pg";
import { CLIENT_DIR, PgCluster, Serve, Tansu, type Services } from "./harness";

const BUSINESS_SCHEMA = `
CREATE TABLE orders (
    id text PRIMARY KEY,
    total integer NOT NULL,
    outbox_transaction_id text
)`;

async function main(): Promise<number> {
  const files = process.argv.slice(2);
  const testFiles =
    files.length > 0
      ? files
      : readdirSync(join(CLIENT_DIR, "test"))
          .filter((f) => f.endsWith(".test.ts"))
          .sort()
          .map((f) => join("test", f));
  const started = Date.now();
  const pg = await PgCluster.start();
  let tansu: Tansu | undefined;
  let gateway: Serve | undefined;
  try {
    tansu = await Tansu.start();
    gateway = await Serve.start(await pg.createDatabase("outboxd"), tansu.bootstrap);
    const shopUrl = await pg.createDatabase("shop");
    const shop = new PgClient({ connectionString: shopUrl });
    await shop.connect();
    await shop.query(BUSINESS_SCHEMA);
    await shop.end();
    const services: Services = { target: gateway.target, brokers: tansu.bootstrap, pgUrl: pg.url(), shopUrl };
    console.log(`services up in ${Date.now() - started} ms: outboxd ${gateway.target}, tansu ${tansu.bootstrap}, postgres :${pg.port}`);
    // No test may hang the run: each has at most 4 minutes (the slowest take
    // seconds), and the whole run at most 15.
    const runner = spawn(process.execPath, ["--import", "tsx", "--test", "--test-reporter=spec", "--test-timeout=240000", ...testFiles], {
      cwd: CLIENT_DIR,
      stdio: "inherit",
      detached: true, // its own process group, so that stopping it stops the test files too
      env: { ...process.env, OUTBOXD_NODE_TEST_SERVICES: JSON.stringify(services), KAFKAJS_NO_PARTITIONER_WARNING: "1" },
    });
    const stopGroup = (signal: NodeJS.Signals) => {
      try {
        process.kill(-runner.pid!, signal);
      } catch {
        // already gone
      }
    };
    const forward = (signal: NodeJS.Signals) => stopGroup(signal);
    process.on("SIGINT", forward);
    process.on("SIGTERM", forward);
    const limit = setTimeout(() => {
      console.error("the test run took more than 15 minutes: stopping it");
      stopGroup("SIGKILL");
    }, 15 * 60_000);
    const code = await new Promise<number>((resolve) => runner.on("exit", (code, signal) => resolve(code ?? (signal ? 1 : 0))));
    clearTimeout(limit);
    if (code !== 0) console.error(`outboxd's log (last lines):\n${gateway.logTail()}`);
    return code;
  } finally {
    await gateway?.stop();
    await tansu?.stop();
    pg.stop();
  }
}

main().then(
  (code) => process.exit(code),
  (error) => {
    console.error(error);
    process.exit(1);
  },
);
