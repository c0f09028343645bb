/**
 * Mesh lab (root): real `weftnet` processes in network namespaces.
 *
 *   ns <id>-lan : bridge "lan" 10.77.N.1/24, runs `weftnet signal` (ws :7000, STUN :3478)
 *   ns <id>-nK  : veth to the lan bridge, 10.77.N.(10+K)/24, runs `weftnet agent` (TUN, bridge, pods)
 *
 * Every child runs as `setpriv --pdeathsig KILL nsenter --net=/run/netns/NS node dist/agent/cli/main.js ...`, so it
 * dies with the test process even if that crashes; close() stops agents by PID (SIGTERM, then KILL),
 * deletes pod namespaces and node namespaces and the state dirs. Lab addresses only (10.77.0.0/16,
 * 10.40.0.0/16 inside the namespaces); nothing routes to the real network.
 */
import { execFile, execFileSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { customAlphabet } from "nanoid";
import { isRoot, spawnInNetns, stopChild } from "../helpers/netns.js";
import { apiRequest } from "../../agent/api-client.js";
import { apiSocketPath } from "../../agent/state.js";
import type { AgentStatus } from "../../agent/agent.js";

const pexec = promisify(execFile);
export { isRoot };
export const CLI = join(process.cwd(), "dist", "agent", "cli", "main.js");
const suffix = customAlphabet("abcdefghijklmnopqrstuvwxyz0123456789", 5);

export interface LabNode {
  name: string;
  ns: string;
  addr: string;
  stateDir: string;
  proc?: ChildProcess;
  pods: string[];
}

function ip(args: string[]): void {
  execFileSync("ip", args, { stdio: ["ignore", "ignore", "pipe"] });
}

/**
 * Run a command in a namespace. nsenter switches only the network namespace (`ip netns exec` also
 * unshares the mount namespace, so namespaces that an agent creates with `ip netns add` would not be
 * visible outside it), which is what an agent on a real host sees too.
 */
export async function sh(ns: string, cmd: string, args: string[], timeoutMs = 30_000): Promise<{ stdout: string; stderr: string }> {
  return pexec("nsenter", [`--net=/run/netns/${ns}`, "--", cmd, ...args], { timeout: timeoutMs, maxBuffer: 64 << 20 });
}

export class MeshLab {
  readonly id = suffix();
  readonly net = 1 + Math.floor(Math.random() * 250);
  readonly lan: string;
  readonly nodes: LabNode[] = [];
  /**
   * The lab's directory (agent state, logs), made on first use: a lab built at describe level whose tests are
   * filtered out or skipped never runs its afterAll, and left an empty directory behind each run.
   */
  get root(): string {
    return (this.rootDir ??= mkdtempSync(join(tmpdir(), "weft-lab-")));
  }
  private rootDir: string | undefined;
  readonly token = "lab-token-" + suffix() + suffix();
  private readonly namespaces: string[] = [];
  private readonly procs = new Set<ChildProcess>();
  private readonly cleanups: (() => void)[] = [];
  signalProc: ChildProcess | undefined;
  readonly signalAddr: string;

  /**
   * uplinkMtu: MTU of the LAN (bridge and every node's uplink), default the kernel's 1500; 9000 for a jumbo-frame LAN.
   * cli: the weftnet CLI the lab runs (default this checkout's dist): benchmarks compare another build in the same run.
   * lanPortMtu: MTU of the bridge's ports only (default uplinkMtu): below uplinkMtu, a silent path MTU black hole —
   * a veth drops what is larger than its peer's MTU without an ICMP, so the nodes' kernels never learn of it.
   */
  constructor(
    readonly count: number,
    readonly opts: { uplinkMtu?: number; lanPortMtu?: number; cli?: string } = {},
  ) {
    this.lan = `wl-${this.id}-lan`;
    this.signalAddr = `10.77.${this.net}.1`;
  }

  async setup(): Promise<void> {
    ip(["netns", "add", this.lan]);
    this.namespaces.push(this.lan);
    ip(["-n", this.lan, "link", "set", "lo", "up"]);
    ip(["-n", this.lan, "link", "add", "lan", "type", "bridge"]);
    ip(["-n", this.lan, "addr", "add", `${this.signalAddr}/24`, "dev", "lan"]);
    ip(["-n", this.lan, "link", "set", "lan", "up"]);
    for (let k = 1; k <= this.count; k++) {
      const ns = `wl-${this.id}-n${k}`;
      ip(["netns", "add", ns]);
      this.namespaces.push(ns);
      ip(["-n", ns, "link", "set", "lo", "up"]);
      ip(["-n", ns, "link", "add", "uplink", "type", "veth", "peer", "name", `p${k}`, "netns", this.lan]);
      ip(["-n", this.lan, "link", "set", `p${k}`, "master", "lan", "up"]);
      const addr = `10.77.${this.net}.${10 + k}`;
      ip(["-n", ns, "addr", "add", `${addr}/24`, "dev", "uplink"]);
      if (this.opts.uplinkMtu) ip(["-n", ns, "link", "set", "uplink", "mtu", String(this.opts.uplinkMtu)]);
      const portMtu = this.opts.lanPortMtu ?? this.opts.uplinkMtu;
      if (portMtu) ip(["-n", this.lan, "link", "set", `p${k}`, "mtu", String(portMtu)]);
      ip(["-n", ns, "link", "set", "uplink", "up"]);
      this.nodes.push({ name: `n${k}`, ns, addr, stateDir: join(this.root, `n${k}`), pods: [] });
    }
  }

  private spawnIn(ns: string, args: string[], log: string): ChildProcess {
    const nodeArgs = (process.env.WEFTNET_LAB_NODE_ARGS ?? "").split(" ").filter(Boolean); // e.g. --cpu-prof (benchmarks)
    return spawnInNetns(ns, process.execPath, [...nodeArgs, this.opts.cli ?? CLI, ...args], join(this.root, log), this.procs);
  }


  async startSignal(): Promise<void> {
    this.signalProc = this.spawnIn(this.lan, ["signal", "--listen", `${this.signalAddr}:7000`, "--stun-port", "3478", "--token", this.token], "signal.log");
    for (let i = 0; i < 100; i++) {
      try {
        await sh(this.lan, "bash", ["-c", `exec 3<>/dev/tcp/${this.signalAddr}/7000`], 2000);
        return;
      } catch {
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    throw new Error("signaling server did not start: " + this.log("signal.log"));
  }

  /**
   * The Workers build under workerd as the lab's signaling server (same address and port as
   * startSignal; no STUN: Workers have no UDP). stopSignal() kills it.
   */
  async startWorkerdSignal(): Promise<void> {
    const { workerdCommand } = await import("../helpers/signal-runtimes.js");
    const w = workerdCommand({ host: this.signalAddr, port: 7000, token: this.token });
    this.cleanups.push(w.cleanup);
    this.signalProc = spawnInNetns(this.lan, w.bin, w.args, join(this.root, "signal.log"), this.procs);
    await until(async () => {
      const { stdout } = await sh(this.lan, process.execPath, ["-e", `fetch("http://${this.signalAddr}:7000/healthz", { signal: AbortSignal.timeout(2000) }).then((r) => console.log(r.status))`], 5000);
      return stdout.trim() === "200";
    }, 30_000, "workerd signaling server up", () => this.log("signal.log"));
  }

  /** Stop the signaling server (SIGTERM, then KILL) and wait for it to exit. */
  stopSignal(): Promise<void> {
    return stopChild(this.signalProc, 5_000);
  }

  startAgent(n: LabNode, extra: string[] = []): void {
    n.proc = this.spawnIn(n.ns, ["agent", "--signal", `ws://${this.signalAddr}:7000`, "--token", this.token, "--name", n.name, "--state-dir", n.stateDir, "--log-level", "info", ...extra], `${n.name}.log`);
  }

  stopAgent(n: LabNode): Promise<void> {
    return stopChild(n.proc, 10_000);
  }

  log(file: string): string {
    try {
      return execFileSync("tail", ["-n", "40", join(this.root, file)], { encoding: "utf8" });
    } catch {
      return "";
    }
  }

  status(n: LabNode): Promise<AgentStatus> {
    return apiRequest<AgentStatus>(apiSocketPath(n.stateDir), "GET", "/v1/status", undefined, 5000);
  }

  async cli(n: LabNode, args: string[], timeoutMs = 60_000): Promise<string> {
    const { stdout } = await sh(n.ns, process.execPath, [this.opts.cli ?? CLI, ...args, "--state-dir", n.stateDir], timeoutMs);
    return stdout;
  }

  async addPod(n: LabNode, name: string): Promise<{ ip: string; name: string }> {
    const pod = `wl-${this.id}-${name}`;
    n.pods.push(pod);
    const out = JSON.parse(await this.cli(n, ["pod", "add", pod, "--json"])) as { ip: string };
    return { ip: out.ip, name: pod };
  }

  /** Block UDP between two nodes (both directions) in a's namespace; returns an undo function. */
  block(a: LabNode, b: LabNode): () => void {
    const rules = [
      ["INPUT", "-s", b.addr, "-p", "udp", "-j", "DROP"],
      ["OUTPUT", "-d", b.addr, "-p", "udp", "-j", "DROP"],
    ];
    for (const r of rules) execFileSync("nsenter", [`--net=/run/netns/${a.ns}`, "--", "iptables", "-I", ...r]);
    return () => {
      for (const r of rules) execFileSync("nsenter", [`--net=/run/netns/${a.ns}`, "--", "iptables", "-D", ...r]);
    };
  }

  async close(): Promise<void> {
    await Promise.all(this.nodes.map((n) => this.stopAgent(n).catch(() => {})));
    for (const p of this.procs) {
      try {
        p.kill("SIGKILL");
      } catch {
        /* gone */
      }
    }
    for (const n of this.nodes) for (const pod of n.pods) try {
      ip(["netns", "del", pod]);
    } catch {
      /* already gone */
    }
    for (const ns of this.namespaces.reverse()) try {
      ip(["netns", "del", ns]);
    } catch {
      /* best effort */
    }
    for (const f of this.cleanups) f();
    if (this.rootDir && !process.env.WEFTNET_KEEP_LAB) rmSync(this.rootDir, { recursive: true, force: true });
  }
}

export async function until<T>(f: () => Promise<T | undefined | false>, timeoutMs: number, what: string, onTimeout?: () => string): Promise<T> {
  const t0 = Date.now();
  let last: unknown;
  for (;;) {
    try {
      const v = await f();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? ` (last error: ${(last as Error).message})` : ""}${onTimeout ? `\n${onTimeout()}` : ""}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

export { writeFileSync };

/**
 * Wait until a TCP listener on `port` exists in namespace `ns` (a test server just spawned there). A fixed sleep
 * was not enough: node starting inside a pod namespace on a loaded 2-core box took over 500 ms (ECONNREFUSED).
 */
export async function listening(ns: string, port: number, timeoutMs = 20_000): Promise<void> {
  await until(async () => (await sh(ns, "ss", ["-Htln", `sport = :${port}`], 5000)).stdout.includes(`:${port}`), timeoutMs, `a TCP listener on port ${port} in ${ns}`);
}
