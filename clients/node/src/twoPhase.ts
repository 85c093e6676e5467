// Atomic publishing on any database: the two_phase token. The events are
// appended (PENDING) first, then the caller commits its own transaction,
// then Commit makes them publishable; when the caller's work throws, Abort
// discards them. A caller that cannot reach outboxd never commits. If the
// process dies between its own commit and Commit, `recoverPrepared` settles
// the transaction on the next start-up; what nobody settles is discarded
// when the token's timeout passes.
import { randomUUID } from "node:crypto";
import type { OutboxClient } from "./client";
import { OutboxError } from "./errors";
import { Transaction, type AppendResult, type Event, type PreparedTransaction } from "./models";

/** How long outboxd keeps unresolved events before discarding them (5 minutes). */
export const DEFAULT_TWO_PHASE_TIMEOUT_MS = 5 * 60_000;

/** The transaction `twoPhase` hands to the caller's work. */
export class TwoPhase {
  readonly transaction: Transaction;
  /** Ids of every event appended so far, in order. */
  readonly eventIds: string[] = [];
  private sequence = 0;

  constructor(
    private readonly client: OutboxClient,
    producer: string,
    transactionId: string,
    timeoutMs: number,
  ) {
    this.transaction = Transaction.twoPhase(producer, transactionId, timeoutMs);
  }

  get transactionId(): string {
    return this.transaction.transactionId;
  }

  /** How many appends were made (the next one's sequence). */
  get appends(): number {
    return this.sequence;
  }

  /** Appends more events to this transaction (the next sequence). */
  async append(events: readonly Event[]): Promise<AppendResult> {
    const result = await this.client.append(events, { transaction: this.transaction, sequence: this.sequence });
    this.sequence += 1;
    this.eventIds.push(...result.eventIds);
    return result;
  }
}

export interface TwoPhaseOptions {
  /** Default: a random UUID. Keep it in the business rows, for `recoverPrepared`. */
  transactionId?: string;
  producer?: string;
  /** How long outboxd keeps the transaction unresolved before discarding it. */
  timeoutMs?: number;
  /** Called when Abort fails after the work threw (the work's error is what propagates). */
  onAbortError?: (error: unknown, tx: TwoPhase) => void;
}

export interface TwoPhaseOutcome<T> {
  /** What the work returned. */
  value: T;
  transactionId: string;
  eventIds: string[];
  /** The number of events Commit made publishable. */
  committedEvents: number;
}

/**
 * Appends `events` (PENDING), runs `work` — which commits the caller's own
 * transaction — then Commits the events. When `work` throws, Aborts them and
 * rethrows. An error of the append means nothing was stored and `work` does
 * not run; an error of Commit (outboxd unreachable after retries) propagates
 * after the caller's commit: `recoverPrepared` settles it later.
 *
 *     await twoPhase(outbox, [event], async (tx) => {
 *       await db.query("UPDATE orders SET outbox_tx = $1 WHERE id = $2", [tx.transactionId, id]);
 *       await db.query("COMMIT");
 *     });
 */
export async function twoPhase<T>(
  client: OutboxClient,
  events: readonly Event[],
  work: (tx: TwoPhase) => Promise<T> | T,
  options: TwoPhaseOptions = {},
): Promise<TwoPhaseOutcome<T>> {
  const producer = options.producer ?? client.producer;
  if (!producer) throw new TypeError("no producer: pass one here or to new OutboxClient(…, { producer })");
  const tx = new TwoPhase(client, producer, options.transactionId ?? randomUUID(), options.timeoutMs ?? DEFAULT_TWO_PHASE_TIMEOUT_MS);
  if (events.length > 0) await tx.append(events);
  let value: T;
  try {
    value = await work(tx);
  } catch (error) {
    if (tx.appends > 0) {
      try {
        await client.abort(tx.transactionId, { producer });
      } catch (abortError) {
        // The work's error matters more; the token's timeout discards the events.
        if (options.onAbortError) options.onAbortError(abortError, tx);
        else if (!(abortError instanceof OutboxError)) throw abortError;
      }
    }
    throw error;
  }
  const committedEvents = tx.appends > 0 ? await client.commit(tx.transactionId, { producer }) : 0;
  return { value, transactionId: tx.transactionId, eventIds: tx.eventIds, committedEvents };
}

export interface Recovery {
  committed: PreparedTransaction[];
  aborted: PreparedTransaction[];
}

/**
 * Settles two_phase transactions left by a process that died between its own
 * commit and Commit: each prepared transaction of the producer older than
 * `olderThanMs` is committed when `committed(prepared)` says the business
 * transaction committed, else aborted. Run it on start-up.
 */
export async function recoverPrepared(
  client: OutboxClient,
  committed: (prepared: PreparedTransaction) => Promise<boolean> | boolean,
  options: { producer?: string; olderThanMs?: number } = {},
): Promise<Recovery> {
  const recovery: Recovery = { committed: [], aborted: [] };
  const prepared = await client.listPrepared({ producer: options.producer, olderThanMs: options.olderThanMs ?? 30_000 });
  for (const transaction of prepared) {
    if (await committed(transaction)) {
      await client.commit(transaction.transactionId, { producer: transaction.producer });
      recovery.committed.push(transaction);
    } else {
      await client.abort(transaction.transactionId, { producer: transaction.producer });
      recovery.aborted.push(transaction);
    }
  }
  return recovery;
}
