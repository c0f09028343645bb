/**
 * TUN-to-TUN throughput through the data-plane codec (root). Prints figures, never asserts on time.
 *
 *   npx tsc -p . ; node dist/test/bench/tun.js [seconds=5] [runs=3]      (or: npm run bench:tun)
 *
 * Two namespaces, each with a TUN opened by this process and wired through route lookup -> FrameEncoder
 * -> decodeFrame -> writeBatch (test/e2e/tun-lab.ts). iperf3 TCP A -> B, median of N runs, with GSO
 * (IFF_VNET_HDR + TSO) and without; plus a veth pair between two namespaces as the kernel baseline.
 * Needs iperf3 (apt-get install iperf3).
 */
import { execFileSync, spawnSync } from "node:child_process";
import { createTunLab, isRoot, waitForOutput, type TunLab } from "../e2e/tun-lab.js";

const seconds = Number(process.argv[2] ?? 5);
const runs = Number(process.argv[3] ?? 3);

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? NaN;
}

async function iperfThroughLab(lab: TunLab): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < runs; i++) {
    const srv = lab.run(lab.b.ns, "iperf3", ["-s", "-1", "--forceflush", "-B", lab.b.addr]);
    await waitForOutput(srv, "Server listening");
    const cli = lab.run(lab.a.ns, "iperf3", ["-c", lab.b.addr, "-t", String(seconds), "-J"]);
    const code = await cli.exited;
    await srv.exited;
    if (code !== 0) throw new Error(`iperf3 failed: ${cli.stdout().slice(-500)} ${cli.stderr()}`);
    const j = JSON.parse(cli.stdout()) as { end: { sum_received: { bits_per_second: number } } };
    out.push(j.end.sum_received.bits_per_second / 1e6);
  }
  return out;
}

function iperfVeth(): number[] {
  const id = Math.random().toString(36).slice(2, 8);
  const [na, nb] = [`wt-${id}-va`, `wt-${id}-vb`];
  const ip = (...a: string[]) => execFileSync("ip", a, { stdio: "ignore" });
  const out: number[] = [];
  try {
    ip("netns", "add", na);
    ip("netns", "add", nb);
    ip("link", "add", `wv${id}a`, "netns", na, "type", "veth", "peer", "name", `wv${id}b`, "netns", nb);
    ip("-n", na, "addr", "add", "10.98.0.1/24", "dev", `wv${id}a`);
    ip("-n", nb, "addr", "add", "10.98.0.2/24", "dev", `wv${id}b`);
    ip("-n", na, "link", "set", `wv${id}a`, "up");
    ip("-n", nb, "link", "set", `wv${id}b`, "up");
    for (let i = 0; i < runs; i++) {
      // iperf3 -D would outlive us; run the server one-off in the background of a shell in the namespace.
      const r = spawnSync("setpriv", ["--pdeathsig", "KILL", "ip", "netns", "exec", nb, "sh", "-c",
        `iperf3 -s -1 -B 10.98.0.2 >/dev/null & sleep 0.3; ip netns exec ${na} iperf3 -c 10.98.0.2 -t ${seconds} -J; wait`], { encoding: "utf8" });
      const j = JSON.parse(r.stdout) as { end: { sum_received: { bits_per_second: number } } };
      out.push(j.end.sum_received.bits_per_second / 1e6);
    }
  } finally {
    spawnSync("ip", ["netns", "del", na]);
    spawnSync("ip", ["netns", "del", nb]);
  }
  return out;
}

async function main(): Promise<void> {
  if (!isRoot) {
    console.log("bench/tun: needs root (TUN devices, network namespaces); skipped");
    return;
  }
  if (spawnSync("iperf3", ["--version"]).status !== 0) {
    console.log("bench/tun: iperf3 not installed (apt-get install iperf3); skipped");
    return;
  }
  const fmt = (xs: number[]) => `median ${median(xs).toFixed(0)} Mbit/s  (runs: ${xs.map((x) => x.toFixed(0)).join(", ")})`;
  console.log(`TUN-to-TUN through the frame codec, iperf3 TCP, ${seconds} s x ${runs} runs`);
  const veth = iperfVeth();
  console.log(`  kernel veth (baseline)          ${fmt(veth)}`);
  for (const [label, offload] of [["GSO (IFF_VNET_HDR + TSO)", true], ["no GSO (offload off)", false]] as const) {
    const lab = await createTunLab({ offload });
    try {
      const xs = await iperfThroughLab(lab);
      const s = lab.stats;
      console.log(`  ${label.padEnd(31)} ${fmt(xs)}  ratio vs veth ${(median(xs) / median(veth)).toFixed(3)}`);
      console.log(`    ${s.packets} packets read, ${s.gsoPackets} GSO, largest ${s.maxPacket} B, ${s.frames} frames, up to ${s.maxFramePackets} packets/frame, drops ${JSON.stringify(s.drops.snapshot())}`);
    } finally {
      await lab.close();
    }
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exitCode = 1;
});
