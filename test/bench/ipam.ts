/**
 * npm run bench:ipam [-- --nodes 16]
 * npm run bench:ipam -- --chaos [--seed 1] [--nodes 5] [--sim-minutes 30] [--reclaim-after 30] [--signed]
 *  chaos mode (simulated mesh of the property tests, seeded, bounded simulated time, 500 ms gossip
 *  rounds): random partitions of 1-4 nodes, kill -9 + restart from the persisted snapshot, allocation
 *  bursts and frees, /28 blocks so that grants and reclaims happen within minutes. Prints allocations
 *  attempted / confirmed, latency p50/p99 (simulated time from the request to the address; retried every
 *  round like the agent does, given up after 30 s) during partitions, right after heals, right after a
 *  node's own restart and in steady state, addresses revoked, invariant violations (must be 0) — and the
 *  same allocation schedule without faults as the baseline.
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
import { prng, Sim, type SimNode, TICK } from "../property/ipam-harness.js";
import { children, freePort, spawnCli, stopAll } from "./util.js";

const { values } = parseArgs({
  options: {
    nodes: { type: "string" },
    allocs: { type: "string", default: "2000" },
    chaos: { type: "boolean", default: false },
    seed: { type: "string", default: "1" },
    "sim-minutes": { type: "string", default: "30" },
    "reclaim-after": { type: "string", default: "30" },
    signed: { type: "boolean", default: false },
  },
});
const N = Number(values.nodes ?? (values.chaos ? 5 : 16));
const ALLOCS = Number(values.allocs);

if (values.chaos) {
  const seed = Number(values.seed);
  const R = Number(values["reclaim-after"]) * 1000;
  const rounds = Math.ceil((Number(values["sim-minutes"]) * 60_000) / TICK);
  const faulty = chaos(seed, R, rounds, true);
  const calm = chaos(seed, R, rounds, false);
  const pct = (xs: number[], q: number) => (xs.length ? [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(q * xs.length))]! : NaN);
  const fmt = (xs: number[]) => (xs.length ? `p50 ${(pct(xs, 0.5) / 1000).toFixed(1)} s, p99 ${(pct(xs, 0.99) / 1000).toFixed(1)} s (n=${xs.length})` : "n=0");
  process.stdout.write(
    `chaos (simulated${values.signed ? ", signed" : ""}, seed ${seed}, ${N} nodes, --reclaim-after ${R / 1000}s, /28 blocks, ${((rounds * TICK) / 60_000).toFixed(0)} min simulated, ${faulty.events} faults)\n` +
      `  allocations attempted ${faulty.attempted}, confirmed ${faulty.confirmed}, given up after 30 s ${faulty.gaveUp}, caller crashed ${faulty.lost}\n` +
      `  latency during partitions:           ${fmt(faulty.lat.partition)}\n` +
      `  latency within 30 s after a heal:    ${fmt(faulty.lat.heal)}\n` +
      `  latency within 30 s after a restart: ${fmt(faulty.lat.restart)}\n` +
      `  latency otherwise:                   ${fmt(faulty.lat.steady)}\n` +
      `  claims ${faulty.claims}, grants ${faulty.grants}; addresses revoked ${faulty.revoked}; invariant violations ${faulty.violations.length}${faulty.violations.length ? ` (first: ${faulty.violations[0]})` : ""}\n` +
      `baseline (same allocation schedule, no faults): attempted ${calm.attempted}, confirmed ${calm.confirmed}, latency ${fmt([...calm.lat.steady, ...calm.lat.partition, ...calm.lat.heal, ...calm.lat.restart])}\n`,
  );
  process.exit(faulty.violations.length === 0 ? 0 : 1);
}

/** One seeded chaos run over the simulated mesh; with faults=false the same allocation schedule runs without faults. */
function chaos(seed: number, R: number, rounds: number, faults: boolean) {
  const sched = prng(seed * 7 + 1); // the allocation schedule: identical with and without faults
  const fr = prng(seed * 13 + 5); // the fault schedule
  const sim = new Sim(prng(seed), { range: "10.40.0.0/22", blockPrefix: 28, reclaimAfterMs: R, safetyMarginMs: R / 5, resyncMs: 15_000, contactMs: 5_000, claimSettleMs: 10_000, bootstrapWaitMs: 0, requestTimeoutMs: 5_000, syncIntervalMs: 30_000 });
  sim.dupRate = 0;
  sim.signed = values.signed === true; // real Ed25519 identities, every record signed and verified
  sim.add({ mayFound: true });
  sim.run(2);
  for (let i = 1; i < N; i++) sim.add({ mayFound: false });
  sim.run(20);
  const r = { attempted: 0, confirmed: 0, gaveUp: 0, lost: 0, revoked: 0, claims: 0, grants: 0, events: 0, violations: [] as string[], lat: { partition: [] as number[], heal: [] as number[], restart: [] as number[], steady: [] as number[] } };
  const pending: { sn: SimNode; pod: string; t0: number; phase: keyof typeof r.lat }[] = [];
  let partitionUntil = -1;
  let healedAt = -Infinity;
  const restartedAt = new Map<string, number>();
  let podSeq = 0;
  const check = () => {
    try {
      sim.checkSafety();
    } catch (e) {
      r.violations.push((e as Error).message.split("\n")[0]!);
    }
  };
  for (let round = 0; round < rounds; round++) {
    // allocation schedule: bursts and frees (same in both runs)
    const x = sched();
    const who = sim.nodes[Math.floor(sched() * sim.nodes.length)]!;
    const burst = 1 + Math.floor(sched() * 6);
    if (x < 0.08) {
      for (let k = 0; k < burst; k++) {
        r.attempted++;
        const phase = sim.now < partitionUntil ? "partition" : sim.now - healedAt < 30_000 ? "heal" : sim.now - (restartedAt.get(who.id) ?? -Infinity) < 30_000 ? "restart" : "steady";
        pending.push({ sn: who, pod: `c${++podSeq}`, t0: sim.now, phase });
      }
    } else if (x < 0.12 && who.node) {
      for (const pod of [...who.node.allocations().keys()].slice(0, burst)) sim.release(who, pod);
    }
    // fault schedule
    if (faults) {
      const f = fr();
      if (f < 0.004 && sim.now >= partitionUntil) {
        const k = 1 + Math.floor(fr() * Math.min(4, N - 1));
        const cut = new Set<number>();
        while (cut.size < k) cut.add(Math.floor(fr() * N));
        sim.nodes.forEach((n, i) => (n.group = cut.has(i) ? 1 : 0));
        sim.syncLinks();
        partitionUntil = sim.now + Math.floor(fr() * 2.5 * R); // up to 2.5 x reclaim-after
        r.events++;
      } else if (f < 0.006) {
        const live = sim.live();
        if (live.length > 1) {
          const v = live[Math.floor(fr() * live.length)]!;
          for (const p of pending) if (p.sn === v) r.lost++;
          pending.splice(0, pending.length, ...pending.filter((p) => p.sn !== v));
          sim.crash(v); // kill -9: no goodbye, state as last persisted
          r.events++;
        }
      }
      if (partitionUntil >= 0 && sim.now >= partitionUntil) {
        for (const n of sim.nodes) n.group = 0;
        sim.syncLinks();
        partitionUntil = -1;
        healedAt = sim.now;
      }
      for (const n of sim.nodes) {
        if (!n.node && !n.gone && fr() < 0.05) {
          sim.restart(n);
          restartedAt.set(n.id, sim.now);
        }
      }
    }
    // the agent retries every round until it has an address or 30 s passed
    for (const p of [...pending]) {
      if (!p.sn.node) continue;
      const ip = sim.allocate(p.sn, p.pod);
      if (ip !== null) {
        r.confirmed++;
        r.lat[p.phase].push(sim.now - p.t0);
        pending.splice(pending.indexOf(p), 1);
      } else if (sim.now - p.t0 >= 30_000) {
        r.gaveUp++;
        pending.splice(pending.indexOf(p), 1);
      }
    }
    sim.tick(check);
    try {
      sim.checkKept();
    } catch (e) {
      r.violations.push((e as Error).message);
    }
  }
  r.revoked = sim.revoked;
  for (const n of sim.live()) {
    const c = n.node!.status(sim.now).counters;
    r.claims += c.claims;
    r.grants += c.grants;
  }
  return r;
}

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
