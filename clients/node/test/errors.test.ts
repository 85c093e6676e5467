// Decoding outboxd's error details (google.rpc.Status in the
// grpc-status-details-bin trailer) into typed errors, without a server.
import assert from "node:assert/strict";
import { test } from "node:test";
import { BinaryWriter } from "@bufbuild/protobuf/wire";
import { Metadata, status as Status } from "@grpc/grpc-js";
import { InvalidEvent, OutboxError, ResourceExhausted, TlsError, Unavailable, decodeStatusDetails, fromServiceError } from "../src";

function any(typeUrl: string, value: Uint8Array): Uint8Array {
  return new BinaryWriter().uint32(10).string(typeUrl).uint32(18).bytes(value).finish();
}

function badRequest(violations: [string, string][]): Uint8Array {
  const writer = new BinaryWriter();
  for (const [field, description] of violations) {
    writer.uint32(10).bytes(new BinaryWriter().uint32(10).string(field).uint32(18).string(description).finish());
  }
  return writer.finish();
}

function retryInfo(seconds: number, nanos: number): Uint8Array {
  const duration = new BinaryWriter().uint32(8).int64(seconds).uint32(16).int32(nanos).finish();
  return new BinaryWriter().uint32(10).bytes(duration).finish();
}

function status(code: number, message: string, details: Uint8Array[]): Buffer {
  const writer = new BinaryWriter().uint32(8).int32(code).uint32(18).string(message);
  for (const detail of details) writer.uint32(26).bytes(detail);
  return Buffer.from(writer.finish());
}

function serviceError(code: Status, details: string, trailer?: Buffer) {
  const metadata = new Metadata();
  if (trailer) metadata.set("grpc-status-details-bin", trailer);
  return Object.assign(new Error(`${code} ${Status[code]}: ${details}`), { code, details, metadata });
}

test("field violations of a BadRequest become an InvalidEvent's violations", () => {
  const trailer = status(3, "2 fields at fault", [
    any("type.googleapis.com/google.rpc.DebugInfo", new Uint8Array([10, 1, 65])),
    any("type.googleapis.com/google.rpc.BadRequest", badRequest([["events[3].topic", "not a Kafka topic name"], ["events[0].aggregate_id", "holds a NUL"]])),
  ]);
  assert.deepEqual(decodeStatusDetails(trailer).violations, [
    { field: "events[3].topic", description: "not a Kafka topic name" },
    { field: "events[0].aggregate_id", description: "holds a NUL" },
  ]);
  const error = fromServiceError(serviceError(Status.INVALID_ARGUMENT, "2 fields at fault", trailer));
  assert.ok(error instanceof InvalidEvent);
  assert.ok(error instanceof OutboxError);
  assert.deepEqual(error.fields, ["events[3].topic", "events[0].aggregate_id"]);
  assert.equal(error.codeName, "INVALID_ARGUMENT");
  assert.equal(error.details, "2 fields at fault");
});

test("a RetryInfo delay becomes retryDelayMs", () => {
  const trailer = status(8, "over the rate", [any("type.googleapis.com/google.rpc.RetryInfo", retryInfo(1, 250_000_000))]);
  const error = fromServiceError(serviceError(Status.RESOURCE_EXHAUSTED, "over the rate", trailer));
  assert.ok(error instanceof ResourceExhausted);
  assert.equal(error.retryDelayMs, 1250);
});

test("details that do not decode leave the code and message", () => {
  const error = fromServiceError(serviceError(Status.INVALID_ARGUMENT, "bad", Buffer.from([0xff, 0xff, 0xff])));
  assert.ok(error instanceof InvalidEvent);
  assert.deepEqual(error.violations, []);
});

test("UNAVAILABLE at the TLS layer is a TlsError, otherwise Unavailable", () => {
  const tls = fromServiceError(serviceError(Status.UNAVAILABLE, "No connection established. Last error: Error: self-signed certificate in certificate chain"));
  assert.ok(tls instanceof TlsError);
  assert.ok(tls instanceof Unavailable);
  const plain = fromServiceError(serviceError(Status.UNAVAILABLE, "No connection established. Last error: connect ECONNREFUSED 127.0.0.1:1"));
  assert.ok(plain instanceof Unavailable && !(plain instanceof TlsError));
  const other = new Error("not a gRPC error");
  assert.equal(fromServiceError(other), other);
});
