/**
 * npm run bench:ipam [-- --nodes 16]
 *  1. allocations/s on one node: the IPAM core alone, and through the agent's driver with every
 *     allocation persisted atomically (write + fsync + rename) before it is returned.
 *  2. time for a joining node to own a block (first pod address) in a mesh of N real agent processes.
 *  3. convergence after a partition heals: the simulated mesh of the property tests (one gossip round
 *     per 500 ms tick), N nodes split in two halves that both allocate, then healed.
 * Prints figures; never fails on a time.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { apiRequest } from "../../agent/api-client.js";
import { apiSocketPath, writeFileAtomic } from "../../agent/state.js";
import { IpamNode } from "../../src/ipam/index.js";
import { prng, Sim, TICK } from "../property/ipam-harness.js";
import { children, freePort, spawnCli, stopAll } from "./util.js";

const { values } = parseArgs({ options: { nodes: { type: "string", default: "16" }, allocs: { type: "string", default: "2000" } } });
const N = Number(values.nodes);
const ALLOCS = Number(values.allocs);

// ---- 1. allocations/s -------------------------------------------------------------------------
{
  const now = 1_000_000;
  const node = new IpamNode({ id: "0000000000000001", bootstrapWaitMs: 0, resyncMs: 0 }, now);
  for (let t = 0; t < 5 && !node.status(now + t * 1000).canAllocate; t++) node.handle({ type: "tick" }, now + t * 1000);
  const t0 = performance.now();
  let ok = 0;
  for (let i = 0; i < ALLOCS; i++) if (node.allocate(`p${i}`, now + 5000).ok) ok++;
  const core = ok / ((performance.now() - t0) / 1000);
  const dir = mkdtempSync(join(tmpdir(), "weft-ipam-bench-"));
  const t1 = performance.now();
  const n = Math.min(ALLOCS, 500);
  for (let i = 0; i < n; i++) {
    const r = node.allocate(`q${i}`, now + 6000);
    if (r.ok) writeFileAtomic(join(dir, "ipam.json"), JSON.stringify(node.snapshot()));
  }
  const persisted = n / ((performance.now() - t1) / 1000);
  rmSync(dir, { recursive: true, force: true });
  process.stdout.write(`allocations/s on one node: ${core.toFixed(0)} (IPAM core, ${ok} allocations), ${persisted.toFixed(0)} (each persisted atomically with fsync before returning)\n`);
}

// ---- 3. partition heal (simulated) -------------------------------------------------------------
{
  const sim = new Sim(prng(42));
  sim.dupRate = 0;
  sim.add({ mayFound: true });
  sim.run(4);
  for (let i = 1; i < N; i++) sim.add({ mayFound: false });
  sim.run(20);
  for (const sn of sim.live()) sim.allocate(sn);
  sim.run(10);
  // Split 5/8 : 3/8 so one side keeps a majority and changes ownership (full nodes ask for blocks);
  // the minority freezes by design. Then heal and count gossip rounds until every view is identical.
  const cut = Math.ceil((N * 5) / 8);
  sim.nodes.forEach((sn, i) => (sn.group = i < cut ? 0 : 1));
  sim.syncLinks();
  sim.run(10);
  for (let k = 0; k < 20; k++) {
    for (const sn of sim.live().filter((x) => x.group === 0)) sim.allocate(sn);
    sim.run(2);
  }
  const changed = sim.live()[0]!.node!.status(sim.now).blocks.filter((b) => b.version > 1).length;
  sim.nodes.forEach((sn) => (sn.group = 0));
  sim.syncLinks();
  const view = (sn: (typeof sim.nodes)[0]) => JSON.stringify(sn.node!.status(sim.now).blocks.map((b) => [b.owner, b.version]));
  let ticks = 0;
  while (ticks < 400) {
    sim.tick();
    ticks++;
    const v0 = view(sim.live()[0]!);
    if (sim.live().every((sn) => view(sn) === v0)) break;
  }
  process.stdout.write(`convergence after a partition heals (simulated, ${N} nodes split ${cut}/${N - cut}, ${changed} blocks changed hands on the majority side, ${TICK} ms gossip rounds): ${ticks} rounds = ${((ticks * TICK) / 1000).toFixed(1)} s simulated\n`);
}

// ---- 2. joining node in a mesh of N real agents ----------------------------------------------
const root = mkdtempSync(join(tmpdir(), "weft-ipam-bench-"));
try {
  const port = await freePort();
  const stun = await freePort();
  const token = "bench-" + Math.random().toString(36).slice(2);
  spawnCli(["signal", "--listen", `127.0.0.1:${port}`, "--stun-port", String(stun), "--token", token]);
  await new Promise((r) => setTimeout(r, 500));
  const agentArgs = (name: string) => ["agent", "--signal", `ws://127.0.0.1:${port}`, "--token", token, "--name", name, "--state-dir", join(root, name), "--no-tun", "--loopback-only"];
  const alloc = (name: string, pod: string) => apiRequest<{ ip: string }>(apiSocketPath(join(root, name)), "POST", "/v1/ipam/allocate", { podId: pod, timeoutMs: 60_000 }, 70_000);
  for (let i = 0; i < N; i++) spawnCli(agentArgs(`n${i}`));
  const t0 = performance.now();
  for (;;) {
    const counts = await Promise.all(
      Array.from({ length: N }, (_, i) =>
        apiRequest<{ peers: { state: string }[] }>(apiSocketPath(join(root, `n${i}`)), "GET", "/v1/status", undefined, 5000).then(
          (s) => s.peers.filter((p) => p.state === "connected").length,
          () => 0,
        ),
      ),
    );
    if (counts.every((c) => c === N - 1)) break;
    if (performance.now() - t0 > 120_000) throw new Error("no full mesh after 120 s");
    await new Promise((r) => setTimeout(r, 200));
  }
  await Promise.all(Array.from({ length: N }, (_, i) => alloc(`n${i}`, "warmup")));
  process.stdout.write(`mesh of ${N} agents formed and every node owns a block after ${((performance.now() - t0) / 1000).toFixed(1)} s\n`);
  const t1 = performance.now();
  spawnCli(agentArgs("joiner"));
  let ip: string | undefined;
  while (!ip) {
    try {
      ip = (await alloc("joiner", "first-pod")).ip;
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  process.stdout.write(`joining node (process start -> first pod address, block granted through the mesh) in a ${N}-node mesh: ${((performance.now() - t1) / 1000).toFixed(2)} s (${ip})\n`);
} finally {
  await stopAll(children.slice(1)); // the agents, then the signaling server
  children[0]?.kill("SIGTERM");
  rmSync(root, { recursive: true, force: true });
}
