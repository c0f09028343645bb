/**
 * `npm run bench:nat` (root): across the NAT lab (test/e2e/nat-lab.ts)
 *   1. connection setup time per NAT pair: agent start (the later of the two) -> both sides report the
 *      link connected; median (and min/max) of --runs runs (default 5), a fresh lab per run;
 *   2. iperf3 TCP pod-to-pod throughput, cone + cone + an open site: the direct path, then the same pods
 *      via the open site's agent (UDP between the two cone routers dropped), with the direct figure of
 *      the same run as the baseline; then the server relay (a UDP-blocked site + an open site, its own lab),
 *      also as a ratio to that direct figure.
 * Prints figures; never fails on a time. Flags: --runs N, --seconds S (iperf3 duration, default 5),
 * --relay-rate MBIT (the signaling server's --relay-rate for the server-relay figure; default its own, 100).
 */
import { spawn } from "node:child_process";
import { NatLab, type NatHost, type NatKind } from "../e2e/nat-lab.js";

const isRoot = process.getuid?.() === 0;
const arg = (name: string, dflt: number) => {
  const i = process.argv.indexOf(name);
  return i > 0 && process.argv[i + 1] ? Number(process.argv[i + 1]) : dflt;
};
const RUNS = arg("--runs", 5);
const SECONDS = arg("--seconds", 5);
/** --relay-rate MBIT: the signaling server's per-agent relay cap for the server-relay figure (default: the server's, 100) */
const RELAY_RATE = arg("--relay-rate", 0);

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

let lastTypes = "";
async function setupTime(kinds: [NatKind, NatKind]): Promise<number | undefined> {
  const lab = new NatLab(kinds.map((nat) => ({ nat })));
  try {
    await lab.setup();
    await lab.startSignal();
    const [a, b] = lab.hosts as [NatHost, NatHost];
    lab.startAgent(a);
    lab.startAgent(b);
    const t0 = Math.max(a.startedAt!, b.startedAt!);
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      try {
        const [pa, pb] = await Promise.all([lab.peer(a, b), lab.peer(b, a)]);
        if (pa?.state === "connected" && pb?.state === "connected") {
          const ms = Date.now() - t0;
          lastTypes = pa.selected ? `${pa.selected.localType}->${pa.selected.remoteType}` : "?";
          return ms;
        }
      } catch {
        /* API not up yet */
      }
      await new Promise((r) => setTimeout(r, 25));
    }
    return undefined;
  } finally {
    await lab.close();
  }
}

async function iperf(lab: NatLab, client: string, server: string, serverIp: string): Promise<number> {
  const srv = spawn("nsenter", [`--net=/run/netns/${server}`, "--", "iperf3", "-s", "-1", "-B", serverIp], { stdio: "ignore" });
  try {
    await new Promise((r) => setTimeout(r, 400));
    const { stdout } = await lab.sh(client, "iperf3", ["-c", serverIp, "-t", String(SECONDS), "-J"], (SECONDS + 20) * 1000);
    const j = JSON.parse(stdout) as { end: { sum_received: { bits_per_second: number } } };
    return j.end.sum_received.bits_per_second / 1e6;
  } finally {
    srv.kill("SIGKILL");
  }
}

/**
 * The server-relay figure: a UDP-blocked site + an open site (a lab of its own, started after the direct and
 * via-peer figures), so the only path between the two agents is the signaling server's relay
 * (peers[].path "relay"); iperf3 pod -> pod over it. Mbit/s, or undefined when the link never went over the
 * relay (the path seen is in the printed line).
 */
async function measureServerRelay(): Promise<{ mbps: number | undefined; path: string }> {
  const lab = new NatLab([{ nat: "udp-blocked" }, { nat: "none" }]);
  try {
    await lab.setup();
    await lab.startSignal(RELAY_RATE > 0 ? { extra: ["--relay-rate", String(RELAY_RATE)] } : {});
    const [u, open] = lab.hosts as [NatHost, NatHost];
    for (const h of lab.hosts) lab.startAgent(h);
    let path = "none";
    const t = Date.now();
    while (Date.now() - t < 40_000) {
      const [pu, po] = await Promise.all([lab.peer(u, open).catch(() => undefined), lab.peer(open, u).catch(() => undefined)]);
      path = `${pu?.state}/${pu?.path}`;
      if (pu?.state === "connected" && pu.path === "relay" && po?.state === "connected" && po.path === "relay") break;
      await new Promise((r) => setTimeout(r, 200));
    }
    if (path !== "connected/relay") return { mbps: undefined, path };
    const p1 = await lab.addPod(u);
    const p2 = await lab.addPod(open);
    for (let i = 0; i < 40 && !(await lab.podPing(p1.name, p2.ip)); i++);
    return { mbps: await iperf(lab, p1.name, p2.name, p2.ip), path };
  } finally {
    await lab.close();
  }
}

async function throughput(): Promise<void> {
  const lab = new NatLab([{ nat: "cone" }, { nat: "cone" }, { nat: "none" }]);
  try {
    await lab.setup();
    await lab.startSignal();
    const [c1, c2, open] = lab.hosts as [NatHost, NatHost, NatHost];
    for (const h of lab.hosts) lab.startAgent(h);
    for (const h of lab.hosts) {
      const t = Date.now();
      while (Date.now() - t < 20_000) {
        if ((await lab.status(h).catch(() => undefined))?.peers.filter((p) => p.state === "connected").length === 2) break;
        await new Promise((r) => setTimeout(r, 200));
      }
    }
    const p1 = await lab.addPod(c1);
    const p2 = await lab.addPod(c2);
    const waitPing = async () => {
      for (let i = 0; i < 40 && !(await lab.podPing(p1.name, p2.ip)); i++);
    };
    await waitPing();
    const direct = await iperf(lab, p1.name, p2.name, p2.ip);
    // Drop UDP between the two cone sites at c1's router: the mesh routes c1 <-> c2 via the open site.
    const r1 = c1.site.router;
    lab.exec(r1, "iptables", ["-I", "FORWARD", "-d", c2.site.wan, "-p", "udp", "-j", "DROP"]);
    lab.exec(r1, "iptables", ["-I", "FORWARD", "-s", c2.site.wan, "-p", "udp", "-j", "DROP"]);
    const t = Date.now();
    while (Date.now() - t < 30_000 && (await lab.peer(c1, c2))?.path !== `via ${open.name}`) await new Promise((r) => setTimeout(r, 200));
    const path = (await lab.peer(c1, c2))?.path;
    await waitPing();
    const via = await iperf(lab, p1.name, p2.name, p2.ip);
    await lab.close(); // one lab at a time
    const relay = await measureServerRelay();
    const row = (label: string, mbps: number) => console.log(`  ${label.padEnd(34)} ${mbps.toFixed(0).padStart(6)} Mbit/s   ${(mbps / direct).toFixed(2)}`);
    console.log(`\niperf3 TCP pod -> pod, ${SECONDS} s each (transport: agent default); ratio to the direct figure`);
    row("direct (cone-cone)", direct);
    row(`via peer (${path})`, via);
    const relayLabel = `server relay (udp-blocked, rate ${RELAY_RATE > 0 ? RELAY_RATE : "100"})`;
    if (relay.mbps === undefined) console.log(`  ${relayLabel.padEnd(34)}      - (no relay link: ${relay.path})`);
    else row(relayLabel, relay.mbps);
  } finally {
    await lab.close();
  }
}

async function main(): Promise<void> {
  if (!isRoot) {
    console.log("bench:nat needs root (network namespaces, iptables, TUN); skipped");
    return;
  }
  const pairs: [NatKind, NatKind][] = [
    ["none", "none"],
    ["cone", "cone"],
    ["none", "symmetric"],
    ["cone", "symmetric"],
  ];
  console.log(`connection setup, agent start -> link connected on both sides, ${RUNS} runs per pair`);
  for (const kinds of pairs) {
    const times: number[] = [];
    let failed = 0;
    for (let i = 0; i < RUNS; i++) {
      const t = await setupTime(kinds);
      if (t === undefined) failed++;
      else times.push(t);
      if (t === undefined && failed >= 2 && times.length === 0) break; // a pair that cannot connect: no need for more runs
    }
    const fig = times.length ? `median ${median(times).toFixed(0)} ms (min ${Math.min(...times)}, max ${Math.max(...times)})` : "never connected directly";
    console.log(`  ${kinds.join("-").padEnd(16)} ${fig}${times.length ? ` [${lastTypes}]` : ""}${failed ? `; ${failed} run(s) did not connect in 30 s` : ""}`);
  }
  await throughput();
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(e);
    process.exit(0); // figures only: never fail
  },
);
