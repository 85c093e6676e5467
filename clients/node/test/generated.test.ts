// The checked-in generated files come from the repository's protos, and the
// check fails when a proto changes without regenerating them.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { CLIENT_DIR, REPO } from "./harness";

function check(protoDir: string) {
  return spawnSync(process.execPath, [join(CLIENT_DIR, "scripts/generate.mjs"), "--check", "--proto-dir", protoDir], {
    encoding: "utf8",
  });
}

test("the checked-in generated files are current", () => {
  const result = check(join(REPO, "proto"));
  assert.equal(result.status, 0, result.stderr);
});

test("a stale generated file fails the check", () => {
  const dir = mkdtempSync(join(tmpdir(), "outboxd-node-stale-"));
  try {
    const protos = join(dir, "proto");
    cpSync(join(REPO, "proto"), protos, { recursive: true });
    const outbox = join(protos, "outboxd/v1/outbox.proto");
    const text = readFileSync(outbox, "utf8");
    const changed = text.replace("message Header {\n", "message Header {\n  string note = 99;\n");
    assert.notEqual(changed, text);
    writeFileSync(outbox, changed);

    const result = check(protos);
    assert.equal(result.status, 1, result.stdout + result.stderr);
    assert.match(result.stderr, /stale/);
    assert.match(result.stderr, /differs: outboxd\/v1\/outbox\.ts/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
