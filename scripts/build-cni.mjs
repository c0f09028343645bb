#!/usr/bin/env node
// Build the CNI plugin for hosts without Node.js (README "CNI plugin"):
//   1. esbuild bundles dist/agent/cni/main.js (tsc output; `npm run build` first) and everything it
//      imports into ONE CommonJS script, dist/cni/weftnet-cni.cjs (Node 20's SEA runs a single CJS file);
//   2. `node --experimental-sea-config` turns it into a blob;
//   3. a copy of this node binary gets the blob injected with postject -> dist/cni/weftnet-cni.
// Options: --bundle-only (skip 2-3); --out DIR (default dist/cni; the e2e test builds into its own
// temp dir). Files appear by rename, so a concurrent run never sees a half-injected executable.
// Prints sizes and times. Exit 1 with the failing step's output.
import { execFileSync } from "node:child_process";
import { chmodSync, copyFileSync, mkdirSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const entry = join(root, "dist/agent/cni/main.js");
const outArg = process.argv.indexOf("--out");
const out = outArg > 0 && process.argv[outArg + 1] ? resolve(process.argv[outArg + 1]) : join(root, "dist/cni");
const tmp = `.tmp-${process.pid}`;
const bundle = join(out, "weftnet-cni.cjs");
const blob = join(out, `weftnet-cni.blob${tmp}`);
const exe = join(out, "weftnet-cni");
const mb = (p) => `${(statSync(p).size / 1048576).toFixed(1)} MiB`;
const t0 = Date.now();

mkdirSync(out, { recursive: true });
try {
  statSync(entry);
} catch {
  console.error(`build-cni: ${entry} is missing: run \`npm run build\` first (npm run build:cni does)`);
  process.exit(1);
}

await build({
  entryPoints: [entry],
  outfile: bundle + tmp,
  bundle: true,
  platform: "node",
  target: "node20",
  format: "cjs",
  minify: false,
  legalComments: "none",
  logLevel: "warning",
});
renameSync(bundle + tmp, bundle);
console.log(`build-cni: bundle ${bundle} (${mb(bundle)}) in ${Date.now() - t0} ms`);
if (process.argv.includes("--bundle-only")) process.exit(0);

const t1 = Date.now();
const seaConfig = join(out, `sea-config.json${tmp}`);
writeFileSync(seaConfig, JSON.stringify({ main: bundle, output: blob, disableExperimentalSEAWarning: true, useCodeCache: false }, null, 2) + "\n");
const run = (file, args) => {
  try {
    execFileSync(file, args, { stdio: ["ignore", "pipe", "pipe"], cwd: root });
  } catch (e) {
    console.error(`build-cni: \`${[file, ...args].join(" ")}\` failed:\n${e.stderr ?? ""}${e.stdout ?? ""}`);
    for (const f of [exe + tmp, blob, seaConfig]) rmSync(f, { force: true });
    process.exit(1);
  }
};
run(process.execPath, ["--experimental-sea-config", seaConfig]);
copyFileSync(process.execPath, exe + tmp);
chmodSync(exe + tmp, 0o755);
// The sentinel fuse is the documented one for Node's SEA (single-executable-applications.md).
run(process.execPath, [join(root, "node_modules/postject/dist/cli.js"), exe + tmp, "NODE_SEA_BLOB", blob, "--sentinel-fuse", "NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2"]);
renameSync(exe + tmp, exe);
rmSync(blob, { force: true });
rmSync(seaConfig, { force: true });
console.log(`build-cni: executable ${exe} (${mb(exe)}, node ${process.version}) in ${Date.now() - t1} ms`);
