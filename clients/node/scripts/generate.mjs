#!/usr/bin/env node
// Generates the TypeScript types and gRPC client of outboxd from the
// repository's protos into src/gen/, with ts-proto run by buf (both npm
// packages pinned in package-lock.json: no system protoc is needed).
//
//   node scripts/generate.mjs            rewrites src/gen/
//   node scripts/generate.mjs --check    fails (exit 1) when src/gen/ is stale
//
// --proto-dir DIR and --out DIR point it elsewhere (the stale-file test uses them).
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, copyFileSync, unlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const CLIENT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const REPO = resolve(CLIENT, "../..");

// ts-proto's options: the @grpc/grpc-js client, bigint for 64-bit integers
// (xids and system identifiers do not fit a double), Date for timestamps,
// Buffer for bytes, optional keys for message fields.
export const TS_PROTO_OPTIONS = [
  "outputServices=grpc-js",
  "esModuleInterop=true",
  "forceLong=bigint",
  "useDate=true",
  "env=node",
  "useOptionals=messages",
];

function parseArgs(argv) {
  const options = { check: false, protoDir: join(REPO, "proto"), out: join(CLIENT, "src/gen") };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--check") options.check = true;
    else if (arg === "--proto-dir") options.protoDir = resolve(argv[++i]);
    else if (arg === "--out") options.out = resolve(argv[++i]);
    else {
      console.error(`unknown argument: ${arg}\nusage: generate.mjs [--check] [--proto-dir DIR] [--out DIR]`);
      process.exit(2);
    }
  }
  return options;
}

function tool(name) {
  const path = join(CLIENT, "node_modules/.bin", name);
  if (!existsSync(path)) {
    console.error(`${name} not found under node_modules/.bin: run npm ci in clients/node first`);
    process.exit(2);
  }
  return path;
}

/** Runs buf generate with the ts-proto plugin into `out`. */
function generate(protoDir, out) {
  const template = {
    version: "v2",
    plugins: [{ local: tool("protoc-gen-ts_proto"), out, opt: TS_PROTO_OPTIONS }],
  };
  const result = spawnSync(tool("buf"), ["generate", protoDir, "--template", JSON.stringify(template)], {
    cwd: CLIENT,
    encoding: "utf8",
    env: { ...process.env, BUF_CACHE_DIR: join(tmpdir(), "outboxd-node-buf-cache") },
  });
  if (result.status !== 0) {
    console.error(`buf generate failed (${result.status ?? result.signal}):\n${result.stdout}${result.stderr}`);
    process.exit(2);
  }
}

/** Every file under `root`, by its path relative to `root`. */
function files(root) {
  const found = new Map();
  const walk = (dir) => {
    if (!existsSync(dir)) return;
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) walk(path);
      else found.set(relative(root, path), path);
    }
  };
  walk(root);
  return found;
}

function firstDifference(have, want) {
  const a = have.split("\n");
  const b = want.split("\n");
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    if (a[i] !== b[i]) {
      return `    line ${i + 1}:\n    - ${a[i] ?? "(end of file)"}\n    + ${b[i] ?? "(end of file)"}`;
    }
  }
  return "";
}

function check(fresh, out) {
  const want = files(fresh);
  const have = files(out);
  const stale = [];
  for (const name of [...new Set([...want.keys(), ...have.keys()])].sort()) {
    if (!have.has(name)) stale.push(`missing: ${name}`);
    else if (!want.has(name)) stale.push(`not generated from any proto: ${name}`);
    else {
      const a = readFileSync(have.get(name), "utf8");
      const b = readFileSync(want.get(name), "utf8");
      if (a !== b) stale.push(`differs: ${name}\n${firstDifference(a, b)}`);
    }
  }
  if (stale.length > 0) {
    console.error("The generated files are stale; run `npm run generate` in clients/node:");
    for (const line of stale) console.error(`  ${line}`);
    return 1;
  }
  console.log(`generated files are current (${want.size} files)`);
  return 0;
}

const options = parseArgs(process.argv.slice(2));
const fresh = mkdtempSync(join(tmpdir(), "outboxd-node-gen-"));
try {
  generate(options.protoDir, fresh);
  if (options.check) {
    process.exitCode = check(fresh, options.out);
  } else {
    const generated = files(fresh);
    for (const [name, path] of files(options.out)) {
      if (!generated.has(name)) unlinkSync(path);
    }
    for (const [name, path] of generated) {
      const target = join(options.out, name);
      mkdirSync(dirname(target), { recursive: true });
      copyFileSync(path, target);
      console.log(`wrote ${relative(CLIENT, target)}`);
    }
  }
} finally {
  rmSync(fresh, { recursive: true, force: true });
}
