/**
 * The signaling server on each runtime it ships for, behind one interface, so one suite
 * (test/integration/signaling-suite.ts) checks them all: Node (in process, signaling/server.ts),
 * workerd (examples/cloudflare, bundled with esbuild, a Durable Object with hibernatable WebSockets),
 * Deno (examples/deno) and Bun (examples/bun). The workerd, deno and bun binaries come from their npm
 * packages; a runtime whose binary is missing or does not start is reported as skipped with the reason.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { copyFileSync, existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import type { HubStats, SignalLimits } from "../../signaling/core/hub.js";
import { startSignalServer, type SignalServer } from "../../signaling/server.js";
import { SIGNAL_PATH } from "../../src/wire/signal.js";

export interface TargetOptions {
  token: string;
  helloTimeoutMs?: number;
  probeTimeoutMs?: number;
  /** Node only: keepalive ping interval */
  pingIntervalMs?: number;
  relay?: { enabled?: boolean; rateBytesPerSec?: number };
  limits?: Partial<SignalLimits>;
  /** Node only */
  stunPort?: number | "ephemeral";
  listen?: { host: string; port: number };
}

export interface SignalTarget {
  readonly runtime: string;
  /** ws://host:port */
  readonly url: string;
  readonly signalUrl: string;
  readonly port: number;
  stats(): Promise<HubStats & Record<string, unknown>>;
  close(): Promise<void>;
  /** the in-process server (Node only) */
  readonly node?: SignalServer;
  /** the child process (workerd, deno, bun) */
  readonly proc?: ChildProcess;
}

export interface Runtime {
  name: "node" | "workerd" | "deno" | "bun";
  /** what this adapter can do; tests of other features are skipped with the reason */
  caps: {
    /** UDP STUN responder */
    stun: boolean;
    /** server-side keepalive with a configurable sub-second interval */
    fastPing: boolean;
    /** liveness probe of a duplicate id's holder (ping/pong) */
    probe: boolean;
    /** frames above the payload cap close the connection with 1009 */
    payloadCap: boolean;
  };
  /** undefined when it can run here, else why not */
  unavailable(): string | undefined;
  start(opts: TargetOptions): Promise<SignalTarget>;
}

/** the repository root (this file runs from test/helpers or dist/test/helpers) */
const ROOT = (() => {
  let r = resolve(import.meta.dirname, "../..");
  while (!existsSync(join(r, "package.json")) && r !== "/") r = resolve(r, "..");
  return r;
})();
const BIN = (name: string) => join(ROOT, "node_modules", ".bin", name);

/**
 * The runtime's native binary from its platform package. The packages' own bin entries are launchers
 * (a node script for workerd and deno, a stub for bun until its install script ran) that run the
 * binary as a child: killing the launcher would leave the server running.
 */
function nativeBin(name: "workerd" | "deno" | "bun"): string {
  const arch = process.arch === "arm64" ? "arm64" : "64";
  const candidates: Record<typeof name, string[]> = {
    workerd: [`@cloudflare/workerd-${process.platform}-${arch}/bin/workerd`],
    deno: [`@deno/${process.platform}-${process.arch}-glibc/deno`, `@deno/${process.platform}-${process.arch}/deno`],
    bun: [`@oven/bun-${process.platform}-${process.arch === "arm64" ? "aarch64" : "x64"}/bin/bun`],
  };
  for (const c of candidates[name]) {
    const p = join(ROOT, "node_modules", c);
    if (existsSync(p)) return p;
  }
  return BIN(name);
}

export async function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once("error", rej);
    s.listen(0, "127.0.0.1", () => {
      const p = (s.address() as { port: number }).port;
      s.close(() => res(p));
    });
  });
}

async function statsOf(url: string, token: string): Promise<HubStats & Record<string, unknown>> {
  const res = await fetch(url.replace(/^ws/, "http") + "/v1/stats", { headers: { Authorization: `Bearer ${token}` } });
  if (res.status !== 200) throw new Error(`GET /v1/stats: ${res.status} ${await res.text()}`);
  return (await res.json()) as HubStats & Record<string, unknown>;
}

export const nodeRuntime: Runtime = {
  name: "node",
  caps: { stun: true, fastPing: true, probe: true, payloadCap: true },
  unavailable: () => undefined,
  async start(o) {
    const server = await startSignalServer({
      listen: o.listen ?? { host: "127.0.0.1", port: 0 },
      token: o.token,
      ...(o.helloTimeoutMs !== undefined ? { helloTimeoutMs: o.helloTimeoutMs } : {}),
      ...(o.probeTimeoutMs !== undefined ? { probeTimeoutMs: o.probeTimeoutMs } : {}),
      ...(o.pingIntervalMs !== undefined ? { pingIntervalMs: o.pingIntervalMs } : {}),
      ...(o.relay ? { relay: o.relay } : {}),
      ...(o.limits ? { limits: o.limits } : {}),
      ...(o.stunPort !== undefined ? { stunPort: o.stunPort } : {}),
    });
    return { runtime: "node", url: server.url, signalUrl: server.signalUrl, port: server.port, node: server, stats: () => statsOf(server.url, o.token), close: () => server.close() };
  },
};

/** Environment for the env-configured entry points (signaling/core/config.ts). */
function envFor(o: TargetOptions): Record<string, string> {
  const e: Record<string, string> = { WEFTNET_TOKEN: o.token, WEFTNET_ALLOW_WEAK_TOKEN: "1" };
  if (o.helloTimeoutMs !== undefined) e.WEFTNET_HELLO_TIMEOUT_MS = String(o.helloTimeoutMs);
  if (o.probeTimeoutMs !== undefined) e.WEFTNET_PROBE_TIMEOUT_MS = String(o.probeTimeoutMs);
  if (o.relay?.enabled === false) e.WEFTNET_RELAY = "off";
  if (o.relay?.rateBytesPerSec !== undefined) e.WEFTNET_RELAY_RATE = String(o.relay.rateBytesPerSec);
  const l = o.limits ?? {};
  const names: Record<keyof SignalLimits, string> = {
    maxSessions: "WEFTNET_MAX_SESSIONS",
    maxSessionsPerIp: "WEFTNET_MAX_SESSIONS_PER_IP",
    maxBufferedBytes: "WEFTNET_MAX_BUFFERED",
    relayMaxBufferedBytes: "WEFTNET_RELAY_MAX_BUFFERED",
    relayRatePerIp: "WEFTNET_RELAY_RATE_PER_IP",
    relayRateGlobal: "WEFTNET_RELAY_RATE_GLOBAL",
    relayControlRate: "WEFTNET_RELAY_CONTROL_RATE",
    relayControlRateGlobal: "WEFTNET_RELAY_CONTROL_RATE_GLOBAL",
  };
  for (const [k, v] of Object.entries(l)) if (v !== undefined) e[names[k as keyof SignalLimits]] = String(v);
  return e;
}

async function waitHealthy(url: string, proc: ChildProcess, log: () => string, timeoutMs = 20_000): Promise<void> {
  const t0 = Date.now();
  for (;;) {
    if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`exited (${proc.exitCode ?? proc.signalCode}) before serving: ${log().slice(-2000)}`);
    try {
      const r = await fetch(url.replace(/^ws/, "http") + "/healthz");
      if (r.status === 200) return;
    } catch {
      /* not yet */
    }
    if (Date.now() - t0 > timeoutMs) throw new Error(`not serving after ${timeoutMs} ms: ${log().slice(-2000)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function stopProc(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return;
  const gone = new Promise<void>((r) => p.once("exit", () => r()));
  p.kill("SIGTERM");
  const t = setTimeout(() => p.kill("SIGKILL"), 3_000);
  await gone;
  clearTimeout(t);
}

/** Every child this module spawned and has not stopped yet: killed by stopAllTargets() and at exit. */
const live = new Set<ChildProcess>();
process.once("exit", () => {
  for (const p of live) p.kill("SIGKILL");
});

/**
 * Stop every runtime process still running, including ones whose start() finished after the test that
 * asked for them had given up (a suite's afterAll calls this).
 */
export async function stopAllTargets(): Promise<void> {
  await Promise.all([...live].map((p) => stopProc(p)));
}

function spawnTarget(runtime: string, cmd: string, args: string[], env: Record<string, string>, cwd: string, port: number, token: string, cleanup?: () => void): Promise<SignalTarget> {
  let out = "";
  const proc = spawn(cmd, args, { cwd, env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  live.add(proc);
  proc.once("exit", () => live.delete(proc));
  proc.on("error", (e) => (out += `spawn failed: ${e.message}`));
  proc.stdout!.on("data", (d) => (out += d));
  proc.stderr!.on("data", (d) => (out += d));
  const url = `ws://127.0.0.1:${port}`;
  const target: SignalTarget = {
    runtime,
    url,
    signalUrl: url + SIGNAL_PATH,
    port,
    proc,
    stats: () => statsOf(url, token),
    close: async () => {
      await stopProc(proc);
      cleanup?.();
    },
  };
  return waitHealthy(url, proc, () => out).then(
    () => target,
    async (e) => {
      await target.close();
      throw new Error(`${runtime}: ${(e as Error).message}`);
    },
  );
}

function probeBinary(bin: string, args: string[]): string | undefined {
  if (!existsSync(bin)) return `${bin} is missing (npm ci installs it from the npm package)`;
  const r = spawnSync(bin, args, { encoding: "utf8", timeout: 20_000 });
  if (r.error) return `${bin} does not run: ${r.error.message}`;
  if (r.status !== 0) return `${bin} ${args.join(" ")} exited ${r.status}: ${(r.stderr || r.stdout).slice(0, 300)}`;
  return undefined;
}

let workerBundle: string | undefined;
/** esbuild bundle of examples/cloudflare/worker.ts for workerd (what wrangler would upload). */
export function bundleWorker(): string {
  if (workerBundle !== undefined && existsSync(workerBundle)) return workerBundle;
  const dir = mkdtempSync(join(tmpdir(), "weftnet-worker-"));
  const out = join(dir, "worker.js");
  const r = spawnSync(BIN("esbuild"), [join(ROOT, "examples/cloudflare/worker.ts"), "--bundle", "--format=esm", "--platform=neutral", "--main-fields=browser,module,main", "--conditions=worker,browser", `--outfile=${out}`, "--log-level=warning"], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`esbuild failed: ${r.stderr}`);
  workerBundle = out;
  return out;
}

const capnpString = (s: string) => JSON.stringify(s);

export function workerdConfig(opts: { port: number; bundle: string; env: Record<string, string>; storageDir?: string; host?: string }): string {
  const bindings = [`(name = "SIGNAL_ROOM", durableObjectNamespace = "SignalRoom")`, ...Object.entries(opts.env).map(([k, v]) => `(name = ${capnpString(k)}, text = ${capnpString(v)})`)];
  return `using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [ (name = "main", worker = .w)${opts.storageDir ? `, (name = "do-disk", disk = (path = ${capnpString(opts.storageDir)}, writable = true))` : ""} ],
  sockets = [ (name = "http", address = "${opts.host ?? "127.0.0.1"}:${opts.port}", http = (), service = "main") ],
);
const w :Workerd.Worker = (
  modules = [ (name = "worker.js", esModule = embed ${capnpString(opts.bundle)}) ],
  compatibilityDate = "2026-11-01",
  durableObjectNamespaces = [ (className = "SignalRoom", uniqueKey = "weftnet-signal-room") ],
  durableObjectStorage = ${opts.storageDir ? `(localDisk = "do-disk")` : "(inMemory = void)"},
  bindings = [ ${bindings.join(", ")} ],
);
`;
}

export const workerdRuntime: Runtime = {
  name: "workerd",
  caps: { stun: false, fastPing: false, probe: false, payloadCap: false },
  unavailable: () => probeBinary(nativeBin("workerd"), ["--version"]),
  async start(o) {
    const bundle = bundleWorker();
    const port = o.listen?.port || (await freePort());
    const dir = mkdtempSync(join(tmpdir(), "weftnet-workerd-"));
    const cfg = join(dir, "config.capnp");
    copyFileSync(bundle, join(dir, "worker.js")); // embed paths are relative to the config file
    writeFileSync(cfg, workerdConfig({ port, bundle: "worker.js", env: envFor(o) }));
    return spawnTarget("workerd", nativeBin("workerd"), ["serve", cfg], {}, dir, port, o.token, () => rmSync(dir, { recursive: true, force: true }));
  },
};

/**
 * workerd serving the Workers build on host:port, for a caller that spawns it itself (in a lab network
 * namespace): the binary and its arguments; cleanup() removes the config dir.
 */
export function workerdCommand(o: { host: string; port: number; token: string }): { bin: string; args: string[]; cleanup(): void } {
  const dir = mkdtempSync(join(tmpdir(), "weftnet-workerd-"));
  const cfg = join(dir, "config.capnp");
  copyFileSync(bundleWorker(), join(dir, "worker.js"));
  writeFileSync(cfg, workerdConfig({ port: o.port, host: o.host, bundle: "worker.js", env: envFor({ token: o.token }) }));
  return { bin: nativeBin("workerd"), args: ["serve", cfg], cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Deno and Bun run the compiled entry points (npm run build makes dist/). */
function distEntry(name: string): string {
  return join(ROOT, "dist", "examples", name, "main.js");
}

export const denoRuntime: Runtime = {
  name: "deno",
  caps: { stun: false, fastPing: false, probe: false, payloadCap: false },
  unavailable: () => (existsSync(distEntry("deno")) ? probeBinary(nativeBin("deno"), ["--version"]) : `${distEntry("deno")} is missing: run npm run build first`),
  async start(o) {
    const port = o.listen?.port || (await freePort());
    return spawnTarget("deno", nativeBin("deno"), ["run", "--allow-net", "--allow-env", "--allow-read", distEntry("deno")], { ...envFor(o), PORT: String(port), HOST: "127.0.0.1", DENO_NO_UPDATE_CHECK: "1" }, ROOT, port, o.token);
  },
};

export const bunRuntime: Runtime = {
  name: "bun",
  caps: { stun: false, fastPing: false, probe: true, payloadCap: true },
  unavailable: () => (existsSync(distEntry("bun")) ? probeBinary(nativeBin("bun"), ["--version"]) : `${distEntry("bun")} is missing: run npm run build first`),
  async start(o) {
    const port = o.listen?.port || (await freePort());
    return spawnTarget("bun", nativeBin("bun"), ["run", distEntry("bun")], { ...envFor(o), PORT: String(port), HOST: "127.0.0.1" }, ROOT, port, o.token);
  },
};

export const RUNTIMES: Runtime[] = [nodeRuntime, workerdRuntime, denoRuntime, bunRuntime];
