/**
 * npm run bench:datapath  (root)
 * Two agents in two namespaces behind one LAN, a pod on each; for each configuration (native-native at
 * --link-mtu 1280 and at the default auto (the 1500-byte uplink), werift-werift, werift-native, and native
 * on a jumbo-frame LAN (MTU 9000, where auto picks 4096)): iperf3 TCP pod -> pod (3 runs, median) and ping RTT (idle, average of 20), plus
 * agent RSS under load. Baseline in the same run: kernel VXLAN between the same two node namespaces (on
 * each LAN). Also in the same run, for context: libdatachannel alone (two peer connections in one process
 * on loopback, 64 KiB messages as fast as they go), the ceiling the native transport cannot beat at that
 * MTU. Prints Mbit/s and ratios; never fails on a number.
 *   --seconds N   iperf3 duration per run (default 5)    --runs N   runs per path (default 3)
 *   --only S      only the configurations whose key contains S (native-native-1280, native-native-auto,
 *                 werift-werift, werift-native, jumbo)
 */
import { execFileSync, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { isRoot, MeshLab, sh, until, type LabNode } from "../e2e/mesh-lab.js";

const { values } = parseArgs({ options: { seconds: { type: "string", default: "5" }, runs: { type: "string", default: "3" }, only: { type: "string" } } });
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

async function pingRtt(ns: string, ip: string): Promise<number> {
  const { stdout } = await sh(ns, "ping", ["-c", "20", "-i", "0.05", "-q", ip], 20_000);
  const m = /= [\d.]+\/([\d.]+)\//.exec(stdout); // rtt min/avg/max/mdev
  return m ? Number(m[1]) : NaN;
}

async function measure(label: string, client: string, server: string, ip: string, pids: number[] = []) {
  const runs: number[] = [];
  let rss: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const r = await iperf(client, server, ip, pids);
    runs.push(r.mbps);
    if (r.rss.length) rss = r.rss;
  }
  const rtt = await pingRtt(client, ip);
  return { label, mbps: median(runs), runs, rtt, rss };
}

type Result = Awaited<ReturnType<typeof measure>>;

async function vxlanBaseline(lab: MeshLab, label: string): Promise<Result> {
  const [a, b] = lab.nodes as [LabNode, LabNode];
  for (const [n, peer, addr] of [
    [a, b, "10.88.0.1"],
    [b, a, "10.88.0.2"],
  ] as const) {
    execFileSync("ip", ["-n", n.ns, "link", "add", "vx0", "type", "vxlan", "id", "42", "remote", peer.addr, "local", n.addr, "dstport", "4789", "dev", "uplink"]);
    execFileSync("ip", ["-n", n.ns, "addr", "add", `${addr}/24`, "dev", "vx0"]);
    execFileSync("ip", ["-n", n.ns, "link", "set", "vx0", "up"]);
  }
  try {
    return await measure(label, a.ns, b.ns, "10.88.0.2");
  } finally {
    for (const n of [a, b]) execFileSync("ip", ["-n", n.ns, "link", "del", "vx0"]);
  }
}

interface Config {
  key: string;
  label: string;
  kinds: [string, string];
  args?: string[];
  uplinkMtu?: number;
}

/** Baseline per LAN MTU, measured once in the first lab of that kind. */
const baselines = new Map<number, Result>();

async function overlay(c: Config): Promise<Result> {
  const lab = new MeshLab(2, c.uplinkMtu ? { uplinkMtu: c.uplinkMtu } : {});
  try {
    await lab.setup();
    await lab.startSignal();
    lab.nodes.forEach((n, i) => lab.startAgent(n, ["--transport", c.kinds[i]!, "--log-level", "warn", ...(c.args ?? [])]));
    await until(async () => (await Promise.all(lab.nodes.map((n) => lab.status(n)))).every((s) => s.peers.some((p) => p.state === "connected")), 30_000, "mesh");
    const pa = await lab.addPod(lab.nodes[0]!, "pa");
    const pb = await lab.addPod(lab.nodes[1]!, "pb");
    await until(async () => (await sh(pa.name, "ping", ["-c", "1", "-W", "1", pb.ip], 5000)).stdout.includes("1 received"), 20_000, "pod ping");
    const mtu = c.uplinkMtu ?? 1500;
    if (!baselines.has(mtu)) baselines.set(mtu, await vxlanBaseline(lab, `kernel VXLAN, LAN MTU ${mtu}`));
    return await measure(c.label, pa.name, pb.name, pb.ip, lab.nodes.map((n) => n.proc!.pid!));
  } finally {
    await lab.close();
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
    a.onLocalCandidate((c, m) => b.addRemoteCandidate(c, m));
    b.onLocalCandidate((c, m) => a.addRemoteCandidate(c, m));
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

const configs: Config[] = [
  { key: "native-native-1280", label: "native -> native, --link-mtu 1280", kinds: ["native", "native"], args: ["--link-mtu", "1280"] },
  { key: "native-native-auto", label: "native -> native (default: auto = 1500)", kinds: ["native", "native"] },
  { key: "werift-werift", label: "werift -> werift", kinds: ["werift", "werift"] },
  { key: "werift-native", label: "werift -> native", kinds: ["werift", "native"] },
  { key: "jumbo-native-native-auto", label: "native, jumbo LAN (default: auto = 4096)", kinds: ["native", "native"], uplinkMtu: 9000 },
];
const rows: { r: Result; base: number }[] = [];
for (const c of configs) {
  if (values.only && !c.key.includes(values.only)) continue;
  process.stderr.write(`measuring ${c.label} ...\n`);
  const r = await overlay(c);
  const mtu = c.uplinkMtu ?? 1500;
  const base = baselines.get(mtu)!;
  if (!rows.some((x) => x.r === base)) rows.push({ r: base, base: base.mbps });
  rows.push({ r: { ...r, label: `weftnet ${c.label}` }, base: base.mbps });
}
const ceilings: string[] = [];
for (const mtu of [undefined, 1500, 4096]) {
  try {
    ceilings.push(`MTU ${mtu ?? 1280}: ${(await libraryCeiling(mtu)).toFixed(0)}`);
  } catch (err) {
    ceilings.push(`MTU ${mtu ?? 1280}: n/a (${(err as Error).message})`);
  }
}
process.stdout.write(`\niperf3 TCP pod to pod, ${RUNS} x ${SECONDS} s, median; ping: 20 x 50 ms, average; ratio vs kernel VXLAN on the same LAN\n`);
process.stdout.write(`${"path".padEnd(48)} ${"Mbit/s".padStart(9)} ${"vs VXLAN".padStart(9)} ${"ping ms".padStart(8)}  runs / agent RSS under load (MiB)\n`);
for (const { r, base } of rows) {
  process.stdout.write(
    `${r.label.padEnd(48)} ${r.mbps.toFixed(0).padStart(9)} ${(r.mbps / base).toFixed(4).padStart(9)} ${r.rtt.toFixed(3).padStart(8)}  [${r.runs.map((x) => x.toFixed(0)).join(", ")}]${r.rss.length ? ` rss ${r.rss.map((x) => x.toFixed(0)).join("/")}` : ""}\n`,
  );
}
process.stdout.write(`libdatachannel alone (loopback, one process, 64 KiB messages, Mbit/s): ${ceilings.join(", ")}\n`);
process.exit(0); // node-datachannel keeps the loop alive for a few seconds after its last connection
