// Atomic publishing for services on PostgreSQL with node-postgres (`pg`): the
// postgres_xid token. Inside the caller's open transaction, `postgresXid`
// reads the transaction's id (`pg_current_xact_id()`) and the cluster's
// `system_identifier` and appends the events with them; outboxd publishes them
// once it sees that transaction committed, and discards them when it rolled
// back. No outbox table, no second call.
import type { OutboxClient } from "./client";
import { Transaction, type AppendResult, type Event } from "./models";

/**
 * What `postgresXid` needs of a connection: a `pg` `Client` or a `PoolClient`
 * checked out of a `Pool` (a `Pool` itself cannot hold a transaction).
 */
export interface PgQueryable {
  query(text: string): Promise<{ rows: unknown[] }>;
  /** pg ≥ 8.12: "I" idle, "T" in a transaction, "E" in a failed transaction. */
  getTransactionStatus?(): string | null;
}

/** One round trip: the caller's transaction id and the cluster's identity. */
export const TOKEN_QUERY =
  "SELECT pg_current_xact_id()::text AS xid, system_identifier::text AS system_id FROM pg_control_system()";

/** The connection is not inside a transaction: its events could not be tied to one. */
export class NotInTransaction extends Error {
  constructor() {
    super("postgresXid needs an open transaction on the connection: run BEGIN, append inside it, then COMMIT");
    this.name = "NotInTransaction";
  }
}

/** The caller's PostgreSQL transaction id and cluster identity. */
export interface XidToken {
  xid: bigint;
  systemId: bigint;
}

/**
 * Reads the open transaction's xid and the cluster's system identifier.
 * `NotInTransaction` when the connection is idle outside a transaction
 * (checked before the query, which would otherwise spend an xid).
 */
export async function readXidToken(connection: PgQueryable): Promise<XidToken> {
  if (connection.getTransactionStatus?.() === "I") throw new NotInTransaction();
  const { rows } = await connection.query(TOKEN_QUERY);
  const row = rows[0] as { xid: string; system_id: string } | undefined;
  if (row === undefined) throw new Error("pg_control_system() returned no row");
  return { xid: BigInt(row.xid), systemId: BigInt(row.system_id) };
}

/** A postgres_xid transaction; its id defaults to one derived from the xid (unique per cluster). */
export function xidTransaction(token: XidToken, producer: string, transactionId?: string): Transaction {
  return Transaction.postgresXid(producer, transactionId ?? `pg-${token.systemId}-${token.xid}`, token.xid, token.systemId);
}

export interface PostgresXidOptions {
  producer?: string;
  /** Default: `pg-<system id>-<xid>`. Give the same one to each append of one transaction. */
  transactionId?: string;
  /** 0, 1, 2… for several appends in one transaction (default 0). */
  sequence?: number;
  timeoutMs?: number;
}

/**
 * Appends `events` tied to the connection's open transaction: they are
 * published when it commits and discarded when it rolls back. Call it after
 * BEGIN, before COMMIT. An `Unavailable` error means nothing was stored: roll
 * back.
 *
 *     await db.query("BEGIN");
 *     await db.query("INSERT INTO orders …");
 *     await postgresXid(outbox, db, [event]);
 *     await db.query("COMMIT");
 */
export async function postgresXid(
  client: OutboxClient,
  connection: PgQueryable,
  events: readonly Event[],
  options: PostgresXidOptions = {},
): Promise<AppendResult> {
  const producer = options.producer ?? client.producer;
  if (!producer) throw new TypeError("no producer: pass one here or to new OutboxClient(…, { producer })");
  const token = await readXidToken(connection);
  return client.append(events, {
    transaction: xidTransaction(token, producer, options.transactionId),
    sequence: options.sequence,
    timeoutMs: options.timeoutMs,
  });
}
