#!/usr/bin/env node
// `npm test`: the README's one test command. It sets up what it needs, then runs the suites.
//
//   1. checks the system tools the suites that will run need (TOOLS below: the tool, its Debian package,
//      why, and which test files use it — a tool whose test files are absent is not needed);
//   2. as root with apt-get: `apt-get update`, then installs the missing packages, printing what and why;
//      as root without apt-get (or with --no-install): stops at once with the exact install line;
//      without root: the root-only e2e suite is skipped (said plainly, with the reason), and a tool the
//      unprivileged suites need stops the run with the exact `sudo apt-get install` line;
//   3. runs build, unit + property, integration, e2e (one after the other; see vitest.config.ts) and
//      prints a summary with each suite's wall time. Exit 0 only if every suite that ran passed.
//
// Options: --plan (print the plan as JSON and exit; nothing installed or run), --setup-only (install,
// run nothing), --no-install, --bench (also the benchmarks' tools: iperf3, ...).
// `.ci/run` calls `npm test` too. The pure part (plan) is unit-tested in test/unit/test-setup.test.ts;
// test/integration/test-setup.test.ts runs this script as another user and with a reduced PATH.
import { spawnSync } from "node:child_process";
import { accessSync, constants, existsSync, openSync, readSync, closeSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

/** Suites in the order they run. `root`: skipped without root. */
export const SUITES = [
  { name: "build", script: "build", root: false, what: "tsc" },
  { name: "unit", script: "test:unit", root: false, what: "test/unit test/property" },
  { name: "integration", script: "test:integration", root: false, what: "test/integration" },
  { name: "e2e", script: "test:e2e", root: true, what: "test/e2e", rootWhy: "network namespaces, TUN devices, iptables, a containerd" },
];

/**
 * What the suites run on the host. `suite`: the suite (or "bench") that needs it; `usedBy`: the files
 * that use it (the tool is needed when one of them exists); `check`: "static-elf" = the binary must be
 * statically linked (it is copied into a container's rootfs), "lib" = a shared library (not on PATH).
 */
export const TOOLS = [
  { tool: "ip", pkg: "iproute2", suite: "e2e", why: "namespaces, veth pairs, bridges, routes", usedBy: ["test/e2e/mesh-lab.ts", "test/e2e/tun-lab.ts"] },
  { tool: "bridge", pkg: "iproute2", suite: "e2e", why: "bridge and VXLAN forwarding entries", usedBy: ["test/e2e/netconf.test.ts", "test/e2e/nat-lab.ts"] },
  { tool: "nsenter", pkg: "util-linux", suite: "e2e", why: "runs agents inside namespaces", usedBy: ["test/helpers/netns.ts"] },
  { tool: "setpriv", pkg: "util-linux", suite: "e2e", why: "children die with the test (--pdeathsig)", usedBy: ["test/helpers/netns.ts"] },
  { tool: "sysctl", pkg: "procps", suite: "e2e", why: "ip_forward in the NAT lab's routers", usedBy: ["test/e2e/nat-lab.ts"] },
  { tool: "iptables", pkg: "iptables", suite: "e2e", why: "NAT lab, blocked paths, the WEFTNET-FWD chain", usedBy: ["test/e2e/mesh-lab.ts", "test/e2e/nat-lab.ts", "test/e2e/pod.test.ts"] },
  { tool: "ping", pkg: "iputils-ping", suite: "e2e", why: "pod-to-pod reachability", usedBy: ["test/e2e/tun.test.ts", "test/e2e/dataplane.test.ts", "test/e2e/cni.test.ts"] },
  { tool: "conntrack", pkg: "conntrack", suite: "e2e", why: "flushes NAT state mid-transfer", usedBy: ["test/e2e/nat.test.ts"] },
  { tool: "turnserver", pkg: "coturn", suite: "e2e", why: "the TURN cases", usedBy: ["test/e2e/nat.test.ts"] },
  { tool: "containerd", pkg: "containerd", suite: "e2e", why: "a real container runtime calls the CNI plugin", usedBy: ["test/e2e/cni-containerd.test.ts"] },
  { tool: "ctr", pkg: "containerd", suite: "e2e", why: "`ctr run --cni`", usedBy: ["test/e2e/cni-containerd.test.ts"] },
  { tool: "runc", pkg: "runc", suite: "e2e", why: "containerd's OCI runtime", usedBy: ["test/e2e/cni-containerd.test.ts"] },
  { tool: "unshare", pkg: "util-linux", suite: "e2e", why: "a private mount namespace for ctr's fixed CNI dirs", usedBy: ["test/e2e/cni-containerd.test.ts"] },
  { tool: "mount", pkg: "mount", suite: "e2e", why: "overlays /etc and /opt inside that namespace", usedBy: ["test/e2e/cni-containerd.test.ts"] },
  { tool: "busybox", pkg: "busybox-static", suite: "e2e", check: "static-elf", why: "the container's rootfs (a static busybox)", usedBy: ["test/e2e/cni-containerd.test.ts"] },
  { tool: "ebtables", pkg: "ebtables", suite: "e2e", why: "the per-pod source filter on the host veth", usedBy: ["test/e2e/antispoof.test.ts"] },
  { tool: "libsodium.so.23", pkg: "libsodium23", suite: "integration", check: "lib", why: "the bulk link's AES-256-GCM through FFI (interop check)", usedBy: ["test/integration/bulk-crypto.test.ts", "agent/os/sodium.ts"] },
  { tool: "promtool", pkg: "prometheus", suite: "integration", why: "`promtool check metrics` lints the exposition", usedBy: ["test/integration/metrics.test.ts"] },
  { tool: "chromium", pkg: "chromium", suite: "integration", why: "the topology page in a real browser", usedBy: ["test/integration/ui.test.ts", "test/integration/ui-browser.test.ts", "test/integration/ui-signal.test.ts", "test/e2e/ui.test.ts"] },
  { tool: "iperf3", pkg: "iperf3", suite: "e2e", why: "TCP through the bulk link", usedBy: ["test/e2e/bulk.test.ts"] },
  { tool: "iperf3", pkg: "iperf3", suite: "bench", why: "pod-to-pod TCP throughput", usedBy: ["test/bench/datapath.ts", "test/bench/nat.ts", "examples/netns-demo.sh"] },
  { tool: "wireguard-go", pkg: "wireguard-go", suite: "bench", why: "the WireGuard baseline of the loss sweep", usedBy: ["test/bench/loss.ts"] },
  { tool: "wg", pkg: "wireguard-tools", suite: "bench", why: "configures the wireguard-go baseline", usedBy: ["test/bench/loss.ts"] },
];

/**
 * Decide what to do. Pure: every fact about the machine comes in `env`.
 * env: { root: boolean, apt: boolean, has(tool) => boolean, exists(file) => boolean, noInstall?, bench? }
 * Returns { suites: [{name, run, why?}], needed: [{tool, pkg, why, usedBy}], missing: [...same],
 *   packages: string[], action: "run" | "install" | "stop", line?: string, message?: string }
 */
export function plan(env, tools = TOOLS, suites = SUITES) {
  const ran = suites.map((s) =>
    s.root && !env.root ? { name: s.name, run: false, why: `needs root (${s.rootWhy}); run \`sudo npm test\` for it` } : { name: s.name, run: true },
  );
  const running = new Set(ran.filter((s) => s.run).map((s) => s.name));
  if (env.bench) running.add("bench");
  const needed = tools
    .filter((t) => running.has(t.suite))
    .map((t) => ({ ...t, usedBy: t.usedBy.filter((f) => env.exists(f)) }))
    .filter((t) => t.usedBy.length > 0);
  const missing = needed.filter((t) => !env.has(t));
  const packages = [...new Set(missing.map((t) => t.pkg))];
  const base = { suites: ran, needed, missing, packages };
  if (packages.length === 0) return { ...base, action: "run" };
  if (env.root && env.apt && !env.noInstall) return { ...base, action: "install" };
  const sudo = env.root ? "" : "sudo ";
  const line = `${sudo}apt-get update && ${sudo}apt-get install -y --no-install-recommends ${packages.join(" ")}`;
  const why = env.root ? (env.noInstall ? "--no-install was given" : "apt-get is not available") : "not root, so nothing is installed";
  return { ...base, action: "stop", line, message: `missing ${missing.map((t) => t.tool).join(", ")} (${why}). Install with:\n  ${line}` };
}

/** One line per package: what is installed and why (tool: reason — files). */
export function describeMissing(missing) {
  const byPkg = new Map();
  for (const t of missing) byPkg.set(t.pkg, [...(byPkg.get(t.pkg) ?? []), t]);
  return [...byPkg].map(([pkg, ts]) => `${pkg}: ${ts.map((t) => `${t.tool} (${t.why}; ${t.usedBy.join(", ")})`).join("; ")}`);
}

/** The first executable `name` on PATH, or undefined (what `command -v` does). */
export function which(name, path = process.env.PATH ?? "") {
  for (const dir of path.split(delimiter)) {
    if (!dir) continue;
    const p = join(dir, name);
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      /* next */
    }
  }
  return undefined;
}

/** True when `file` is an ELF executable without a PT_INTERP header (statically linked). */
export function isStaticElf(file) {
  let fd;
  try {
    fd = openSync(file, "r");
    const h = Buffer.alloc(64);
    if (readSync(fd, h, 0, 64, 0) < 64 || h.readUInt32BE(0) !== 0x7f454c46 || h[4] !== 2 || h[5] !== 1) return false; // 64-bit LE only
    const phoff = Number(h.readBigUInt64LE(32));
    const phentsize = h.readUInt16LE(54);
    const phnum = h.readUInt16LE(56);
    const ph = Buffer.alloc(phentsize * phnum);
    readSync(fd, ph, 0, ph.length, phoff);
    for (let i = 0; i < phnum; i++) if (ph.readUInt32LE(i * phentsize) === 3 /* PT_INTERP */) return false;
    return true;
  } catch {
    return false;
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

const LIB_DIRS = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"];

/** Is this TOOLS entry present on this machine? */
export function hasTool(t) {
  if (t.check === "lib") return LIB_DIRS.some((d) => existsSync(join(d, t.tool)));
  const p = which(t.tool);
  if (!p) return false;
  return t.check === "static-elf" ? isStaticElf(p) : true;
}

function main(argv) {
  const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
  const flag = (f) => argv.includes(f);
  const isRoot = typeof process.getuid === "function" && process.getuid() === 0;
  const env = {
    root: isRoot,
    apt: which("apt-get") !== undefined,
    has: hasTool,
    exists: (f) => existsSync(join(root, f)),
    noInstall: flag("--no-install"),
    bench: flag("--bench"),
  };
  let p = plan(env);
  if (flag("--plan")) {
    console.log(JSON.stringify({ ...p, needed: p.needed.map((t) => t.tool), missing: p.missing.map((t) => t.tool) }, null, 2));
    return 0;
  }
  const log = (s) => console.log(`test-setup: ${s}`);
  for (const s of p.suites) if (!s.run) log(`SKIPPING the ${s.name} suite: ${s.why}`);
  if (p.action === "stop") {
    console.error(`test-setup: cannot run the tests: ${p.message}`);
    return 2;
  }
  if (p.action === "install") {
    log(`installing ${p.packages.join(" ")} with apt-get, because:`);
    for (const l of describeMissing(p.missing)) log(`  ${l}`);
    const aptEnv = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
    for (const args of [["update", "-q"], ["install", "-y", "-q", "--no-install-recommends", ...p.packages]]) {
      log(`apt-get ${args.join(" ")}`);
      const r = spawnSync("apt-get", args, { stdio: "inherit", env: aptEnv });
      if (r.status !== 0) {
        console.error(`test-setup: \`apt-get ${args.join(" ")}\` failed (exit ${r.status ?? r.signal}); install by hand:\n  apt-get update && apt-get install -y --no-install-recommends ${p.packages.join(" ")}`);
        return 2;
      }
    }
    p = plan(env);
    if (p.missing.length > 0) {
      console.error(`test-setup: still missing after apt-get: ${p.missing.map((t) => `${t.tool} (${t.pkg})`).join(", ")}`);
      return 2;
    }
  } else {
    log(`system tools present: ${p.needed.map((t) => t.tool).join(" ") || "(none needed)"}`);
  }
  if (flag("--setup-only")) return 0;
  if (!existsSync(join(root, "node_modules", ".bin", "vitest"))) {
    console.error("test-setup: node_modules is missing: run `npm ci` first");
    return 2;
  }

  // npm_execpath is npm's own CLI when run through `npm test`; otherwise use npm from PATH.
  const npm = process.env.npm_execpath ? [process.execPath, process.env.npm_execpath] : ["npm"];
  const results = [];
  const reportDir = mkdtempSync(join(tmpdir(), "weftnet-test-"));
  const t0 = Date.now();
  for (const s of SUITES) {
    const planned = p.suites.find((x) => x.name === s.name);
    if (!planned?.run) {
      results.push({ name: s.name, status: "skipped", why: planned?.why });
      continue;
    }
    log(`--- ${s.name} (${s.what})`);
    const t = Date.now();
    // vitest suites also write a JSON report, so the summary (the last lines a CI log keeps) names what failed
    const report = s.name === "build" ? undefined : join(reportDir, `${s.name}.json`);
    const extra = report ? ["--", "--reporter=default", "--reporter=json", `--outputFile.json=${report}`] : [];
    const r = spawnSync(npm[0], [...npm.slice(1), "run", "--silent", s.script, ...extra], { cwd: root, stdio: "inherit" });
    results.push({ name: s.name, status: r.status === 0 ? "passed" : "FAILED", secs: (Date.now() - t) / 1000, failures: r.status === 0 || !report ? [] : failuresIn(report) });
    if (r.status !== 0 && s.name === "build") break;
  }
  rmSync(reportDir, { recursive: true, force: true });
  log(`summary (${((Date.now() - t0) / 1000).toFixed(0)} s):`);
  for (const r of results) {
    log(`  ${r.name.padEnd(12)} ${r.status}${r.secs !== undefined ? ` in ${r.secs.toFixed(0)} s` : ""}${r.why ? ` — ${r.why}` : ""}`);
    for (const f of r.failures ?? []) log(`    ✗ ${f}`);
  }
  return results.every((r) => r.status !== "FAILED") && results.length === SUITES.length ? 0 : 1;
}

/** The failed tests of a vitest JSON report, one line each (file > test: first line of the error). */
export function failuresIn(reportPath) {
  let report;
  try {
    report = JSON.parse(readFileSync(reportPath, "utf8"));
  } catch {
    return ["(no test report was written: see the output above)"];
  }
  const out = [];
  for (const file of report.testResults ?? []) {
    const name = relativeTo(file.name);
    const failed = (file.assertionResults ?? []).filter((a) => a.status === "failed");
    for (const a of failed) out.push(`${name} > ${a.fullName}: ${firstLine(a.failureMessages?.[0])}`);
    if (failed.length === 0 && file.status === "failed") out.push(`${name}: ${firstLine(file.message)}`);
  }
  return out.length > 0 ? out : ["(the suite failed but no test did: see the output above)"];
}

function relativeTo(path) {
  const root = dirname(dirname(fileURLToPath(import.meta.url)));
  return typeof path === "string" && path.startsWith(root + "/") ? path.slice(root.length + 1) : String(path);
}

function firstLine(msg) {
  const line = String(msg ?? "").replace(/\x1b\[[0-9;]*m/g, "").split("\n").find((l) => l.trim()) ?? "";
  return line.length > 300 ? line.slice(0, 300) + "…" : line;
}

if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) process.exitCode = main(process.argv.slice(2));
