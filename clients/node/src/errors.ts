// Typed errors for outboxd's gRPC status codes, with the field violations
// (google.rpc.BadRequest) and retry delay (google.rpc.RetryInfo) outboxd
// sends in the `grpc-status-details-bin` trailer.
import { Metadata, status as Status, type ServiceError } from "@grpc/grpc-js";
import { BinaryReader } from "@bufbuild/protobuf/wire";

/** A field of the request at fault, e.g. `events[3].topic`, and why. */
export interface FieldViolation {
  field: string;
  description: string;
}

/** An outboxd call failed. `code` is the gRPC status code. */
export class OutboxError extends Error {
  /** The gRPC status code (`status` of @grpc/grpc-js). */
  readonly code: Status;
  /** The fields at fault (`google.rpc.BadRequest` details), if any. */
  readonly violations: readonly FieldViolation[];
  /** The delay outboxd asks for before a retry (`google.rpc.RetryInfo`), in milliseconds. */
  readonly retryDelayMs: number | undefined;
  /** The status message as outboxd sent it. */
  readonly details: string;

  constructor(
    details: string,
    options: { code?: Status; violations?: readonly FieldViolation[]; retryDelayMs?: number } = {},
  ) {
    const code = options.code ?? Status.UNKNOWN;
    super(`${Status[code] ?? code}: ${details}`);
    this.name = new.target.name;
    this.code = code;
    this.details = details;
    this.violations = options.violations ?? [];
    this.retryDelayMs = options.retryDelayMs;
  }

  /** The name of the status code, e.g. `INVALID_ARGUMENT`. */
  get codeName(): string {
    return Status[this.code] ?? String(this.code);
  }
}

/** INVALID_ARGUMENT: refused before anything was stored; `violations` names each field at fault. */
export class InvalidEvent extends OutboxError {
  /** The paths of the fields at fault, e.g. `["events[3].topic"]`. */
  get fields(): string[] {
    return this.violations.map((v) => v.field);
  }
}
/** ALREADY_EXISTS: the same (producer, transaction id, sequence) was stored with another body, or an event id is taken. */
export class AlreadyExists extends OutboxError {}
/** FAILED_PRECONDITION: Commit after an abort or expiry, Abort after a commit, an append to a resolved transaction… */
export class FailedPrecondition extends OutboxError {}
/** NOT_FOUND: watching unknown events or transactions. */
export class NotFound extends OutboxError {}
/** UNAUTHENTICATED: no or an unknown bearer token or client certificate. */
export class Unauthenticated extends OutboxError {}
/** PERMISSION_DENIED: this identity may not use that producer or topic. */
export class PermissionDenied extends OutboxError {}
/** RESOURCE_EXHAUSTED: a limit; `retryDelayMs` says when to try again. */
export class ResourceExhausted extends OutboxError {}
/**
 * UNAVAILABLE: outboxd or its store cannot be reached. Nothing is known to be
 * stored: do not commit the business transaction on the strength of it.
 */
export class Unavailable extends OutboxError {}
/**
 * UNAVAILABLE at the TLS layer: the client does not trust outboxd's
 * certificate, or outboxd refused the client certificate. Nothing was stored.
 */
export class TlsError extends Unavailable {}
/** DEADLINE_EXCEEDED: no answer in time; the request may or may not have been stored. */
export class DeadlineExceeded extends OutboxError {}
/** CANCELLED: the call was cancelled. */
export class Cancelled extends OutboxError {}
/** INTERNAL: a bug or a protocol error. */
export class Internal extends OutboxError {}

const BY_CODE = new Map<Status, new (details: string, options?: ConstructorParameters<typeof OutboxError>[1]) => OutboxError>([
  [Status.INVALID_ARGUMENT, InvalidEvent],
  [Status.ALREADY_EXISTS, AlreadyExists],
  [Status.FAILED_PRECONDITION, FailedPrecondition],
  [Status.NOT_FOUND, NotFound],
  [Status.UNAUTHENTICATED, Unauthenticated],
  [Status.PERMISSION_DENIED, PermissionDenied],
  [Status.RESOURCE_EXHAUSTED, ResourceExhausted],
  [Status.UNAVAILABLE, Unavailable],
  [Status.DEADLINE_EXCEEDED, DeadlineExceeded],
  [Status.CANCELLED, Cancelled],
  [Status.INTERNAL, Internal],
]);

/** The typed error of a status code. */
export function errorFor(
  code: Status,
  details: string,
  violations: readonly FieldViolation[] = [],
  retryDelayMs?: number,
): OutboxError {
  const Class = BY_CODE.get(code) ?? OutboxError;
  return new Class(details, { code, violations, retryDelayMs });
}

const BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest";
const RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo";

/** What a `google.rpc.Status` (the `grpc-status-details-bin` trailer) carries that the client uses. */
export interface StatusDetails {
  violations: FieldViolation[];
  retryDelayMs?: number;
}

/**
 * Decodes a `google.rpc.Status`: `code` (1), `message` (2) and `details` (3,
 * `google.protobuf.Any`: type_url 1, value 2); of the details, BadRequest's
 * field violations (1: field 1, description 2) and RetryInfo's delay (1:
 * Duration seconds 1, nanos 2). Unknown fields and detail types are skipped.
 */
export function decodeStatusDetails(bytes: Uint8Array): StatusDetails {
  const result: StatusDetails = { violations: [] };
  const status = new BinaryReader(bytes);
  while (status.pos < status.len) {
    const [field, wireType] = status.tag();
    if (field !== 3) {
      status.skip(wireType);
      continue;
    }
    const any = new BinaryReader(status.bytes());
    let typeUrl = "";
    let value: Uint8Array = new Uint8Array();
    while (any.pos < any.len) {
      const [f, w] = any.tag();
      if (f === 1) typeUrl = any.string();
      else if (f === 2) value = any.bytes();
      else any.skip(w);
    }
    if (typeUrl === BAD_REQUEST) {
      const badRequest = new BinaryReader(value);
      while (badRequest.pos < badRequest.len) {
        const [f, w] = badRequest.tag();
        if (f !== 1) {
          badRequest.skip(w);
          continue;
        }
        const violation = new BinaryReader(badRequest.bytes());
        const parsed: FieldViolation = { field: "", description: "" };
        while (violation.pos < violation.len) {
          const [vf, vw] = violation.tag();
          if (vf === 1) parsed.field = violation.string();
          else if (vf === 2) parsed.description = violation.string();
          else violation.skip(vw);
        }
        result.violations.push(parsed);
      }
    } else if (typeUrl === RETRY_INFO) {
      const info = new BinaryReader(value);
      while (info.pos < info.len) {
        const [f, w] = info.tag();
        if (f !== 1) {
          info.skip(w);
          continue;
        }
        const duration = new BinaryReader(info.bytes());
        let seconds = 0;
        let nanos = 0;
        while (duration.pos < duration.len) {
          const [df, dw] = duration.tag();
          if (df === 1) seconds = Number(duration.int64());
          else if (df === 2) nanos = duration.int32();
          else duration.skip(dw);
        }
        result.retryDelayMs = seconds * 1000 + Math.round(nanos / 1e6);
      }
    }
  }
  return result;
}

function detailsOf(metadata: Metadata | undefined): StatusDetails {
  const result: StatusDetails = { violations: [] };
  for (const value of metadata?.get("grpc-status-details-bin") ?? []) {
    if (typeof value === "string") continue;
    try {
      const decoded = decodeStatusDetails(value);
      result.violations.push(...decoded.violations);
      result.retryDelayMs ??= decoded.retryDelayMs;
    } catch {
      // Details that do not decode add nothing; the status code and message remain.
    }
  }
  return result;
}

/**
 * How @grpc/grpc-js (Node's TLS) describes a failed TLS handshake: an
 * untrusted or misnamed server certificate, or a client certificate the
 * server refused (its TLS alert).
 */
const TLS_FAILURE = /certificate|handshake|ssl|tls|alert|self[- ]signed|ERR_TLS|altnames/i;

function isServiceError(error: unknown): error is ServiceError {
  return error instanceof Error && typeof (error as Partial<ServiceError>).code === "number" && "metadata" in error;
}

/** The typed error of a failed call (anything else is returned unchanged). */
export function fromServiceError(error: unknown): unknown {
  if (error instanceof OutboxError || !isServiceError(error)) return error;
  const details = error.details ?? error.message;
  if (error.code === Status.UNAVAILABLE && TLS_FAILURE.test(details)) {
    return new TlsError(
      "TLS with outboxd failed: the client does not trust outboxd's certificate, " +
        `or outboxd refused the client certificate (${details})`,
      { code: Status.UNAVAILABLE },
    );
  }
  const { violations, retryDelayMs } = detailsOf(error.metadata);
  return errorFor(error.code, details, violations, retryDelayMs);
}
