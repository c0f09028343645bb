/**
 * npm run bench:datapath  (root)
 * Two agents in two namespaces behind one LAN, a pod on each; for each configuration (native-native at
 * --link-mtu 1280 and at the default auto (the 1500-byte uplink), werift-werift, werift-native, and native
 * on a jumbo-frame LAN (MTU 9000, where auto picks 4096)): iperf3 TCP pod -> pod (3 runs, median) and idle
 * ping RTT (20 pings 50 ms apart after 1 s of quiet, so each is a cold wake-up of a userspace data path;
 * median and average), plus agent RSS under load. Baselines in the same run, between the same two node
 * namespaces (on each LAN): kernel VXLAN and userspace WireGuard (Debian's wireguard-go + wg), iperf3 and
 * ping alike. Also in the same run, for context: libdatachannel alone (two peer connections in one process
 * on loopback, 64 KiB messages as fast as they go), the ceiling the native transport cannot beat at that
 * MTU. Prints Mbit/s and ratios; never fails on a number.
 *   --seconds N   iperf3 duration per run (default 5)    --runs N   runs per path (default 3)
 *   --only S,..   only the configurations whose key contains one of these (bulk, bulk-busy-poll, bulk-pool-wait, bulk-no-pmtu-checks, bulk-no-answer-wait,
 *                 via, via-webrtc, native-native-1280, native-native-auto, werift-werift, werift-native, jumbo,
 *                 loss-bulk, loss-native, loss-werift; "bulk" matches every bulk row, "=bulk" only that key). WebRTC rows run with
 *                 --no-bulk; the bulk rows are the default agent (bulk link up)
 *   --ping-only   skip iperf3 (and the library ceiling): idle ping only    --pings N  pings per row (default 20)
 *   --no-sweep    skip the loss sweeps even where --only matches them
 *   --ping-compare  idle ping only, all selected labs at once, interleaved rounds (same load for every path),
 *                 with kernel VXLAN and wireguard-go in the first lab; e.g. --ping-compare --only bulk,via --pings 40.
 *                 Also a floor row: a UDP echo between two plain Node processes (node:dgram) in the node namespaces,
 *                 two cold event-loop passes with no work, where a pod ping over weftnet takes three; and, where cc
 *                 and libsodium are there, test/bench/native-relay.c: a compiled TUN<->UDP loop with the same AEAD
 *   --baseline-build DIR  with --ping-compare: also a bulk row whose agents run another build's CLI (DIR/dist/agent/
 *                 cli/main.js, e.g. a worktree of an older commit, built), so a change is compared in the same run
 *   --loss L      loss rates of the sweep in percent, comma-separated (default 0,0.1,1,3)
 *   --segment M   software segmentation modes to sweep (agents' WEFTNET_SEGMENT), comma-separated, of auto,
 *                 always, off (default auto: what the agent does by default)
 *
 * Bulk rows: `bulk` is the default agent (the read loops wait on the event loop's epoll, no busy-poll);
 * `bulk-busy-poll` adds the 1 ms busy-poll window (WEFTNET_BUSY_POLL_US=1000); `bulk-pool-wait` is the wait
 * before (WEFTNET_FD_WAIT=pool: poll() on a libuv worker thread, with the 1 ms busy-poll it had by default).
 *
 * Via rows (keys via, via-webrtc): three nodes, UDP between n1 and n3 blocked, iperf3 pod on n1 -> pod on n3
 * routed through n2 (frames sealed end to end for n3, forwarded by n2 by header only): `via` is the default
 * agent (bulk up on both hops: sealed frames ride it whole, one per datagram), `via-webrtc` runs --no-bulk
 * (WebRTC on both hops: what a via path ran at before sealed frames rode the bulk link). The VXLAN baseline
 * is n1 -> n2 (one hop) on the same LAN.
 *
 * Loss sweep (keys loss-native, loss-werift): one lab per transport; for each loss rate an iptables rule in
 * the receiving node's namespace drops that share of its incoming UDP (`-m statistic --mode random`; this
 * kernel has no netem), then iperf3 pod -> pod over weftnet, and in the same lab and at the same rate the
 * baselines between the two node namespaces: kernel VXLAN and userspace WireGuard (Debian's wireguard-go +
 * wg). Prints Mbit/s, each path's share of its own loss-free figure, and weftnet vs wireguard-go.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { isRoot, MeshLab, sh, until, type LabNode } from "../e2e/mesh-lab.js";
import { spawnInNetns, stopChild } from "../helpers/netns.js";

const { values } = parseArgs({
  options: {
    seconds: { type: "string", default: "5" },
    runs: { type: "string", default: "3" },
    only: { type: "string" },
    loss: { type: "string", default: "0,0.1,1,3" },
    segment: { type: "string", default: "auto" },
    pings: { type: "string", default: "20" },
    "ping-only": { type: "boolean", default: false },
    "no-sweep": { type: "boolean", default: false },
    "ping-compare": { type: "boolean", default: false },
    "baseline-build": { type: "string" },
  },
});
const ONLY = values.only?.split(",");
const selected = (key: string) => !ONLY || ONLY.some((o) => (o.startsWith("=") ? key === o.slice(1) : key.includes(o)));
const PINGS = Math.max(1, Number(values.pings));
const PING_ONLY = values["ping-only"];
const SEGMENT_MODES = values.segment.split(",");
const LOSSES = values.loss.split(",").map(Number);
const SECONDS = Number(values.seconds);
const RUNS = Number(values.runs);
if (!isRoot) {
  process.stderr.write("bench:datapath needs root (network namespaces, TUN, iperf3)\n");
  process.exit(2);
}
try {
  execFileSync("iperf3", ["--version"], { stdio: "ignore" });
} catch {
  process.stderr.write("bench:datapath needs iperf3 (apt-get install iperf3)\n");
  process.exit(2);
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const rssMiB = (pid: number) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? NaN) / 1024;

async function iperf(clientNs: string, serverNs: string, serverIp: string, pids: number[] = []): Promise<{ mbps: number; rss: number[] }> {
  const server = spawn("nsenter", [`--net=/run/netns/${serverNs}`, "--", "iperf3", "-s", "-1", "-B", serverIp], { stdio: "ignore" });
  await new Promise((r) => setTimeout(r, 300));
  let rss: number[] = [];
  const sampler = setTimeout(() => (rss = pids.map(rssMiB)), (SECONDS * 1000) / 2);
  try {
    // The server may not listen yet on a loaded box: retry the connection a few times.
    for (let attempt = 1; ; attempt++) {
      try {
        const { stdout } = await sh(clientNs, "iperf3", ["-c", serverIp, "-t", String(SECONDS), "-J"], (SECONDS + 20) * 1000);
        const j = JSON.parse(stdout) as { end: { sum_received: { bits_per_second: number } } };
        return { mbps: j.end.sum_received.bits_per_second / 1e6, rss };
      } catch (err) {
        if (attempt >= 3) throw err;
        await new Promise((r) => setTimeout(r, 500));
      }
    }
  } finally {
    clearTimeout(sampler);
    server.kill("SIGKILL");
  }
}

/** Idle RTT: PINGS pings 50 ms apart (each one a cold wake-up for a userspace data path), after a second of quiet; median and average (ms). */
async function pingRtt(ns: string, ip: string): Promise<{ p50: number; avg: number }> {
  await new Promise((r) => setTimeout(r, 1000));
  const { stdout } = await sh(ns, "ping", ["-c", String(PINGS), "-i", "0.05", ip], 20_000 + PINGS * 100);
  const t = [...stdout.matchAll(/time=([\d.]+) ms/g)].map((m) => Number(m[1]));
  return t.length ? { p50: median(t), avg: t.reduce((a, b) => a + b, 0) / t.length } : { p50: NaN, avg: NaN };
}

/** iperf3 runs only (no ping: under loss its average says little). */
async function measureRuns(client: string, server: string, ip: string): Promise<number[]> {
  const runs: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    try {
      runs.push((await iperf(client, server, ip)).mbps);
    } catch {
      runs.push(0); // at high loss iperf3's control connection may give up: count the run as nothing carried
    }
  }
  return runs;
}

async function measure(label: string, client: string, server: string, ip: string, pids: number[] = []) {
  const runs: number[] = [];
  let rss: number[] = [];
  for (let i = 0; i < (PING_ONLY ? 0 : RUNS); i++) {
    const r = await iperf(client, server, ip, pids);
    runs.push(r.mbps);
    if (r.rss.length) rss = r.rss;
  }
  // Without iperf3 first, warm the path up as those runs would (the JIT compiles it): 1 s of 1 kHz pings.
  if (PING_ONLY) await sh(client, "ping", ["-q", "-c", "1000", "-i", "0.001", ip], 30_000).catch(() => undefined);
  const rtt = await pingRtt(client, ip);
  return { label, mbps: runs.length ? median(runs) : NaN, runs, rtt, rss };
}

type Result = Awaited<ReturnType<typeof measure>>;

/** Kernel VXLAN between the two node namespaces (10.88.0.1 -> 10.88.0.2); returns the undo. */
function vxlanUp(lab: MeshLab): () => void {
  const [a, b] = lab.nodes as [LabNode, LabNode];
  for (const [n, peer, addr] of [
    [a, b, "10.88.0.1"],
    [b, a, "10.88.0.2"],
  ] as const) {
    execFileSync("ip", ["-n", n.ns, "link", "add", "vx0", "type", "vxlan", "id", "42", "remote", peer.addr, "local", n.addr, "dstport", "4789", "dev", "uplink"]);
    execFileSync("ip", ["-n", n.ns, "addr", "add", `${addr}/24`, "dev", "vx0"]);
    execFileSync("ip", ["-n", n.ns, "link", "set", "vx0", "up"]);
  }
  return () => {
    for (const n of [a, b]) execFileSync("ip", ["-n", n.ns, "link", "del", "vx0"]);
  };
}

/**
 * Userspace WireGuard (wireguard-go + wg) between the two node namespaces (10.89.0.1 -> 10.89.0.2, UDP 51820
 * on the uplinks). Returns the undo (stops the wireguard-go processes we started, by PID).
 */
async function wireguardUp(lab: MeshLab): Promise<() => Promise<void>> {
  const nodes = lab.nodes.slice(0, 2) as [LabNode, LabNode];
  const procs = new Set<ChildProcess>();
  const keys = nodes.map(() => {
    const priv = execFileSync("wg", ["genkey"], { encoding: "utf8" }).trim();
    const pub = execFileSync("wg", ["pubkey"], { input: priv, encoding: "utf8" }).trim();
    return { priv, pub };
  });
  const names = nodes.map((_, i) => `wg${lab.id}${i}`);
  const undo = async () => {
    for (const p of procs) await stopChild(p, 3000);
    for (const f of names) rmSync(`/var/run/wireguard/${f}.sock`, { force: true });
  };
  try {
    for (const [i, n] of nodes.entries()) {
      spawnInNetns(n.ns, "wireguard-go", ["-f", names[i]!], join(lab.root, `${names[i]}.log`), procs);
    }
    for (const [i, n] of nodes.entries()) {
      const name = names[i]!;
      const other = nodes[1 - i]!;
      await until(async () => (await sh(n.ns, "ip", ["link", "show", name], 2000)).stdout.includes(name), 10_000, `${name} up`);
      const keyFile = join(lab.root, `${name}.key`);
      writeFileSync(keyFile, keys[i]!.priv + "\n", { mode: 0o600 });
      await sh(n.ns, "wg", ["set", name, "private-key", keyFile, "listen-port", "51820", "peer", keys[1 - i]!.pub, "endpoint", `${other.addr}:51820`, "allowed-ips", `10.89.0.${2 - i}/32`]);
      await sh(n.ns, "ip", ["addr", "add", `10.89.0.${i + 1}/24`, "dev", name]);
      await sh(n.ns, "ip", ["link", "set", name, "mtu", "1420", "up"]);
    }
    await until(async () => (await sh(nodes[0].ns, "ping", ["-c", "1", "-W", "1", "10.89.0.2"], 5000)).stdout.includes("1 received"), 15_000, "wireguard ping");
  } catch (e) {
    await undo();
    throw e;
  }
  return undo;
}

/**
 * test/bench/native-relay.c between the two node namespaces (TUN wc0, 10.97.0.1 -> 10.97.0.2, UDP 7901 on the
 * uplinks), compiled into the lab's directory: what a compiled data path with the same per-packet AEAD does, as a
 * same-run baseline for the idle ping. Throws (the row is skipped) without a C compiler or libsodium. Returns the
 * undo (stops the relays we started, by PID; their TUN devices go with them).
 */
async function nativeRelayUp(lab: MeshLab): Promise<() => Promise<void>> {
  const bin = join(lab.root, "native-relay");
  const src = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "test", "bench", "native-relay.c");
  const built = [["-l:libsodium.so.23"], ["-lsodium"]].some((lib) => {
    try {
      execFileSync("cc", ["-O2", src, "-o", bin, ...lib], { stdio: "ignore" });
      return true;
    } catch {
      return false;
    }
  });
  if (!built) throw new Error("no C compiler (cc) or no libsodium to link: the row needs both");
  const procs = new Set<ChildProcess>();
  const undo = async () => {
    for (const p of procs) await stopChild(p, 2000);
  };
  try {
    const key = randomBytes(32).toString("hex");
    const [a, b] = lab.nodes as [LabNode, LabNode];
    for (const [i, n, peer] of [[0, a, b], [1, b, a]] as const) {
      spawnInNetns(n.ns, bin, ["wc0", "7901", peer.addr, "7901", key, String(i)], join(lab.root, `native-relay-${i}.log`), procs);
      await until(async () => (await sh(n.ns, "ip", ["link", "show", "wc0"], 2000).catch(() => ({ stdout: "" }))).stdout.includes("wc0"), 10_000, "native-relay TUN");
      await sh(n.ns, "ip", ["addr", "add", `10.97.0.${i + 1}/24`, "dev", "wc0"]);
      await sh(n.ns, "ip", ["link", "set", "wc0", "up"]);
    }
    await until(async () => (await sh(a.ns, "ping", ["-c", "1", "-W", "1", "10.97.0.2"], 5000).catch(() => ({ stdout: "" }))).stdout.includes("1 received"), 15_000, "native-relay ping");
  } catch (e) {
    await undo();
    throw e;
  }
  return undo;
}

/** Drop `pct` percent of the UDP arriving in `n`'s namespace; returns the undo. */
function dropUdp(n: LabNode, pct: number): () => void {
  if (pct <= 0) return () => {};
  const rule = ["INPUT", "-p", "udp", "-m", "statistic", "--mode", "random", "--probability", String(pct / 100), "-j", "DROP"];
  execFileSync("nsenter", [`--net=/run/netns/${n.ns}`, "--", "iptables", "-I", ...rule]);
  return () => execFileSync("nsenter", [`--net=/run/netns/${n.ns}`, "--", "iptables", "-D", ...rule]);
}

interface SweepRow {
  loss: number;
  path: string;
  runs: number[];
}

/** The loss sweep for one transport; baselines in the same lab when `baselines`. */
async function lossSweep(kind: string, withBaselines: boolean, segment: string, extra: string[] = [], label = `weftnet ${kind} (segment ${segment})`): Promise<SweepRow[]> {
  const lab = new MeshLab(2);
  process.env.WEFTNET_SEGMENT = segment; // inherited by the agents
  const out: SweepRow[] = [];
  try {
    await lab.setup();
    await lab.startSignal();
    lab.nodes.forEach((n) => lab.startAgent(n, ["--transport", kind, "--log-level", "warn", ...extra]));
    await until(async () => (await Promise.all(lab.nodes.map((n) => lab.status(n)))).every((s) => s.peers.some((p) => p.state === "connected")), 30_000, "mesh");
    const pa = await lab.addPod(lab.nodes[0]!, "pa");
    const pb = await lab.addPod(lab.nodes[1]!, "pb");
    await until(async () => (await sh(pa.name, "ping", ["-c", "1", "-W", "1", pb.ip], 5000)).stdout.includes("1 received"), 20_000, "pod ping");
    if (!extra.includes("--no-bulk")) await bulkUp(lab);
    // WebRTC rows: on a loaded box the WebRTC link may form after the relay one; measure the WebRTC link.
    else await until(async () => (await Promise.all(lab.nodes.map((n) => lab.status(n)))).every((s) => s.peers.some((p) => p.linkType === "webrtc")), 60_000, "webrtc links");
    const [a, b] = lab.nodes as [LabNode, LabNode];
    const vxDown = withBaselines ? vxlanUp(lab) : undefined;
    const wgDown = withBaselines ? await wireguardUp(lab) : undefined;
    try {
      for (const loss of LOSSES) {
        const undo = dropUdp(b, loss);
        try {
          process.stderr.write(`  ${kind} at ${loss}% loss ...\n`);
          out.push({ loss, path: label, runs: await measureRuns(pa.name, pb.name, pb.ip) });
          if (withBaselines) {
            out.push({ loss, path: "kernel VXLAN", runs: await measureRuns(a.ns, b.ns, "10.88.0.2") });
            out.push({ loss, path: "wireguard-go", runs: await measureRuns(a.ns, b.ns, "10.89.0.2") });
          }
        } finally {
          undo();
        }
      }
    } finally {
      vxDown?.();
      await wgDown?.();
    }
  } finally {
    await lab.close();
    delete process.env.WEFTNET_SEGMENT;
  }
  return out;
}

function printSweep(rows: SweepRow[]): void {
  const paths = [...new Set(rows.map((r) => r.path))];
  const med = (path: string, loss: number) => {
    const r = rows.find((x) => x.path === path && x.loss === loss);
    return r ? median(r.runs) : NaN;
  };
  process.stdout.write(`\nloss sweep: iperf3 TCP, ${RUNS} x ${SECONDS} s, median Mbit/s [runs]; random loss of incoming UDP at the receiving node\n`);
  process.stdout.write(`${"path".padEnd(36)} ${"loss %".padStart(6)} ${"Mbit/s".padStart(8)} ${"vs own 0%".padStart(10)} ${"vs wg-go".padStart(9)}  runs\n`);
  for (const path of paths) {
    for (const loss of LOSSES) {
      const r = rows.find((x) => x.path === path && x.loss === loss);
      if (!r) continue;
      const m = median(r.runs);
      process.stdout.write(
        `${path.padEnd(36)} ${String(loss).padStart(6)} ${m.toFixed(0).padStart(8)} ${(m / med(path, 0)).toFixed(3).padStart(10)} ${(m / med("wireguard-go", loss)).toFixed(3).padStart(9)}  [${r.runs.map((x) => x.toFixed(0)).join(", ")}]\n`,
      );
    }
  }
}

async function vxlanBaseline(lab: MeshLab, label: string): Promise<Result> {
  const down = vxlanUp(lab);
  try {
    return await measure(label, lab.nodes[0]!.ns, lab.nodes[1]!.ns, "10.88.0.2");
  } finally {
    down();
  }
}

/** Userspace WireGuard between the same two node namespaces: the idle ping a userspace data path can reach here. */
async function wireguardBaseline(lab: MeshLab, label: string): Promise<Result> {
  const down = await wireguardUp(lab);
  try {
    return await measure(label, lab.nodes[0]!.ns, lab.nodes[1]!.ns, "10.89.0.2");
  } finally {
    await down();
  }
}

interface Config {
  key: string;
  label: string;
  kinds: [string, string];
  args?: string[];
  uplinkMtu?: number;
  /** environment of the agents (set while they are spawned) */
  env?: Record<string, string>;
  /** three nodes, UDP between n1 and n3 blocked: pod n1 -> pod n3 routed via n2 (frames sealed end to end) */
  via?: boolean;
  /** the weftnet CLI the agents run (--baseline-build); default this checkout's */
  cli?: string;
}

/** Both agents carry pod traffic on the bulk link (direct UDP), not WebRTC. */
async function bulkUp(lab: MeshLab): Promise<void> {
  await until(async () => (await Promise.all(lab.nodes.map((n) => lab.status(n)))).every((s) => s.peers.some((p) => p.linkType === "bulk")), 20_000, "bulk link up");
}

/** Baselines per LAN MTU (kernel VXLAN, wireguard-go), measured once in the first lab of that kind. */
const baselines = new Map<number, Result>();
const wgBaselines = new Map<number, Result>();

interface Ready {
  c: Config;
  lab: MeshLab;
  pa: { name: string; ip: string };
  pb: { name: string; ip: string };
}

/** A lab for `c` with pod traffic on the configuration's link; closes the lab itself on failure. */
async function startOverlay(c: Config): Promise<Ready> {
  const lab = new MeshLab(c.via ? 3 : 2, { ...(c.uplinkMtu ? { uplinkMtu: c.uplinkMtu } : {}), ...(c.cli ? { cli: c.cli } : {}) });
  try {
    await lab.setup();
    await lab.startSignal();
    const saved = Object.fromEntries(Object.keys(c.env ?? {}).map((k) => [k, process.env[k]]));
    Object.assign(process.env, c.env ?? {});
    try {
      lab.nodes.forEach((n, i) => lab.startAgent(n, ["--transport", c.kinds[i] ?? c.kinds[0], "--log-level", "warn", ...(c.args ?? [])]));
    } finally {
      for (const [k, v] of Object.entries(saved)) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    }
    await until(async () => (await Promise.all(lab.nodes.map((n) => lab.status(n)))).every((s) => s.peers.filter((p) => p.state === "connected").length === lab.nodes.length - 1), 30_000, "mesh");
    const pa = await lab.addPod(lab.nodes[0]!, "pa");
    const pb = await lab.addPod(lab.nodes[c.via ? 2 : 1]!, "pb");
    if (c.via) {
      const [n1, n2, n3] = lab.nodes as [LabNode, LabNode, LabNode];
      lab.block(n1, n3); // undone when the lab's namespaces go
      const path = async (n: LabNode, peer: string) => (await lab.status(n)).peers.find((p) => p.name === peer)?.path;
      await until(async () => (await path(n1, "n3")) === "via n2" && (await path(n3, "n1")) === "via n2", 30_000, "n1 <-> n3 via n2");
      const hops: [LabNode, string][] = [[n1, "n2"], [n2, "n1"], [n2, "n3"], [n3, "n2"]];
      const want = (c.args ?? []).includes("--no-bulk") ? "webrtc" : "bulk";
      await until(async () => (await Promise.all(hops.map(async ([n, peer]) => (await lab.status(n)).peers.find((p) => p.name === peer)?.linkType))).every((t) => t === want), 60_000, `${want} on both hops`);
    }
    await until(async () => (await sh(pa.name, "ping", ["-c", "1", "-W", "1", pb.ip], 5000)).stdout.includes("1 received"), 20_000, "pod ping");
    if (!c.via && !(c.args ?? []).includes("--no-bulk")) await bulkUp(lab);
    return { c, lab, pa, pb };
  } catch (e) {
    await lab.close();
    throw e;
  }
}

async function overlay(c: Config): Promise<Result> {
  const { lab, pa, pb } = await startOverlay(c);
  try {
    const mtu = c.uplinkMtu ?? 1500;
    if (!baselines.has(mtu)) baselines.set(mtu, await vxlanBaseline(lab, `kernel VXLAN, LAN MTU ${mtu}`));
    if (!wgBaselines.has(mtu)) {
      try {
        wgBaselines.set(mtu, await wireguardBaseline(lab, `wireguard-go, LAN MTU ${mtu}`));
      } catch (err) {
        process.stderr.write(`wireguard-go baseline failed: ${(err as Error).message}\n`);
      }
    }
    return await measure(c.label, pa.name, pb.name, pb.ip, lab.nodes.map((n) => n.proc!.pid!));
  } finally {
    await lab.close();
  }
}

/**
 * --ping-compare: every selected configuration's lab at once, plus kernel VXLAN and wireguard-go between the
 * first lab's two node namespaces; after a warm-up (2 s of iperf3 and 1 s of 1 kHz pings per path: the JIT
 * has compiled the path, as the iperf3 runs before the idle ping do otherwise), ROUNDS rounds of PINGS/ROUNDS idle pings per
 * path, the paths' order rotating each round, so every path sees the same box load. Prints p50/avg per path.
 */
async function pingCompare(cs: Config[]): Promise<void> {
  const ready: Ready[] = [];
  let vxDown: (() => void) | undefined;
  let wgDown: (() => Promise<void>) | undefined;
  let nativeDown: (() => Promise<void>) | undefined;
  try {
    for (const c of cs) {
      process.stderr.write(`starting ${c.label} ...\n`);
      ready.push(await startOverlay(c));
    }
    const first = ready[0]!.lab;
    const [a, b] = first.nodes as [LabNode, LabNode];
    const targets: { label: string; ns: string; ip: string; serverNs: string; t: number[]; nodeEcho?: boolean }[] = [];
    vxDown = vxlanUp(first);
    targets.push({ label: "kernel VXLAN (node to node)", ns: a.ns, ip: "10.88.0.2", serverNs: b.ns, t: [] });
    try {
      wgDown = await wireguardUp(first);
      targets.push({ label: "wireguard-go (node to node)", ns: a.ns, ip: "10.89.0.2", serverNs: b.ns, t: [] });
    } catch (err) {
      process.stderr.write(`wireguard-go baseline failed: ${(err as Error).message}\n`);
    }
    try {
      nativeDown = await nativeRelayUp(first);
      targets.push({ label: "native-relay: compiled TUN<->UDP loop, same AEAD (test/bench/native-relay.c)", ns: a.ns, ip: "10.97.0.2", serverNs: b.ns, t: [] });
    } catch (err) {
      process.stderr.write(`native-relay baseline skipped: ${(err as Error).message}\n`);
    }
    // The runtime's floor: a UDP echo between two plain Node processes in the node namespaces (node:dgram, no
    // work at all), timed by the sender. Its round trip is two cold event-loop passes, where a pod ping over
    // weftnet takes three (sender agent, receiver agent, sender agent again) plus ping's own.
    spawnInNetns(b.ns, process.execPath, ["-e", NODE_ECHO_SERVER], "/dev/null", echoProcs);
    targets.push({ label: "node:dgram echo, node to node (2 Node passes, no work: the floor of any Node path)", ns: a.ns, ip: b.addr, serverNs: b.ns, t: [], nodeEcho: true });
    for (const r of ready) targets.push({ label: `weftnet ${r.c.label}`, ns: r.pa.name, ip: r.pb.ip, serverNs: r.pb.name, t: [] });
    // Warm-up, per path: 2 s of iperf3 and 1 s of 1 kHz pings. An agent that has carried traffic runs its
    // packet path as optimized code; with pings alone much of it stayed in V8's baseline tier and an idle
    // ping measured ~1.7x slower than after an iperf3 run (same build, same box).
    for (const t of targets) {
      if (t.nodeEcho) continue; // the client warms itself (1,000 back-to-back round trips each round)
      await warmIperf(t.ns, t.serverNs, t.ip).catch(() => undefined);
      await sh(t.ns, "ping", ["-q", "-c", "1000", "-i", "0.001", t.ip], 30_000).catch(() => undefined);
    }
    const rounds = 4;
    const per = Math.max(1, Math.ceil(PINGS / rounds));
    for (let round = 0; round < rounds; round++) {
      process.stderr.write(`ping round ${round + 1}/${rounds} ...\n`);
      for (let k = 0; k < targets.length; k++) {
        const t = targets[(k + round) % targets.length]!;
        if (t.nodeEcho) {
          // warms, idles 1 s itself, then `per` datagrams 50 ms apart; prints the round trips (ms) as JSON
          const { stdout } = await sh(t.ns, process.execPath, ["-e", NODE_ECHO_CLIENT, t.ip, String(per)], 30_000 + per * 100).catch(() => ({ stdout: "[]" }));
          t.t.push(...(JSON.parse(stdout.trim() || "[]") as number[]));
          continue;
        }
        await new Promise((r) => setTimeout(r, 1000));
        const { stdout } = await sh(t.ns, "ping", ["-c", String(per), "-i", "0.05", t.ip], 20_000 + per * 100).catch(() => ({ stdout: "" }));
        t.t.push(...[...stdout.matchAll(/time=([\d.]+) ms/g)].map((m) => Number(m[1])));
      }
    }
    const load = (await import("node:os")).loadavg().map((x) => x.toFixed(1)).join(" ");
    process.stdout.write(`\nidle ping, interleaved: ${rounds} rounds x ${per} pings 50 ms apart after 1 s idle, per path (order rotating), after a warm-up of 2 s iperf3 + 1 s of 1 kHz pings; load avg ${load}\n`);
    process.stdout.write(`${"path".padEnd(90)} ${"p50 ms".padStart(7)} ${"avg ms".padStart(7)} ${"p90 ms".padStart(7)}  n\n`);
    for (const t of targets) {
      const s = [...t.t].sort((x, y) => x - y);
      const q = (p: number) => s[Math.min(s.length - 1, Math.floor(s.length * p))] ?? NaN;
      process.stdout.write(`${t.label.padEnd(90)} ${q(0.5).toFixed(3).padStart(7)} ${(s.reduce((x, y) => x + y, 0) / (s.length || 1)).toFixed(3).padStart(7)} ${q(0.9).toFixed(3).padStart(7)}  ${s.length}\n`);
    }
  } finally {
    for (const p of echoProcs) await stopChild(p, 2000);
    await nativeDown?.();
    vxDown?.();
    await wgDown?.();
    for (const r of ready) await r.lab.close();
  }
}

/** --ping-compare's floor row: the echo server (port 7999) and the client (argv: ip, count). */
const echoProcs = new Set<ChildProcess>();
const NODE_ECHO_SERVER = `const s = require("node:dgram").createSocket("udp4"); s.on("message", (m, r) => s.send(m, r.port, r.address)); s.bind(7999);`;
const NODE_ECHO_CLIENT = `
const [ip, count] = process.argv.slice(1); const s = require("node:dgram").createSocket("udp4");
const msg = Buffer.alloc(64); let t0 = 0n, want = 0, done; const rtts = [];
s.on("message", () => { const ms = Number(process.hrtime.bigint() - t0) / 1e6; if (want > 0) { rtts.push(ms); want--; } done?.(); });
const once = () => new Promise((r) => { done = r; t0 = process.hrtime.bigint(); s.send(msg, 7999, ip); setTimeout(r, 1000).unref(); });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
(async () => {
  for (let i = 0; i < 1000; i++) await once(); // the JIT's warm-up, as the other paths get iperf3 + pings
  await sleep(1000);
  for (let i = 0; i < Number(count); i++) { want = 1; await once(); await sleep(50); }
  process.stdout.write(JSON.stringify(rtts)); s.close();
})();`;

/** 2 s of iperf3 from `clientNs` to `ip` (served in `serverNs`): the JIT's warm-up before idle pings. */
async function warmIperf(clientNs: string, serverNs: string, ip: string): Promise<void> {
  const server = spawn("nsenter", [`--net=/run/netns/${serverNs}`, "--", "iperf3", "-s", "-1", "-B", ip], { stdio: "ignore" });
  try {
    await new Promise((r) => setTimeout(r, 300));
    await sh(clientNs, "iperf3", ["-c", ip, "-t", "2"], 30_000);
  } finally {
    server.kill("SIGKILL");
  }
}

/** libdatachannel alone: two peer connections in this process over loopback, 64 KiB messages, `SECONDS` s. */
async function libraryCeiling(mtu?: number): Promise<number> {
  const ndc = (await import("node-datachannel")).default;
  const cfg = { iceServers: [], bindAddress: "127.0.0.1", maxMessageSize: 1 << 20, ...(mtu ? { mtu } : {}) };
  const a = new ndc.PeerConnection("a", cfg);
  const b = new ndc.PeerConnection("b", cfg);
  const keep: unknown[] = [];
  try {
    a.onLocalDescription((sdp, type) => b.setRemoteDescription(sdp, type));
    b.onLocalDescription((sdp, type) => a.setRemoteDescription(sdp, type));
    // A throw inside a native callback aborts the process (a candidate before the remote description):
    // swallow it; ICE has more candidates.
    const add = (pc: InstanceType<typeof ndc.PeerConnection>, c: string, m: string) => {
      try {
        pc.addRemoteCandidate(c, m);
      } catch {
        /* too early: ignored */
      }
    };
    a.onLocalCandidate((c, m) => add(b, c, m));
    b.onLocalCandidate((c, m) => add(a, c, m));
    let rx = 0;
    b.onDataChannel((dc) => {
      keep.push(dc); // node-datachannel closes a channel whose JS object is collected
      dc.onMessage((m) => (rx += (m as Buffer).length));
    });
    const dc = a.createDataChannel("p", { unordered: true, maxRetransmits: 0 });
    const msg = Buffer.alloc(65536, 7);
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error("library ceiling: channel did not open")), 10_000);
      dc.onOpen(() => {
        clearTimeout(t);
        resolve();
      });
    });
    dc.setBufferedAmountLowThreshold(256 * 1024);
    const pump = () => {
      while (dc.bufferedAmount() < 1024 * 1024) dc.sendMessageBinary(msg);
    };
    dc.onBufferedAmountLow(pump);
    const t0 = performance.now();
    const rx0 = rx;
    pump();
    await new Promise((r) => setTimeout(r, SECONDS * 1000));
    const mbps = ((rx - rx0) * 8) / ((performance.now() - t0) / 1000) / 1e6;
    dc.close();
    return mbps;
  } finally {
    a.close();
    b.close();
  }
}

// WebRTC rows run with --no-bulk (else pod traffic would take the bulk link); the bulk row is the default agent.
const configs: Config[] = [
  { key: "bulk", label: "bulk link (direct UDP; default)", kinds: ["native", "native"] },
  { key: "bulk-busy-poll", label: "bulk link, busy-poll 1 ms (WEFTNET_BUSY_POLL_US=1000)", kinds: ["native", "native"], env: { WEFTNET_BUSY_POLL_US: "1000" } },
  { key: "bulk-busy-poll-200", label: "bulk link, busy-poll 200 us (WEFTNET_BUSY_POLL_US=200)", kinds: ["native", "native"], env: { WEFTNET_BUSY_POLL_US: "200" } },
  { key: "bulk-no-answer-wait", label: "bulk link without the answer wait (WEFTNET_ANSWER_WAIT=0)", kinds: ["native", "native"], env: { WEFTNET_ANSWER_WAIT: "0" } },
  { key: "bulk-no-pmtu-checks", label: "bulk link without Don't Fragment and black-hole checks (WEFTNET_BULK_PMTU_CHECKS=off)", kinds: ["native", "native"], env: { WEFTNET_BULK_PMTU_CHECKS: "off" } },
  { key: "bulk-pool-wait", label: "bulk link, old wait: poll() on a worker thread + 1 ms busy-poll (WEFTNET_FD_WAIT=pool)", kinds: ["native", "native"], env: { WEFTNET_FD_WAIT: "pool", WEFTNET_BUSY_POLL_US: "1000" } },
  { key: "via", label: "via a third node, bulk on both hops (sealed e2e)", kinds: ["native", "native"], via: true },
  { key: "via-webrtc", label: "via a third node, --no-bulk: WebRTC on both hops", kinds: ["native", "native"], via: true, args: ["--no-bulk"] },
  { key: "native-native-1280", label: "native -> native, --link-mtu 1280", kinds: ["native", "native"], args: ["--link-mtu", "1280", "--no-bulk"] },
  { key: "native-native-auto", label: "native -> native (default: auto = 1500)", kinds: ["native", "native"], args: ["--no-bulk"] },
  { key: "werift-werift", label: "werift -> werift", kinds: ["werift", "werift"], args: ["--no-bulk"] },
  { key: "werift-native", label: "werift -> native", kinds: ["werift", "native"], args: ["--no-bulk"] },
  { key: "jumbo-native-native-auto", label: "native, jumbo LAN (default: auto = 4096)", kinds: ["native", "native"], uplinkMtu: 9000, args: ["--no-bulk"] },
];
if (values["ping-compare"]) {
  const base = values["baseline-build"];
  const extra: Config[] = base ? [{ key: "bulk-baseline-build", label: `bulk link, agents of the build in ${base}`, kinds: ["native", "native"], cli: join(base, "dist", "agent", "cli", "main.js") }] : [];
  await pingCompare([...configs.filter((c) => selected(c.key)), ...extra]);
  process.exit(0);
}
const rows: { r: Result; base: number }[] = [];
for (const c of configs) {
  if (!selected(c.key)) continue;
  process.stderr.write(`measuring ${c.label} ...\n`);
  const r = await overlay(c);
  const mtu = c.uplinkMtu ?? 1500;
  const base = baselines.get(mtu)!;
  if (!rows.some((x) => x.r === base)) rows.push({ r: base, base: base.mbps });
  const wg = wgBaselines.get(mtu);
  if (wg && !rows.some((x) => x.r === wg)) rows.push({ r: wg, base: base.mbps });
  rows.push({ r: { ...r, label: `weftnet ${c.label}` }, base: base.mbps });
}
const sweep: SweepRow[] = [];
for (const [key, kind, bulk] of [
  ["loss-bulk", "native", true],
  ["loss-native", "native", false],
  ["loss-werift", "werift", false],
] as const) {
  if (!selected(key) || values["no-sweep"]) continue;
  // The bulk link segments by itself (one inner packet per datagram): one sweep; the WebRTC links once per
  // segmentation mode asked for.
  for (const mode of bulk ? ["auto"] : SEGMENT_MODES) {
    process.stderr.write(`loss sweep, ${bulk ? "bulk" : kind}, segment ${mode} ...\n`);
    sweep.push(...(await lossSweep(kind, !sweep.some((r) => r.path === "wireguard-go"), mode, bulk ? [] : ["--no-bulk"], bulk ? "weftnet bulk link" : undefined)));
  }
}
const ceilings: string[] = [];
for (const mtu of values.only?.startsWith("loss") || PING_ONLY ? [] : [undefined, 1500, 4096]) {
  try {
    ceilings.push(`MTU ${mtu ?? 1280}: ${(await libraryCeiling(mtu)).toFixed(0)}`);
  } catch (err) {
    ceilings.push(`MTU ${mtu ?? 1280}: n/a (${(err as Error).message})`);
  }
}
process.stdout.write(`\niperf3 TCP pod to pod, ${PING_ONLY ? "skipped (--ping-only)" : `${RUNS} x ${SECONDS} s, median`}; ping: ${PINGS} x 50 ms after 1 s idle, median / average; ratio vs kernel VXLAN on the same LAN; load avg ${(await import("node:os")).loadavg().map((x) => x.toFixed(1)).join(" ")}\n`);
process.stdout.write(`${"path".padEnd(48)} ${"Mbit/s".padStart(9)} ${"vs VXLAN".padStart(9)} ${"ping ms p50/avg".padStart(15)}  runs / agent RSS under load (MiB)\n`);
for (const { r, base } of rows) {
  process.stdout.write(
    `${r.label.padEnd(48)} ${(r.runs.length ? r.mbps.toFixed(0) : "-").padStart(9)} ${(r.runs.length ? (r.mbps / base).toFixed(4) : "-").padStart(9)} ${`${r.rtt.p50.toFixed(3)}/${r.rtt.avg.toFixed(3)}`.padStart(15)}  [${r.runs.map((x) => x.toFixed(0)).join(", ")}]${r.rss.length ? ` rss ${r.rss.map((x) => x.toFixed(0)).join("/")}` : ""}\n`,
  );
}
if (sweep.length) printSweep(sweep);
if (ceilings.length) process.stdout.write(`libdatachannel alone (loopback, one process, 64 KiB messages, Mbit/s): ${ceilings.join(", ")}\n`);
process.exit(0); // node-datachannel keeps the loop alive for a few seconds after its last connection
