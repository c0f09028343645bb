/**
 * npm run bench:datapath  (root)
 * Two agents in two namespaces behind one LAN, a pod on each; for each transport pairing
 * (werift-werift, native-native, werift-native): iperf3 TCP pod -> pod (3 runs, median) and ping RTT
 * (idle, median of 20), plus agent RSS under load. Baseline in the same run: kernel VXLAN between the
 * same two node namespaces. Prints Mbit/s and ratios; never fails on a number.
 *   --seconds N   iperf3 duration per run (default 5)    --runs N   runs per path (default 3)
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
    const { stdout } = await sh(clientNs, "iperf3", ["-c", serverIp, "-t", String(SECONDS), "-J"], (SECONDS + 20) * 1000);
    const j = JSON.parse(stdout) as { end: { sum_received: { bits_per_second: number } } };
    return { mbps: j.end.sum_received.bits_per_second / 1e6, rss };
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
const results: Result[] = [];

async function vxlanBaseline(lab: MeshLab): Promise<Result> {
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
    return await measure("kernel VXLAN (node ns to node ns)", a.ns, b.ns, "10.88.0.2");
  } finally {
    for (const n of [a, b]) execFileSync("ip", ["-n", n.ns, "link", "del", "vx0"]);
  }
}

async function overlay(kinds: [string, string]): Promise<Result> {
  const lab = new MeshLab(2);
  try {
    await lab.setup();
    await lab.startSignal();
    lab.nodes.forEach((n, i) => lab.startAgent(n, ["--transport", kinds[i]!, "--log-level", "warn"]));
    await until(async () => (await Promise.all(lab.nodes.map((n) => lab.status(n)))).every((s) => s.peers.some((p) => p.state === "connected")), 30_000, "mesh");
    const pa = await lab.addPod(lab.nodes[0]!, "pa");
    const pb = await lab.addPod(lab.nodes[1]!, "pb");
    await until(async () => (await sh(pa.name, "ping", ["-c", "1", "-W", "1", pb.ip], 5000)).stdout.includes("1 received"), 20_000, "pod ping");
    if (results.length === 0) results.push(await vxlanBaseline(lab));
    return await measure(`weftnet ${kinds[0]} -> ${kinds[1]} (pod to pod)`, pa.name, pb.name, pb.ip, lab.nodes.map((n) => n.proc!.pid!));
  } finally {
    await lab.close();
  }
}

const pairings: [string, string][] = [
  ["native", "native"],
  ["werift", "werift"],
  ["werift", "native"],
];
for (const p of pairings) {
  if (values.only && !`${p[0]}-${p[1]}`.includes(values.only)) continue;
  process.stderr.write(`measuring ${p[0]} -> ${p[1]} ...\n`);
  results.push(await overlay(p));
}
const base = results[0]!;
process.stdout.write(`\niperf3 TCP, ${RUNS} x ${SECONDS} s, median; ping: 20 x 50 ms, average\n`);
process.stdout.write(`${"path".padEnd(40)} ${"Mbit/s".padStart(9)} ${"vs VXLAN".padStart(9)} ${"ping ms".padStart(8)}  runs / agent RSS under load (MiB)\n`);
for (const r of results) {
  process.stdout.write(
    `${r.label.padEnd(40)} ${r.mbps.toFixed(0).padStart(9)} ${(r.mbps / base.mbps).toFixed(4).padStart(9)} ${r.rtt.toFixed(3).padStart(8)}  [${r.runs.map((x) => x.toFixed(0)).join(", ")}]${r.rss.length ? ` rss ${r.rss.map((x) => x.toFixed(0)).join("/")}` : ""}\n`,
  );
}
