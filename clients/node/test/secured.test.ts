// The client against outboxd with TLS, client certificates (optional) and two
// identities: one named by its client certificate, one by a bearer token.
// Certificates are made with the openssl command for this run.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { credentials } from "@grpc/grpc-js";
import { NO_RETRY, OutboxClient, PermissionDenied, TlsError, Unauthenticated, type Event } from "../src";
import { KafkaReader, Serve, createDatabase, services, unique } from "./harness";

const { brokers } = services();
const kafka = new KafkaReader(brokers);

function openssl(dir: string, ...args: string[]): void {
  const result = spawnSync("openssl", args, { cwd: dir, encoding: "utf8" });
  if (result.status !== 0) throw new Error(`openssl ${args.join(" ")} failed: ${result.stderr}${result.error ?? ""}`);
}

/** A CA (EC P-256) that signs leaf certificates, valid for a day. */
class Authority {
  constructor(
    readonly dir: string,
    readonly name: string,
  ) {
    openssl(dir, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
      "-keyout", `${name}.key`, "-out", `${name}.pem`, "-days", "1", "-subj", `/CN=${name}`,
      "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign");
  }

  get pem(): Buffer {
    return readFileSync(join(this.dir, `${this.name}.pem`));
  }

  get path(): string {
    return join(this.dir, `${this.name}.pem`);
  }

  /** A leaf certificate and key (PKCS#8) for `commonName`. */
  issue(file: string, commonName: string, extensions: string): { cert: Buffer; key: Buffer; certPath: string; keyPath: string } {
    openssl(this.dir, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
      "-keyout", `${file}.key`, "-out", `${file}.csr`, "-subj", `/CN=${commonName}`);
    writeFileSync(join(this.dir, `${file}.ext`), `basicConstraints=critical,CA:FALSE\n${extensions}\n`);
    openssl(this.dir, "x509", "-req", "-in", `${file}.csr`, "-CA", `${this.name}.pem`, "-CAkey", `${this.name}.key`,
      "-CAcreateserial", "-out", `${file}.pem`, "-days", "1", "-extfile", `${file}.ext`);
    return {
      cert: readFileSync(join(this.dir, `${file}.pem`)),
      key: readFileSync(join(this.dir, `${file}.key`)),
      certPath: join(this.dir, `${file}.pem`),
      keyPath: join(this.dir, `${file}.key`),
    };
  }
}

describe("a secured gateway", { timeout: 180_000 }, () => {
  let dir: string;
  let serve: Serve;
  let serverCa: Authority;
  let clientCa: Authority;
  let strangerCa: Authority;
  let orders: { cert: Buffer; key: Buffer };
  const billingToken = randomBytes(32).toString("hex");
  const ordersPrefix = unique("orders").replace("_", "-");
  const billingPrefix = unique("billing").replace("_", "-");
  const clients: OutboxClient[] = [];

  function client(options: ConstructorParameters<typeof OutboxClient>[1]): OutboxClient {
    const made = new OutboxClient(serve.target, { retry: { ...NO_RETRY }, ...options });
    clients.push(made);
    return made;
  }

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "outboxd-node-pki-"));
    serverCa = new Authority(dir, "server-ca");
    clientCa = new Authority(dir, "clients-ca");
    strangerCa = new Authority(dir, "stranger-ca");
    const server = serverCa.issue("server", "outboxd", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth");
    orders = clientCa.issue("orders", "orders.internal", "extendedKeyUsage=clientAuth");
    const extraConfig = `
[tls]
cert = "${server.certPath}"
key = "${server.keyPath}"
client_ca = "${clientCa.path}"
client_certificate_optional = true

[[auth.identities]]
name = "orders"
client_certificate = "orders.internal"
producers = ["orders"]
topics = ["${ordersPrefix}*"]

[[auth.identities]]
name = "billing"
token_sha256 = "${createHash("sha256").update(billingToken).digest("hex")}"
producers = ["billing"]
topics = ["${billingPrefix}*"]
`;
    serve = await Serve.start(await createDatabase(unique("secured")), brokers, {
      extraConfig,
      probe: credentials.createSsl(serverCa.pem),
    });
  });

  after(async () => {
    for (const made of clients) made.close();
    await serve?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  function event(topic: string, id: string): Event {
    return { topic, aggregateId: id, eventType: "Noted", payload: { id } };
  }

  test("mutual TLS: the client certificate names the identity", async () => {
    const topic = await kafka.createTopic(`${ordersPrefix}-placed`);
    const outbox = client({ producer: "orders", tls: { ca: serverCa.pem, cert: orders.cert, key: orders.key } });
    const { eventIds } = await outbox.append([event(topic, "o-1")]);
    const finals = await outbox.waitFinal(eventIds, { timeoutMs: 60_000 });
    assert.equal(finals.get(eventIds[0])?.state, "PUBLISHED");
    // Acting for another producer is refused, naming it.
    const other = client({ producer: "billing", tls: { ca: serverCa.pem, cert: orders.cert, key: orders.key } });
    await assert.rejects(other.append([event(topic, "o-2")]), (error: unknown) => {
      assert.ok(error instanceof PermissionDenied, String(error));
      assert.match(error.message, /billing/);
      return true;
    });
  });

  test("TLS and a bearer token: the token names the identity", async () => {
    const topic = await kafka.createTopic(`${billingPrefix}-invoices`);
    const outbox = client({ producer: "billing", tls: { ca: serverCa.pem }, token: billingToken });
    const { eventIds } = await outbox.append([event(topic, "i-1")]);
    const finals = await outbox.waitFinal(eventIds, { timeoutMs: 60_000 });
    assert.equal(finals.get(eventIds[0])?.state, "PUBLISHED");
    // A topic not its own.
    await assert.rejects(outbox.append([event(`${ordersPrefix}-placed`, "i-2")]), PermissionDenied);
  });

  test("no credentials, or an unknown token: Unauthenticated", async () => {
    await assert.rejects(client({ producer: "billing", tls: { ca: serverCa.pem } }).status([]), Unauthenticated);
    await assert.rejects(
      client({ producer: "billing", tls: { ca: serverCa.pem }, token: "not-a-known-token" }).append([event(`${billingPrefix}-x`, "x")]),
      Unauthenticated,
    );
  });

  test("a server certificate of a CA the client does not trust: TlsError", async () => {
    const outbox = client({ producer: "billing", tls: { ca: strangerCa.pem }, token: billingToken });
    await assert.rejects(outbox.status([]), (error: unknown) => {
      assert.ok(error instanceof TlsError, String(error));
      return true;
    });
  });

  test("a client certificate of a CA outboxd does not know: TlsError", async () => {
    const impostor = strangerCa.issue("impostor", "orders.internal", "extendedKeyUsage=clientAuth");
    const outbox = client({ producer: "orders", tls: { ca: serverCa.pem, cert: impostor.cert, key: impostor.key } });
    await assert.rejects(outbox.status([]), (error: unknown) => {
      assert.ok(error instanceof TlsError, String(error));
      return true;
    });
  });
});
