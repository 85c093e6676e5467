// Plain data: events, transaction tokens, statuses, and their protobuf forms.
import { randomUUID } from "node:crypto";
import * as pb from "./gen/outboxd/v1/outbox";

/** Bytes go to Kafka unchanged; any other object or array is sent as compact UTF-8 JSON. */
export type Payload = Uint8Array | Record<string, unknown> | unknown[];
/** Caller headers, in order: an object or `[key, value]` pairs; strings are sent as UTF-8. */
export type Headers = Record<string, string | Uint8Array> | ReadonlyArray<readonly [string, string | Uint8Array]>;

/** One event, as a service hands it over. */
export interface Event {
  /** Kafka topic: 1 to 249 characters of `[a-zA-Z0-9._-]`. */
  topic: string;
  payload: Payload;
  /** The Kafka key; when absent the aggregate id is the key. */
  key?: string | Uint8Array;
  headers?: Headers;
  aggregateType?: string;
  aggregateId?: string;
  eventType?: string;
  /** A UUID of the caller's choosing; outboxd assigns a UUIDv7 when absent. */
  eventId?: string;
  /** The record's timestamp; the append time when absent. */
  occurredAt?: Date;
}

/** How the events of a transaction become publishable. */
export type TokenMode = "IMMEDIATE" | "TWO_PHASE" | "POSTGRES_XID";

const TOKEN_MODES: Record<TokenMode, pb.TokenMode> = {
  IMMEDIATE: pb.TokenMode.TOKEN_MODE_IMMEDIATE,
  TWO_PHASE: pb.TokenMode.TOKEN_MODE_TWO_PHASE,
  POSTGRES_XID: pb.TokenMode.TOKEN_MODE_POSTGRES_XID,
};

/**
 * A transaction token: who appends (`producer`), the caller's transaction id
 * (its idempotency key, unique per producer) and how its events become
 * publishable.
 */
export class Transaction {
  constructor(
    readonly producer: string,
    readonly transactionId: string,
    readonly mode: TokenMode = "IMMEDIATE",
    /** TWO_PHASE: discard the events when not committed within this many milliseconds. */
    readonly timeoutMs?: number,
    /** POSTGRES_XID: the caller's `pg_current_xact_id()`. */
    readonly xid: bigint = 0n,
    /** POSTGRES_XID: the cluster's `system_identifier`. */
    readonly systemId: bigint = 0n,
  ) {}

  static immediate(producer: string, transactionId: string = randomUUID()): Transaction {
    return new Transaction(producer, transactionId);
  }

  static twoPhase(producer: string, transactionId: string, timeoutMs: number): Transaction {
    return new Transaction(producer, transactionId, "TWO_PHASE", timeoutMs);
  }

  static postgresXid(producer: string, transactionId: string, xid: bigint, systemId: bigint): Transaction {
    return new Transaction(producer, transactionId, "POSTGRES_XID", undefined, xid, systemId);
  }

  ref(): TransactionRef {
    return { producer: this.producer, transactionId: this.transactionId };
  }

  toProto(): pb.TransactionToken {
    return {
      producer: this.producer,
      transactionId: this.transactionId,
      mode: TOKEN_MODES[this.mode],
      timeout: this.timeoutMs === undefined ? undefined : duration(this.timeoutMs),
      postgresXid: this.xid,
      postgresSystemId: this.systemId,
    };
  }
}

export interface TransactionRef {
  producer: string;
  transactionId: string;
}

export interface AppendResult {
  /** The events' ids, in the order they were given. */
  eventIds: string[];
  /** True when this (producer, transaction id, sequence) had been stored already, with the same content. */
  duplicate: boolean;
}

/** One request of `OutboxClient.appendStream`. */
export interface Batch {
  events: readonly Event[];
  transaction: Transaction;
  /** Numbers the appends of one transaction: 0, 1, 2… (default 0). */
  sequence?: number;
}

export type EventState =
  | "UNSPECIFIED"
  /** Awaiting the caller's commit. */
  | "PENDING"
  /** Publishable, not yet published. */
  | "READY"
  /** A delivery failed; waiting for the next attempt. */
  | "RETRYING"
  /** Final: acknowledged by Kafka (partition and offset are set). */
  | "PUBLISHED"
  /** Final: given up, with a reason. */
  | "DEAD_LETTERED"
  /** Final: its transaction aborted or rolled back. */
  | "DISCARDED";

const STATES: Record<number, EventState> = {
  [pb.EventState.EVENT_STATE_PENDING]: "PENDING",
  [pb.EventState.EVENT_STATE_READY]: "READY",
  [pb.EventState.EVENT_STATE_RETRYING]: "RETRYING",
  [pb.EventState.EVENT_STATE_PUBLISHED]: "PUBLISHED",
  [pb.EventState.EVENT_STATE_DEAD_LETTERED]: "DEAD_LETTERED",
  [pb.EventState.EVENT_STATE_DISCARDED]: "DISCARDED",
};

/** PUBLISHED, DEAD_LETTERED and DISCARDED are final: the event's state no longer changes. */
export function isFinal(state: EventState): boolean {
  return state === "PUBLISHED" || state === "DEAD_LETTERED" || state === "DISCARDED";
}

export interface EventStatus {
  eventId: string;
  producer: string;
  transactionId: string;
  sequence: number;
  topic: string;
  state: EventState;
  /** Where Kafka stored it, once PUBLISHED. */
  partition?: number;
  offset?: number;
  attempts: number;
  /** Last error or dead-letter reason. */
  reason: string;
  updatedAt?: Date;
  /** In a producer watch: its position in the producer's change feed. */
  cursor: bigint;
}

export interface StatusUpdate {
  status: EventStatus;
  /** True for the initial current-state messages of a watch. */
  snapshot: boolean;
}

/** A two_phase transaction appended but neither committed nor aborted. */
export interface PreparedTransaction {
  producer: string;
  transactionId: string;
  createdAt?: Date;
  expiresAt?: Date;
  events: number;
}

export function duration(milliseconds: number): { seconds: bigint; nanos: number } {
  const whole = Math.floor(milliseconds / 1000);
  return { seconds: BigInt(whole), nanos: Math.round((milliseconds - whole * 1000) * 1e6) };
}

function asBytes(value: string | Uint8Array): Buffer {
  return typeof value === "string" ? Buffer.from(value, "utf8") : Buffer.from(value.buffer, value.byteOffset, value.byteLength);
}

export function encodePayload(payload: Payload): Buffer {
  if (payload instanceof Uint8Array) return asBytes(payload);
  if (typeof payload === "string") {
    throw new TypeError("a string payload is ambiguous: pass a Buffer/Uint8Array, or an object/array to send as JSON");
  }
  if (payload !== null && typeof payload === "object") return Buffer.from(JSON.stringify(payload), "utf8");
  throw new TypeError(`payload must be bytes or an object/array (JSON), not ${typeof payload}`);
}

export function eventToProto(event: Event): pb.Event {
  const headers = event.headers === undefined ? [] : Array.isArray(event.headers) ? event.headers : Object.entries(event.headers);
  return {
    topic: event.topic,
    key: event.key === undefined ? undefined : asBytes(event.key),
    payload: encodePayload(event.payload),
    headers: (headers as ReadonlyArray<readonly [string, string | Uint8Array]>).map(([key, value]) => ({ key, value: asBytes(value) })),
    aggregateType: event.aggregateType ?? "",
    aggregateId: event.aggregateId ?? "",
    eventType: event.eventType ?? "",
    eventId: event.eventId ?? "",
    occurredAt: event.occurredAt,
  };
}

export function statusFromProto(message: pb.EventStatus): EventStatus {
  return {
    eventId: message.eventId,
    producer: message.producer,
    transactionId: message.transactionId,
    sequence: Number(message.sequence),
    topic: message.topic,
    state: STATES[message.state] ?? "UNSPECIFIED",
    partition: message.partition,
    offset: message.offset === undefined ? undefined : Number(message.offset),
    attempts: message.attempts,
    reason: message.reason,
    updatedAt: message.updatedAt,
    cursor: message.cursor,
  };
}

export function preparedFromProto(message: pb.PreparedTransaction): PreparedTransaction {
  return {
    producer: message.producer,
    transactionId: message.transactionId,
    createdAt: message.createdAt,
    expiresAt: message.expiresAt,
    events: Number(message.events),
  };
}
