// The client: `OutboxClient`, on @grpc/grpc-js.
import { randomUUID } from "node:crypto";
import {
  ChannelCredentials,
  credentials as grpcCredentials,
  Metadata,
  status as Status,
  type CallOptions,
  type ChannelOptions,
  type ClientDuplexStream,
  type ClientReadableStream,
  type ClientUnaryCall,
  type ServiceError,
} from "@grpc/grpc-js";
import * as pb from "./gen/outboxd/v1/outbox";
import { errorFor, fromServiceError, OutboxError, TlsError } from "./errors";
import {
  duration,
  eventToProto,
  isFinal,
  preparedFromProto,
  statusFromProto,
  Transaction,
  type AppendResult,
  type Batch,
  type Event,
  type EventStatus,
  type PreparedTransaction,
  type StatusUpdate,
  type TransactionRef,
} from "./models";
import { addTraceContext } from "./tracing";

/**
 * Exponential backoff with full jitter between attempts. Every call of
 * outboxd's API is safe to repeat: an append retried with the same token and
 * sequence stores nothing new and answers with the same event ids
 * (`duplicate`), Commit and Abort are idempotent, the rest read.
 */
export interface RetryPolicy {
  maxAttempts: number;
  initialBackoffMs: number;
  maxBackoffMs: number;
  multiplier: number;
  /** The status codes after which a call is repeated. */
  retryOn: readonly Status[];
}

export const DEFAULT_RETRY: RetryPolicy = Object.freeze({
  maxAttempts: 6,
  initialBackoffMs: 100,
  maxBackoffMs: 5_000,
  multiplier: 2,
  retryOn: [Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED],
});

/** No retries at all. */
export const NO_RETRY: RetryPolicy = Object.freeze({ ...DEFAULT_RETRY, maxAttempts: 1 });

/**
 * How long a watch keeps reconnecting after its connection dropped (about a
 * minute and a half), counted from its last message.
 */
export const WATCH_RECONNECT: RetryPolicy = Object.freeze({ ...DEFAULT_RETRY, maxAttempts: 20, initialBackoffMs: 200 });

/** Milliseconds to wait before attempt `attempt + 1` (attempts count from 1). */
export function backoffMs(policy: RetryPolicy, attempt: number): number {
  const ceiling = Math.min(policy.maxBackoffMs, policy.initialBackoffMs * policy.multiplier ** (attempt - 1));
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

/** TLS with a private CA and, for mutual TLS, a client certificate (PEM). */
export interface TlsOptions {
  /** The CA certificate(s) that signed outboxd's certificate; the system's roots when absent. */
  ca?: string | Buffer;
  /** This service's certificate chain, leaf first (mutual TLS). */
  cert?: string | Buffer;
  /** Its private key (mutual TLS). */
  key?: string | Buffer;
  /** The name to expect in outboxd's certificate when the target's host is not it. */
  serverName?: string;
}

export interface ClientOptions {
  /** The producer namespace of the calls that take none. */
  producer?: string;
  /** `true` for TLS with the system's roots, `TlsOptions`, or channel credentials of your own. */
  tls?: boolean | TlsOptions | ChannelCredentials;
  /** A bearer token, sent as `authorization: Bearer <token>` with every call. */
  token?: string;
  /** The deadline of each attempt of a unary call (default 10 s); 0: none. */
  timeoutMs?: number;
  retry?: RetryPolicy;
  /** Send the active OpenTelemetry span's W3C trace context (default true; needs @opentelemetry/api). */
  traceContext?: boolean;
  /** Extra @grpc/grpc-js channel options. */
  channelOptions?: ChannelOptions;
}

export interface AppendOptions {
  /** A `Transaction`, a transaction id (an immediate token of the client's producer), or absent for a new one. */
  transaction?: Transaction | string;
  /** Numbers the appends of one transaction: 0, 1, 2… (default 0). */
  sequence?: number;
  timeoutMs?: number;
  retry?: RetryPolicy;
}

/** The outcome of one `Batch` of `appendStream`. */
export interface StreamedAppend {
  batch: Batch;
  /** The events' ids; empty when `error` is set. */
  eventIds: string[];
  duplicate: boolean;
  /** Why this batch failed (`InvalidEvent`, `AlreadyExists`…); the others of the stream are not affected. */
  error?: OutboxError;
}

/** What `status` and `watch` look at: event ids, transactions, or (watch only) a whole producer. */
export type StatusTarget =
  | readonly string[]
  | { eventIds: readonly string[] }
  | { transactions: ReadonlyArray<TransactionRef | Transaction> };

export type WatchTarget = StatusTarget | { producer: string; afterCursor?: bigint };

type Unary<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

const DEFAULT_CHANNEL_OPTIONS: ChannelOptions = {
  // Reconnect soon after outboxd comes back.
  "grpc.initial_reconnect_backoff_ms": 200,
  "grpc.min_reconnect_backoff_ms": 200,
  "grpc.max_reconnect_backoff_ms": 5_000,
  // Retries are this client's: it knows which calls are safe to repeat.
  "grpc.enable_retries": 0,
  "grpc.max_receive_message_length": 64 * 1024 * 1024,
  "grpc.max_send_message_length": 64 * 1024 * 1024,
  "grpc.keepalive_time_ms": 30_000,
  "grpc.keepalive_timeout_ms": 10_000,
};

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

function refOf(transaction: TransactionRef | Transaction): pb.TransactionRef {
  return { producer: transaction.producer, transactionId: transaction.transactionId };
}

function statusRequest(target: StatusTarget): pb.GetStatusRequest {
  if (Array.isArray(target)) return { eventIds: [...(target as readonly string[])], transactions: [] };
  if ("eventIds" in target) return { eventIds: [...target.eventIds], transactions: [] };
  if ("transactions" in target) return { eventIds: [], transactions: target.transactions.map(refOf) };
  throw new TypeError("status takes event ids or { transactions }");
}

/** A one-shot signal many can wait for; `notify` wakes them all. */
class Signal {
  private waiters: (() => void)[] = [];
  wait(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }
  notify(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }
}

/**
 * A client of outboxd.
 *
 *     const outbox = new OutboxClient("127.0.0.1:50051", { producer: "shop" });
 *     const { eventIds } = await outbox.append([{ topic: "orders", aggregateId: "1", payload: { id: 1 } }]);
 *     outbox.close();
 *
 * `target` is `host:port`; an `http://` prefix is dropped, an `https://`
 * prefix turns TLS on.
 */
export class OutboxClient {
  readonly target: string;
  readonly producer: string | undefined;
  readonly timeoutMs: number;
  readonly retry: RetryPolicy;
  private readonly traceContext: boolean;
  private readonly token: string | undefined;
  private readonly outbox: pb.OutboxClient;
  private readonly admin: pb.OutboxAdminClient;

  constructor(target: string, options: ClientOptions = {}) {
    let tls = options.tls ?? false;
    if (target.startsWith("http://")) target = target.slice("http://".length);
    else if (target.startsWith("https://")) {
      target = target.slice("https://".length);
      tls = tls || true;
    }
    this.target = target.replace(/\/+$/, "");
    this.producer = options.producer;
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.retry = options.retry ?? DEFAULT_RETRY;
    this.traceContext = options.traceContext ?? true;
    this.token = options.token;
    const channelOptions: ChannelOptions = { ...DEFAULT_CHANNEL_OPTIONS, ...options.channelOptions };
    let credentials: ChannelCredentials;
    if (tls instanceof ChannelCredentials) credentials = tls;
    else if (tls === false) credentials = grpcCredentials.createInsecure();
    else if (tls === true) credentials = grpcCredentials.createSsl();
    else {
      const toBuffer = (value: string | Buffer | undefined) =>
        value === undefined ? null : typeof value === "string" ? Buffer.from(value) : value;
      credentials = grpcCredentials.createSsl(toBuffer(tls.ca), toBuffer(tls.key), toBuffer(tls.cert));
      if (tls.serverName) {
        channelOptions["grpc.ssl_target_name_override"] = tls.serverName;
        channelOptions["grpc.default_authority"] = tls.serverName;
      }
    }
    this.outbox = new pb.OutboxClient(this.target, credentials, channelOptions);
    // The admin stub shares the Outbox stub's channel.
    this.admin = new pb.OutboxAdminClient(this.target, credentials, {
      ...channelOptions,
      channelOverride: this.outbox.getChannel(),
    });
  }

  /** Closes the channel; calls in progress fail. */
  close(): void {
    this.outbox.close();
  }

  /** Waits until the channel is connected; `Unavailable` after `timeoutMs`. */
  async waitReady(timeoutMs = 30_000): Promise<void> {
    await new Promise<void>((resolve, reject) =>
      this.outbox.waitForReady(Date.now() + timeoutMs, (error) =>
        error
          ? reject(errorFor(Status.UNAVAILABLE, `outboxd at ${this.target} not reachable within ${timeoutMs} ms: ${error.message}`))
          : resolve(),
      ),
    );
  }

  // -- plumbing -------------------------------------------------------------

  private metadata(): Metadata {
    const metadata = new Metadata();
    if (this.token) metadata.set("authorization", `Bearer ${this.token}`);
    if (this.traceContext) addTraceContext(metadata);
    return metadata;
  }

  private producerOf(producer: string | undefined): string {
    const chosen = producer ?? this.producer;
    if (!chosen) throw new TypeError("no producer: pass one here or to new OutboxClient(…, { producer })");
    return chosen;
  }

  private transactionOf(transaction: Transaction | string | undefined): Transaction {
    if (transaction instanceof Transaction) return transaction;
    return Transaction.immediate(this.producerOf(undefined), transaction ?? randomUUID());
  }

  private async unary<Req, Res>(
    method: Unary<Req, Res>,
    request: Req,
    timeoutMs: number | undefined,
    retry: RetryPolicy | undefined,
  ): Promise<Res> {
    const policy = retry ?? this.retry;
    const timeout = timeoutMs ?? this.timeoutMs;
    for (let attempt = 1; ; attempt++) {
      try {
        return await new Promise<Res>((resolve, reject) => {
          const options: Partial<CallOptions> = timeout > 0 ? { deadline: Date.now() + timeout } : {};
          method(request, this.metadata(), options, (error, response) => (error ? reject(error) : resolve(response)));
        });
      } catch (error) {
        const code = (error as Partial<ServiceError>).code;
        if (code !== undefined && policy.retryOn.includes(code) && attempt < policy.maxAttempts) {
          await sleep(backoffMs(policy, attempt));
          continue;
        }
        throw fromServiceError(error);
      }
    }
  }

  // -- Outbox ---------------------------------------------------------------

  /**
   * Stores `events` for one transaction token, atomically; resolves once they
   * are committed to outboxd's store. Retried on UNAVAILABLE and
   * DEADLINE_EXCEEDED with the same token, which stores nothing twice.
   */
  async append(events: readonly Event[], options: AppendOptions = {}): Promise<AppendResult> {
    const token = this.transactionOf(options.transaction);
    const request: pb.AppendRequest = {
      token: token.toProto(),
      sequence: BigInt(options.sequence ?? 0),
      events: events.map(eventToProto),
      correlation: 0n,
    };
    const response = await this.unary<pb.AppendRequest, pb.AppendResponse>(
      this.outbox.append.bind(this.outbox),
      request,
      options.timeoutMs,
      options.retry,
    );
    return { eventIds: response.eventIds, duplicate: response.duplicate };
  }

  /**
   * Pipelined appends on one stream, for high volume: yields one
   * `StreamedAppend` per batch, in order, with at most `maxInFlight` batches
   * sent and not yet answered. Batches commit in stream order. A failed batch
   * fails only itself (its `error` is set). When the stream breaks
   * (UNAVAILABLE), a new one is opened and the unanswered batches are sent
   * again, which stores nothing twice. `batches` may be an iterable or an
   * async iterable; it is pulled only as room frees up.
   */
  async *appendStream(
    batches: Iterable<Batch> | AsyncIterable<Batch>,
    options: { maxInFlight?: number; retry?: RetryPolicy } = {},
  ): AsyncGenerator<StreamedAppend, void, undefined> {
    const maxInFlight = options.maxInFlight ?? 256;
    if (!(maxInFlight >= 1)) throw new RangeError("maxInFlight must be at least 1");
    const policy = options.retry ?? this.retry;
    const source: AsyncIterator<Batch> | Iterator<Batch> =
      Symbol.asyncIterator in batches
        ? (batches as AsyncIterable<Batch>)[Symbol.asyncIterator]()
        : (batches as Iterable<Batch>)[Symbol.iterator]();
    // Sent (or to send again), not yet answered, correlations consecutive.
    const pending: { correlation: bigint; batch: Batch; request: pb.AppendRequest }[] = [];
    const state = { generation: 0, nextCorrelation: 0n, exhausted: false, sourceError: undefined as unknown };
    const room = new Signal();

    // Feeds one stream: sends what is pending (after a reconnect), then pulls
    // new batches while fewer than maxInFlight are unanswered; half-closes
    // the stream after the last. Stops when its stream was replaced.
    const feed = async (
      generation: number,
      call: ClientDuplexStream<pb.AppendRequest, pb.AppendResponse>,
      responses: Queue<pb.AppendResponse>,
      ended: Promise<void>,
    ) => {
      let nextSend = pending.length > 0 ? pending[0].correlation : state.nextCorrelation;
      // Once its stream has ended or broken, a feeder stops: the next
      // stream's feeder sends what is unanswered.
      while (state.generation === generation && !responses.closed) {
        if (pending.length > 0 && nextSend < pending[0].correlation) nextSend = pending[0].correlation;
        const last = pending.length > 0 ? pending[pending.length - 1].correlation : -1n;
        if (pending.length > 0 && nextSend <= last) {
          const { request } = pending[Number(nextSend - pending[0].correlation)];
          nextSend += 1n;
          if (!call.write(request)) {
            await Promise.race([new Promise((resolve) => call.once("drain", resolve)), ended]);
          }
          continue;
        }
        if (state.exhausted) {
          call.end();
          return;
        }
        if (pending.length >= maxInFlight) {
          await Promise.race([room.wait(), ended]);
          continue;
        }
        let next: IteratorResult<Batch>;
        try {
          next = await source.next();
        } catch (error) {
          state.exhausted = true;
          state.sourceError = error ?? new Error("the batches' iterator failed");
          continue;
        }
        if (next.done) {
          state.exhausted = true;
          continue;
        }
        const batch = next.value;
        pending.push({
          correlation: state.nextCorrelation,
          batch,
          request: {
            token: batch.transaction.toProto(),
            sequence: BigInt(batch.sequence ?? 0),
            events: batch.events.map(eventToProto),
            correlation: state.nextCorrelation,
          },
        });
        state.nextCorrelation += 1n;
      }
    };

    let attempt = 0;
    let call: ClientDuplexStream<pb.AppendRequest, pb.AppendResponse> | undefined;
    let feeding: Promise<void> = Promise.resolve();
    try {
      for (;;) {
        const generation = ++state.generation;
        room.notify(); // a feeder of an earlier stream, if waiting, ends
        await feeding;
        if (state.sourceError !== undefined && pending.length === 0) throw state.sourceError;
        const stream = this.outbox.appendStream(this.metadata());
        call = stream;
        const queue = new Queue<pb.AppendResponse>();
        stream.on("data", (response: pb.AppendResponse) => queue.push(response));
        stream.on("error", (error: Error) => queue.fail(error));
        stream.on("end", () => queue.end());
        let markEnded!: () => void;
        const ended = new Promise<void>((resolve) => (markEnded = resolve));
        queue.onClose = markEnded;
        feeding = feed(generation, stream, queue, ended).catch((error) => {
          state.exhausted = true;
          state.sourceError = error;
        });
        let failure: unknown;
        try {
          for await (const response of queue) {
            const head = pending[0];
            if (head === undefined || head.correlation !== response.correlation) {
              throw errorFor(Status.INTERNAL, `AppendStream answered correlation ${response.correlation} out of order`);
            }
            pending.shift();
            room.notify();
            attempt = 0;
            yield streamed(head.batch, response);
          }
        } catch (error) {
          if (error instanceof OutboxError) throw error;
          failure = error;
        }
        if (failure !== undefined) {
          const code = (failure as Partial<ServiceError>).code;
          attempt += 1;
          if (code !== undefined && policy.retryOn.includes(code) && attempt < policy.maxAttempts) {
            await sleep(backoffMs(policy, attempt));
            continue;
          }
          throw fromServiceError(failure);
        }
        if (pending.length > 0 || !state.exhausted) {
          // The stream ended early (outboxd shutting down): go on on a new one.
          attempt += 1;
          if (attempt < policy.maxAttempts) {
            await sleep(backoffMs(policy, attempt));
            continue;
          }
          throw errorFor(Status.UNAVAILABLE, `AppendStream ended with ${pending.length} batches unanswered`);
        }
        await feeding;
        if (state.sourceError !== undefined) throw state.sourceError;
        return;
      }
    } finally {
      state.generation += 1;
      room.notify();
      if (call !== undefined) {
        call.on("error", () => {}); // the cancellation's own error
        call.cancel();
      }
    }
  }

  /** Makes a two_phase transaction's events publishable; resolves to how many. Idempotent. */
  async commit(transactionId: string, options: { producer?: string; timeoutMs?: number } = {}): Promise<number> {
    const response = await this.unary<pb.CommitRequest, pb.CommitResponse>(
      this.outbox.commit.bind(this.outbox),
      { producer: this.producerOf(options.producer), transactionId },
      options.timeoutMs,
      undefined,
    );
    return Number(response.events);
  }

  /** Discards a two_phase transaction's events; resolves to how many. Idempotent. */
  async abort(transactionId: string, options: { producer?: string; timeoutMs?: number } = {}): Promise<number> {
    const response = await this.unary<pb.AbortRequest, pb.AbortResponse>(
      this.outbox.abort.bind(this.outbox),
      { producer: this.producerOf(options.producer), transactionId },
      options.timeoutMs,
      undefined,
    );
    return Number(response.events);
  }

  /** The current state of events, by ids or by `{ transactions }`. */
  async status(target: StatusTarget, options: { timeoutMs?: number } = {}): Promise<EventStatus[]> {
    const response = await this.unary<pb.GetStatusRequest, pb.GetStatusResponse>(
      this.outbox.getStatus.bind(this.outbox),
      statusRequest(target),
      options.timeoutMs,
      undefined,
    );
    return response.events.map(statusFromProto);
  }

  /**
   * Status updates: first the current state of every matched event, then each
   * change. A watch on ids or transactions ends once every event is final; a
   * watch on `{ producer }` runs until the caller stops iterating, from after
   * `afterCursor`. When the connection drops, or outboxd restarts, the watch
   * reconnects and resumes: ids and transactions from their current state (a
   * final state is never reported twice), a producer after the last cursor seen.
   * Aborting `signal` ends the watch at once: the iterator throws
   * `Cancelled` (or the abort's reason, when that is an `OutboxError`).
   */
  async *watch(
    target: WatchTarget,
    options: { reconnect?: RetryPolicy; signal?: AbortSignal } = {},
  ): AsyncGenerator<StatusUpdate, void, undefined> {
    const reconnect = options.reconnect ?? WATCH_RECONNECT;
    const signal = options.signal;
    const aborted = () =>
      signal?.reason instanceof OutboxError ? signal.reason : errorFor(Status.CANCELLED, `the watch was aborted (${String(signal?.reason)})`);
    let ids: string[] = [];
    let refs: pb.TransactionRef[] = [];
    let producer: string | undefined;
    let cursor = 0n;
    if (!Array.isArray(target) && "producer" in target) {
      producer = target.producer;
      cursor = target.afterCursor ?? 0n;
    } else {
      const request = statusRequest(target as StatusTarget);
      ids = request.eventIds;
      refs = request.transactions;
      if (ids.length === 0 && refs.length === 0) return;
    }
    const final = new Set<string>();
    const seen = new Set<string>();
    let attempt = 0;
    for (;;) {
      if (signal?.aborted) throw aborted();
      const request: pb.WatchStatusRequest =
        producer !== undefined
          ? { eventIds: [], transactions: [], producer, afterCursor: cursor }
          : ids.length > 0
            ? { eventIds: ids.filter((id) => !final.has(id)), transactions: [], producer: "", afterCursor: 0n }
            : { eventIds: [], transactions: refs, producer: "", afterCursor: 0n };
      const call: ClientReadableStream<pb.StatusUpdate> = this.outbox.watchStatus(request, this.metadata());
      const cancel = () => call.cancel();
      signal?.addEventListener("abort", cancel, { once: true });
      let endedCleanly = false;
      let tlsFailure: TlsError | undefined;
      let done = false;
      try {
        for await (const message of call as AsyncIterable<pb.StatusUpdate>) {
          attempt = 0;
          if (message.status === undefined) continue;
          const status = statusFromProto(message.status);
          if (producer !== undefined) {
            if (status.cursor > cursor) cursor = status.cursor;
          } else if (final.has(status.eventId)) {
            continue; // re-sent by the snapshot of a resumed watch
          } else {
            seen.add(status.eventId);
            if (isFinal(status.state)) final.add(status.eventId);
          }
          yield { status, snapshot: message.snapshot };
        }
        endedCleanly = true;
      } catch (error) {
        if (signal?.aborted) throw aborted();
        const code = (error as Partial<ServiceError>).code;
        const failure = fromServiceError(error);
        if (code === undefined || !reconnect.retryOn.includes(code)) throw failure;
        if (failure instanceof TlsError) tlsFailure = failure;
      } finally {
        signal?.removeEventListener("abort", cancel);
        call.on("error", () => {}); // the cancellation's own error
        call.cancel();
      }
      if (ids.length > 0 && ids.every((id) => final.has(id))) done = true;
      if (refs.length > 0 && endedCleanly && [...seen].every((id) => final.has(id))) done = true;
      if (done) return;
      attempt += 1;
      if (attempt >= reconnect.maxAttempts) {
        throw tlsFailure ?? errorFor(Status.UNAVAILABLE, `watch lost its connection to ${this.target} and could not resume`);
      }
      await sleep(backoffMs(reconnect, attempt));
    }
  }

  /**
   * Watches `eventIds` until each is final (PUBLISHED, DEAD_LETTERED or
   * DISCARDED); resolves to their final statuses. `DeadlineExceeded` after
   * `timeoutMs`.
   */
  async waitFinal(eventIds: readonly string[], options: { timeoutMs?: number } = {}): Promise<Map<string, EventStatus>> {
    const finals = new Map<string, EventStatus>();
    if (eventIds.length === 0) return finals;
    const abort = new AbortController();
    const timer =
      options.timeoutMs === undefined
        ? undefined
        : setTimeout(
            () =>
              abort.abort(
                errorFor(Status.DEADLINE_EXCEEDED, `${eventIds.length - finals.size} of ${eventIds.length} events not final within ${options.timeoutMs} ms`),
              ),
            options.timeoutMs,
          );
    try {
      for await (const update of this.watch([...eventIds], { signal: abort.signal })) {
        if (isFinal(update.status.state)) finals.set(update.status.eventId, update.status);
      }
      return finals;
    } finally {
      clearTimeout(timer);
    }
  }

  // -- OutboxAdmin ----------------------------------------------------------

  /** two_phase transactions of `producer` appended more than `olderThanMs` ago and neither committed nor aborted. */
  async listPrepared(options: { producer?: string; olderThanMs?: number; timeoutMs?: number } = {}): Promise<PreparedTransaction[]> {
    const response = await this.unary<pb.ListPreparedRequest, pb.ListPreparedResponse>(
      this.admin.listPrepared.bind(this.admin),
      { producer: this.producerOf(options.producer), olderThan: duration(options.olderThanMs ?? 0) },
      options.timeoutMs,
      undefined,
    );
    return response.transactions.map(preparedFromProto);
  }
}

function streamed(batch: Batch, response: pb.AppendResponse): StreamedAppend {
  if (response.failure !== undefined) {
    const failure = response.failure;
    return {
      batch,
      eventIds: [],
      duplicate: false,
      error: errorFor(failure.code as Status, failure.message, failure.fieldViolations.map((v) => ({ field: v.field, description: v.description }))),
    };
  }
  return { batch, eventIds: response.eventIds, duplicate: response.duplicate };
}

/** An async queue of a stream's messages: ends, or fails with the stream's error. */
class Queue<T> implements AsyncIterable<T> {
  private items: T[] = [];
  /** The stream ended or failed (its remaining items may still be read). */
  closed = false;
  private error: unknown;
  private wake: (() => void) | undefined;
  onClose: (() => void) | undefined;

  push(item: T): void {
    this.items.push(item);
    this.wakeUp();
  }
  end(): void {
    this.close();
  }
  fail(error: unknown): void {
    if (this.closed) return;
    this.error = error;
    this.close();
  }
  private close(): void {
    if (this.closed) return;
    this.closed = true;
    this.onClose?.();
    this.wakeUp();
  }
  private wakeUp(): void {
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }
  async *[Symbol.asyncIterator](): AsyncGenerator<T, void, undefined> {
    for (;;) {
      if (this.items.length > 0) {
        yield this.items.shift() as T;
        continue;
      }
      if (this.closed) {
        if (this.error !== undefined) throw this.error;
        return;
      }
      await new Promise<void>((resolve) => (this.wake = resolve));
    }
  }
}
