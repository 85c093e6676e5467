// The suite's real services: a private PostgreSQL cluster, a Tansu broker and
// `outboxd serve` processes, each with a watchdog process that removes it once
// the process that started it has exited, however it exits. And an
// independent Kafka consumer (kafkajs) to read what outboxd relayed.
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { randomUUID } from "node:crypto";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync, openSync, closeSync } from "node:fs";
import { createServer } from "node:net";
import { homedir, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { credentials, Metadata } from "@grpc/grpc-js";
import { Kafka, logLevel, type Admin } from "kafkajs";
import { Client as PgClient } from "pg";
import * as pb from "../src/gen/outboxd/v1/outbox";

export const CLIENT_DIR = resolve(__dirname, "..");
export const REPO = resolve(CLIENT_DIR, "../..");

export function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => (typeof address === "object" && address ? resolvePort(address.port) : reject(new Error("no port"))));
    });
  });
}

export function unique(prefix: string): string {
  return `${prefix}_${randomUUID().replace(/-/g, "").slice(0, 10)}`;
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Runs the shell command `cleanup` once this process has exited. */
export function watchdog(cleanup: string): void {
  const child = spawn("sh", ["-c", `while kill -0 ${process.pid} 2>/dev/null; do sleep 0.5; done; ${cleanup}`], {
    detached: true,
    stdio: "ignore",
  });
  child.unref();
}

/** The newest PostgreSQL server binaries (Debian's layout). */
export function pgBinDir(): string {
  const root = "/usr/lib/postgresql";
  const versions = existsSync(root)
    ? readdirSync(root)
        .filter((v) => /^\d+$/.test(v) && existsSync(join(root, v, "bin/initdb")))
        .map(Number)
        .sort((a, b) => b - a)
    : [];
  if (versions.length === 0) throw new Error("PostgreSQL server binaries (initdb, pg_ctl) are not installed");
  return join(root, String(versions[0]), "bin");
}

/** A throwaway cluster on a free port. PostgreSQL refuses to run as root: then its tools run as `postgres`. */
export class PgCluster {
  private constructor(
    readonly dir: string,
    readonly port: number,
    private readonly bin: string,
    private readonly runAs: string | undefined,
  ) {}

  static async start(): Promise<PgCluster> {
    const bin = pgBinDir();
    const dir = mkdtempSync(join(tmpdir(), "outboxd-nodeclient-pg-"));
    const runAs = process.getuid?.() === 0 ? "postgres" : undefined;
    if (runAs) spawnSync("chown", ["-R", "postgres:postgres", dir], { stdio: "ignore" });
    const cluster = new PgCluster(dir, await freePort(), bin, runAs);
    const data = join(dir, "data");
    watchdog(`${cluster.shell(`${bin}/pg_ctl -D ${data} stop -m immediate`)} >/dev/null 2>&1; rm -rf ${dir}`);
    cluster.run("initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8");
    const options =
      `-p ${cluster.port} -k ${dir} -c listen_addresses=127.0.0.1 -c fsync=off ` +
      "-c max_connections=200 -c shared_buffers=64MB";
    cluster.run("pg_ctl", "-D", data, "-l", join(dir, "server.log"), "-o", options, "-w", "-t", "60", "start");
    return cluster;
  }

  private shell(command: string): string {
    return this.runAs ? `runuser -u ${this.runAs} -- ${command}` : command;
  }

  private run(tool: string, ...args: string[]): void {
    let command = [join(this.bin, tool), ...args];
    if (this.runAs) command = ["runuser", "-u", this.runAs, "--", ...command];
    const result = spawnSync(command[0], command.slice(1), { cwd: this.dir, encoding: "utf8" });
    if (result.status !== 0) throw new Error(`${tool} failed: ${result.stdout}${result.stderr}${result.error ?? ""}`);
  }

  url(database = "postgres"): string {
    return `postgresql://postgres@127.0.0.1:${this.port}/${database}`;
  }

  /** A new, empty database: its URL. */
  async createDatabase(name: string = unique("nodeclient")): Promise<string> {
    const client = new PgClient({ connectionString: this.url() });
    await client.connect();
    try {
      await client.query(`CREATE DATABASE ${name}`);
    } finally {
      await client.end();
    }
    return this.url(name);
  }

  stop(): void {
    try {
      this.run("pg_ctl", "-D", join(this.dir, "data"), "-m", "immediate", "stop");
    } finally {
      rmSync(this.dir, { recursive: true, force: true });
    }
  }
}

function tail(path: string, chars = 3000): string {
  try {
    return readFileSync(path, "utf8").slice(-chars);
  } catch {
    return "(no log)";
  }
}

function waitExit(process: ChildProcess, timeoutMs: number): Promise<boolean> {
  if (process.exitCode !== null || process.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolveExit) => {
    const timer = setTimeout(() => resolveExit(false), timeoutMs);
    process.once("exit", () => {
      clearTimeout(timer);
      resolveExit(true);
    });
  });
}

/** A Tansu broker with in-memory storage on a free port (no automatic topic creation). */
export class Tansu {
  private constructor(
    readonly bootstrap: string,
    readonly process: ChildProcess,
    readonly log: string,
  ) {}

  static async start(): Promise<Tansu> {
    const binary = process.env.TANSU_BIN || join(homedir(), ".cargo/bin/tansu");
    if (!existsSync(binary)) throw new Error(`tansu not found at ${binary} (set TANSU_BIN)`);
    const port = await freePort();
    const url = `tcp://127.0.0.1:${port}`;
    const log = join(mkdtempSync(join(tmpdir(), "outboxd-nodeclient-tansu-")), "tansu.log");
    const fd = openSync(log, "w");
    const child = spawn(binary, ["broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"], {
      stdio: ["ignore", fd, fd],
    });
    closeSync(fd);
    watchdog(`kill -9 ${child.pid} 2>/dev/null; rm -rf ${resolve(log, "..")}`);
    const tansu = new Tansu(`127.0.0.1:${port}`, child, log);
    await tansu.waitReady(60_000);
    return tansu;
  }

  /** Ready when it answers a metadata request. */
  private async waitReady(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.process.exitCode !== null) throw new Error(`tansu exited: ${tail(this.log)}`);
      const admin = quietKafka(this.bootstrap).admin();
      try {
        await admin.connect();
        await admin.fetchTopicMetadata({ topics: [] });
        return;
      } catch (error) {
        if (Date.now() > deadline) throw new Error(`tansu did not answer within ${timeoutMs} ms: ${error}`);
        await sleep(100);
      } finally {
        await admin.disconnect().catch(() => {});
      }
    }
  }

  async stop(): Promise<void> {
    this.process.kill("SIGKILL");
    await waitExit(this.process, 10_000);
    rmSync(resolve(this.log, ".."), { recursive: true, force: true });
  }
}

export function outboxdBinary(): string {
  const binary = process.env.OUTBOXD_BIN || join(REPO, "target/debug/outboxd");
  if (!existsSync(binary)) throw new Error(`outboxd binary not found at ${binary} (cargo build, or set OUTBOXD_BIN)`);
  return binary;
}

/**
 * Waits until outboxd at `target` answers a call (probing, not sleeping a
 * fixed time); fails early when `process` ends. With `tls` credentials, any
 * answer but UNAVAILABLE counts (a gateway with identities refuses a probe
 * without credentials: UNAUTHENTICATED is an answer).
 */
export async function waitForGrpc(
  target: string,
  timeoutMs: number,
  child?: ChildProcess,
  log?: string,
  tls?: ReturnType<typeof credentials.createSsl>,
): Promise<void> {
  const stub = new pb.OutboxClient(target, tls ?? credentials.createInsecure());
  const deadline = Date.now() + timeoutMs;
  try {
    for (;;) {
      if (child && child.exitCode !== null) throw new Error(`outboxd exited with ${child.exitCode}: ${log ? tail(log) : ""}`);
      const outcome = await new Promise<{ code: number } | null>((done) =>
        stub.getStatus({ eventIds: [randomUUID()], transactions: [] }, new Metadata(), { deadline: Date.now() + 2000 }, (error) =>
          done(error ? { code: error.code } : null),
        ),
      );
      if (outcome === null) return;
      if (tls && outcome.code !== 14 && outcome.code !== 4) return;
      if (Date.now() > deadline) throw new Error(`outboxd at ${target} not ready within ${timeoutMs} ms`);
      await sleep(100);
    }
  } finally {
    stub.close();
  }
}

/** A real `outboxd serve` process. */
export class Serve {
  private constructor(
    readonly target: string,
    readonly config: string,
    readonly log: string,
    readonly process: ChildProcess,
  ) {}

  /**
   * Starts it on `port` (a free one by default). `extraConfig` is TOML
   * appended to the configuration (whole tables: `[tls]`…); `probe` the TLS
   * credentials of the readiness probe.
   */
  static async start(
    storeUrl: string,
    brokers: string,
    options: { port?: number; extraConfig?: string; probe?: ReturnType<typeof credentials.createSsl> } = {},
  ): Promise<Serve> {
    const port = options.port ?? (await freePort());
    const dir = mkdtempSync(join(tmpdir(), "outboxd-nodeclient-serve-"));
    const config = join(dir, "outboxd.toml");
    writeFileSync(
      config,
      `
listen = "127.0.0.1:${port}"
shutdown_timeout = "10s"

[store]
url = "${storeUrl}"
max_connections = 8

[kafka]
brokers = "${brokers}"

[relay]
shard_count = 8
poll_interval = "200ms"
lease_ttl = "5s"

[watch]
resync_interval = "500ms"
${options.extraConfig ?? ""}`,
    );
    const log = join(dir, "outboxd.log");
    const fd = openSync(log, "a");
    const child = spawn(outboxdBinary(), ["serve", "--config", config], {
      stdio: ["ignore", fd, fd],
      env: { ...process.env, RUST_LOG: "warn" },
    });
    closeSync(fd);
    watchdog(`kill -9 ${child.pid} 2>/dev/null; rm -rf ${dir}`);
    const serve = new Serve(`127.0.0.1:${port}`, config, log, child);
    await waitForGrpc(serve.target, 60_000, child, log, options.probe);
    return serve;
  }

  get port(): number {
    return Number(this.target.split(":").pop());
  }

  /** SIGKILL, as a crash would (the configuration and log stay, for a restart). */
  async kill(): Promise<void> {
    this.process.kill("SIGKILL");
    await waitExit(this.process, 10_000);
  }

  async stop(): Promise<void> {
    if (this.process.exitCode === null && this.process.signalCode === null) {
      this.process.kill("SIGTERM");
      if (!(await waitExit(this.process, 30_000))) {
        this.process.kill("SIGKILL");
        await waitExit(this.process, 10_000);
      }
    }
    rmSync(resolve(this.config, ".."), { recursive: true, force: true });
  }

  logTail(): string {
    return tail(this.log);
  }
}

function quietKafka(brokers: string): Kafka {
  return new Kafka({ brokers: [brokers], clientId: "outboxd-node-tests", logLevel: logLevel.NOTHING, retry: { retries: 3 } });
}

/** A record as the independent consumer read it. */
export interface KafkaRecord {
  topic: string;
  partition: number;
  offset: number;
  key: Buffer | null;
  value: Buffer;
  headers: [string, Buffer][];
  timestamp: number;
}

export function header(record: KafkaRecord, name: string): string | undefined {
  const found = record.headers.find(([key]) => key === name);
  return found?.[1].toString("utf8");
}

export function eventIdOf(record: KafkaRecord): string | undefined {
  return header(record, "outbox-event-id");
}

/** Records without redeliveries (at-least-once): the first of each event id. */
export function firstSightings(records: KafkaRecord[]): KafkaRecord[] {
  const seen = new Set<string | undefined>();
  return records.filter((record) => {
    const id = eventIdOf(record);
    if (seen.has(id)) return false;
    seen.add(id);
    return true;
  });
}

/** Reads topics with a kafkajs consumer of its own, from the start, until every expected event id was seen. */
export class KafkaReader {
  constructor(readonly brokers: string) {}

  /** Creates a topic (a unique name by default) and waits until its metadata shows every partition. */
  async createTopic(name: string = unique("test").replace("_", "-"), partitions = 3): Promise<string> {
    const admin = quietKafka(this.brokers).admin();
    await admin.connect();
    try {
      await admin.createTopics({ topics: [{ topic: name, numPartitions: partitions, replicationFactor: 1 }], waitForLeaders: true });
      const deadline = Date.now() + 30_000;
      for (;;) {
        const found = await topicPartitions(admin, name);
        if (found === partitions) return name;
        if (Date.now() > deadline) throw new Error(`topic ${name} not ready within 30 s`);
        await sleep(100);
      }
    } finally {
      await admin.disconnect();
    }
  }

  /**
   * Every record of `topic` read until each of `eventIds` was seen and the
   * topic then stayed idle for `idleMs`, in (partition, offset) order. Fails
   * after `timeoutMs`, naming how many ids are missing.
   */
  async read(topic: string, eventIds: Iterable<string>, options: { timeoutMs?: number; idleMs?: number } = {}): Promise<KafkaRecord[]> {
    const timeoutMs = options.timeoutMs ?? 60_000;
    const idleMs = options.idleMs ?? 500;
    const expected = new Set(eventIds);
    const missing = new Set(expected);
    const records: KafkaRecord[] = [];
    const consumer = quietKafka(this.brokers).consumer({ groupId: unique("outboxd-node-tests"), maxWaitTimeInMs: 100 });
    let lastRecord = Date.now();
    await consumer.connect();
    try {
      await consumer.subscribe({ topic, fromBeginning: true });
      await consumer.run({
        autoCommit: false,
        eachMessage: async ({ topic: from, partition, message }) => {
          lastRecord = Date.now();
          const record: KafkaRecord = {
            topic: from,
            partition,
            offset: Number(message.offset),
            key: message.key,
            value: message.value ?? Buffer.alloc(0),
            headers: Object.entries(message.headers ?? {}).flatMap(([key, value]) =>
              (Array.isArray(value) ? value : [value]).map((v): [string, Buffer] => [key, Buffer.isBuffer(v) ? v : Buffer.from(String(v ?? ""))]),
            ),
            timestamp: Number(message.timestamp),
          };
          records.push(record);
          const id = eventIdOf(record);
          if (id !== undefined) missing.delete(id);
        },
      });
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        if (missing.size === 0 && Date.now() - lastRecord >= idleMs) break;
        if (Date.now() > deadline) {
          throw new Error(`${missing.size} of ${expected.size} expected events not in ${topic} after ${timeoutMs} ms (${records.length} records read)`);
        }
        await sleep(50);
      }
    } finally {
      await consumer.disconnect();
    }
    return records.sort((a, b) => a.partition - b.partition || a.offset - b.offset);
  }
}

async function topicPartitions(admin: Admin, name: string): Promise<number> {
  try {
    const metadata = await admin.fetchTopicMetadata({ topics: [name] });
    return metadata.topics[0]?.partitions.length ?? 0;
  } catch {
    return 0;
  }
}

/** The services the test files share, as the runner (test/run.ts) passes them on. */
export interface Services {
  /** The shared `outboxd serve` (PostgreSQL store on the cluster below). */
  target: string;
  brokers: string;
  /** The cluster's `postgres` database URL, for creating more databases. */
  pgUrl: string;
  /** A service's own database with an `orders` table, on the same cluster as outboxd's store. */
  shopUrl: string;
}

export function services(): Services {
  const raw = process.env.OUTBOXD_NODE_TEST_SERVICES;
  if (!raw) throw new Error("run the tests through clients/node/scripts/test (test/run.ts starts the services)");
  return JSON.parse(raw) as Services;
}

/** A database on the shared cluster. */
export async function createDatabase(name: string = unique("nodeclient")): Promise<string> {
  const base = services().pgUrl;
  const client = new PgClient({ connectionString: base });
  await client.connect();
  try {
    await client.query(`CREATE DATABASE ${name}`);
  } finally {
    await client.end();
  }
  return base.replace(/\/[^/]*$/, `/${name}`);
}

/** `promise`, or a failure naming `what` after `ms` (the timer does not outlive it). */
export async function within<T>(promise: Promise<T>, ms: number, what: () => string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`not within ${ms} ms: ${what()}`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
