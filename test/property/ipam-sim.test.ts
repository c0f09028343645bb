// Property test: random joins, leaves, crashes, restarts from persisted snapshots, permanent deaths,
// partitions, heals, link cuts (partial mesh), link flaps (in-flight loss), duplication and reordering
// over 3-12 simulated nodes with a manual clock. After EVERY tick: no block allocatable by two nodes,
// no handed-out address held by a non-stale other node (and each node's own invariants, checked inside
// IpamNode on entry and exit); a node that had a pin confirmed still owns a block (is a member). After
// heal + quiet time: one view everywhere, every node can allocate, no address held twice, every live node
// that ever had a confirmed pin is a member in every view.
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { SIM_CFG, Sim, type SimNode, TICK, prng } from "./ipam-harness.js";

type Op =
  | { k: "alloc"; n: number; c: number }
  | { k: "release"; n: number }
  | { k: "wait"; t: number }
  | { k: "crash"; n: number }
  | { k: "restart"; n: number }
  | { k: "die"; n: number }
  | { k: "leave"; n: number }
  | { k: "join" }
  | { k: "partition"; g: number[] }
  | { k: "heal" }
  | { k: "cut"; a: number; b: number }
  | { k: "flap"; a: number; b: number }
  | { k: "clock"; n: number; d: number }
  | { k: "loss"; p: number };

const R_TICKS = Math.ceil(SIM_CFG.reclaimAfterMs / TICK);
const ix = fc.nat(1000);
const op: fc.Arbitrary<Op> = fc.oneof(
  { weight: 5, arbitrary: fc.record({ k: fc.constant("alloc" as const), n: ix, c: fc.integer({ min: 1, max: 8 }) }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant("release" as const), n: ix }) },
  { weight: 5, arbitrary: fc.record({ k: fc.constant("wait" as const), t: fc.integer({ min: 1, max: Math.ceil(R_TICKS * 1.5) }) }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant("crash" as const), n: ix }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant("restart" as const), n: ix }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("die" as const), n: ix }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("leave" as const), n: ix }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant("join" as const) }) },
  { weight: 3, arbitrary: fc.record({ k: fc.constant("partition" as const), g: fc.array(fc.integer({ min: 0, max: 2 }), { minLength: 16, maxLength: 16 }) }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant("heal" as const) }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("cut" as const), a: ix, b: ix }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant("flap" as const), a: ix, b: ix }) },
  // a node's clock steps (NTP, suspend/resume): forward or back by up to 1.5 R
  { weight: 1, arbitrary: fc.record({ k: fc.constant("clock" as const), n: ix, d: fc.integer({ min: -Math.ceil(SIM_CFG.reclaimAfterMs * 1.5), max: Math.ceil(SIM_CFG.reclaimAfterMs * 1.5) }) }) },
  // random loss of single messages from now on (0-30%)
  { weight: 1, arbitrary: fc.record({ k: fc.constant("loss" as const), p: fc.integer({ min: 0, max: 30 }) }) },
);

function pick<T>(xs: T[], n: number): T | undefined {
  return xs.length === 0 ? undefined : xs[n % xs.length];
}

function pairKey(a: string, b: string): string {
  return a < b ? `${a}|${b}` : `${b}|${a}`;
}

export function runScenario(seed: number, initial: number, ops: Op[]): Sim {
  const sim = new Sim(prng(seed));
  sim.add({ mayFound: true });
  sim.run(1);
  for (let i = 1; i < initial; i++) sim.add({ mayFound: false });
  sim.run(4);
  for (const o of ops) {
    const alive = sim.live();
    const present = sim.nodes.filter((n) => !n.gone);
    switch (o.k) {
      case "alloc": {
        const sn = pick(alive, o.n);
        if (sn) for (let i = 0; i < o.c; i++) sim.allocate(sn);
        break;
      }
      case "release": {
        const sn = pick(alive, o.n);
        const pods = sn ? [...sn.node!.allocations().keys()] : [];
        const pod = pick(pods, o.n);
        if (sn && pod) sim.release(sn, pod);
        break;
      }
      case "wait":
        sim.run(o.t);
        break;
      case "crash": {
        const sn = pick(alive, o.n);
        if (sn && alive.length > 1) sim.crash(sn);
        break;
      }
      case "restart": {
        const sn = pick(present.filter((n) => !n.node), o.n);
        if (sn) {
          sim.restart(sn);
          sim.checkSafety();
          sim.allocate(sn); // a CNI call right after the agent restarts, before any gossip arrived
        }
        break;
      }
      case "die": {
        const sn = pick(alive, o.n);
        if (sn && alive.length > 2) sim.crash(sn, true);
        break;
      }
      case "leave": {
        const sn = pick(alive, o.n);
        if (sn && alive.length > 2) {
          const r = sn.node!.leave(sim.now);
          if (r.ok) sim.departed.add(sn.id);
          sim.apply(sn, r.output);
          if (r.ok) {
            sim.deliver();
            sim.crash(sn, true);
          }
        }
        break;
      }
      case "join":
        if (present.length < 12) {
          const g = pick(alive, sim.nodes.length)?.group ?? 0;
          sim.add({ mayFound: false, group: g });
        }
        break;
      case "partition":
        sim.nodes.forEach((n, i) => (n.group = o.g[i % o.g.length]!));
        sim.syncLinks();
        break;
      case "clock": {
        const sn = pick(sim.nodes, o.n);
        if (sn) sim.skew.set(sn.id, (sim.skew.get(sn.id) ?? 0) + o.d);
        break;
      }
      case "loss":
        sim.lossRate = o.p / 100;
        break;
      case "heal":
        for (const n of sim.nodes) n.group = 0;
        sim.cuts.clear();
        sim.syncLinks();
        break;
      case "cut":
      case "flap": {
        const a = pick(alive, o.a);
        const b = pick(alive, o.b);
        if (a && b && a !== b) {
          if (o.k === "cut") {
            sim.cuts.add(pairKey(a.id, b.id));
            sim.syncLinks();
          } else sim.flap(a, b);
        }
        break;
      }
    }
    sim.checkSafety();
    sim.checkKept();
    sim.checkMembers();
    sim.tick();
  }
  return sim;
}

export function healAndCheck(sim: Sim): void {
  sim.lossRate = 0;
  for (const n of sim.nodes) n.group = 0;
  sim.cuts.clear();
  for (const n of sim.nodes) if (!n.node && !n.gone) sim.restart(n);
  sim.syncLinks();
  sim.run(R_TICKS + 10);
  // members that died for good: the operator releases them
  const live = sim.live();
  const goneIds = new Set(sim.nodes.filter((n) => n.gone).map((n) => n.id));
  const first = [...live].sort((a, b) => (a.id < b.id ? -1 : 1))[0]!;
  // (the member list: a dead member counts in every majority, whether it still owns blocks or not)
  for (const member of first.node!.memberList()) {
    if (goneIds.has(member)) {
      sim.departed.add(member);
      sim.apply(first, first.node!.forceRelease(member, sim.now));
      goneIds.delete(member);
    }
  }
  sim.run(2 * R_TICKS + 10);
  // converged: one epoch, one table (grants to late requesters may still be in flight: allow a bounded tail)
  for (let extra = 0; extra < 2 * R_TICKS && new Set(live.map((n) => n.node!.digest())).size > 1; extra++) sim.run(1);
  expect(new Set(live.map((n) => n.node!.epochInfo()?.id)).size).toBe(1);
  const digests = new Set(live.map((n) => n.node!.digest()));
  if (digests.size !== 1) throw new Error(`views differ after quiet time: ${JSON.stringify(live.map((n) => [n.id, n.node!.digest()]))}`);
  // membership is stable: every live node that ever had a confirmed pin is a member in every view, and
  // the member list is the same everywhere and lost nobody who did not leave or get released
  sim.checkMembers();
  sim.checkMemberLists();
  for (const n of live) {
    const owners = new Set(n.node!.view().map((e) => e[1]));
    for (const m of live) if (sim.everPinned.has(m.id)) expect(owners.has(m.id), `${m.id} (had a confirmed pin) is a member in ${n.id}'s view`).toBe(true);
  }
  // nothing was revoked: every node still holds every address it was handed and did not release
  sim.checkKept();
  expect(sim.revoked).toBe(0);
  // no address held twice
  const holder = new Map<string, string>();
  for (const n of live)
    for (const ip of n.node!.allocations().values()) {
      expect(holder.get(ip), `${ip} held by ${holder.get(ip)} and ${n.id}`).toBeUndefined();
      holder.set(ip, n.id);
    }
  // every node can allocate (allowing a few ticks to get a block if it owns none / is full)
  for (const n of live) {
    let ip: string | null = null;
    for (let tries = 0; tries < 12 && ip === null; tries++) {
      ip = sim.allocate(n as SimNode, `final-${n.id}`);
      if (ip === null) sim.run(1);
    }
    if (ip === null) {
      const free = live.reduce((s, x) => s + x.node!.status(sim.now).blocks.filter((b) => b.mine && b.free === 13).length, 0);
      // with pods pinning blocks, the range can genuinely be full: then that must be the reason
      if (free > 1) throw new Error(`${n.id} cannot allocate after heal: ${n.node!.status(sim.now).reason}; whole free blocks in cluster: ${free}`);
    }
  }
}

// Counterexamples fast-check found earlier (each one broke a previous version of the design):
//  1. two heirs on both sides of a fresh partition claimed with leases from old contacts -> majority promises
//  2. a proposer's self-promise outlived its proposal and doomed the owner's blocks forever -> `until`
//  3. a granter kept adding members in its lease tail; the other side's stale view looked like a
//     majority -> grants need majority promises, promised grantees count as members
//  4. a grant still in flight when the quiet time ended (the check now allows a bounded tail)
//  5. a grant and a claim of one block version both written (the granter went silent before its grant
//     reached an acceptor, which then promised the claim); both new owners pinned the next version, one
//     confirmed: two pins at one version refused every batch for good -> per-entry refusal, the
//     confirmed owner pins again one version higher (seed 1032526987 of a 200-run default)
//  6. a pin counted the recording of a grantee whose grant was only promised (not written): after a grant
//     and a claim of one block version were both written in a 3|3|3 split, the grantee's pin was confirmed
//     by 3 of 5 "members" ({granter, grantee, promised grantee}) disjoint from the claim's majority, and
//     both sides allocated from the block -> pins count recordings from owners only
const REGRESSIONS: [number, number, Op[]][] = [
  [1553934982, 9, [{ k: "alloc", n: 0, c: 1 }, { k: "alloc", n: 0, c: 1 }, { k: "partition", g: [1, 0, 2, 1, 0, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0] }, { k: "wait", t: 20 }, { k: "alloc", n: 0, c: 1 }, { k: "crash", n: 0 }, { k: "restart", n: 0 }, { k: "flap", a: 0, b: 0 }, { k: "alloc", n: 0, c: 1 }]],
  [0, 6, [{ k: "die", n: 0 }, { k: "wait", t: 2 }, { k: "restart", n: 0 }, { k: "wait", t: 1 }, { k: "crash", n: 0 }, { k: "leave", n: 0 }, { k: "partition", g: [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] }, { k: "wait", t: 7 }]],
  [0, 4, [{ k: "partition", g: [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] }, { k: "wait", t: 7 }, { k: "partition", g: [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] }, { k: "wait", t: 3 }, { k: "crash", n: 0 }, { k: "alloc", n: 0, c: 1 }, { k: "heal" }]],
  [1602047960, 11, [{ k: "partition", g: [1, 1, 0, 2, 2, 2, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0] }, { k: "join" }, { k: "wait", t: 14 }, { k: "partition", g: [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] }, { k: "alloc", n: 0, c: 1 }, { k: "cut", a: 0, b: 0 }]],
  [1879048179, 10, [{ k: "flap", a: 155, b: 684 }, { k: "partition", g: [0, 1, 1, 1, 1, 1, 2, 0, 0, 2, 0, 0, 0, 0, 0, 0] }, { k: "die", n: 0 }, { k: "crash", n: 478 }, { k: "heal" }, { k: "restart", n: 0 }, { k: "join" }, { k: "wait", t: 15 }, { k: "release", n: 0 }, { k: "alloc", n: 0, c: 1 }, { k: "join" }, { k: "cut", a: 463, b: 0 }, { k: "alloc", n: 0, c: 1 }]],
  [1008712345, 9, [{ k: "die", n: 425 }, { k: "cut", a: 0, b: 0 }, { k: "partition", g: [1, 2, 0, 2, 0, 0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0] }, { k: "wait", t: 14 }, { k: "flap", a: 0, b: 0 }, { k: "alloc", n: 0, c: 1 }, { k: "partition", g: [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] }, { k: "cut", a: 0, b: 0 }, { k: "release", n: 0 }]],
];

describe("ipam simulated mesh (property)", () => {
  it("never hands out an address twice; converges and allocates after heal", () => {
    const t0 = Date.now();
    fc.assert(
      fc.property(fc.nat(), fc.integer({ min: 3, max: 12 }), fc.array(op, { minLength: 5, maxLength: 30 }), (seed, initial, ops) => {
        const sim = runScenario(seed, initial, ops);
        healAndCheck(sim);
      }),
      { numRuns: Number(process.env.IPAM_SIM_RUNS ?? 200), examples: REGRESSIONS },
    );
    console.log(`ipam sim: ${process.env.IPAM_SIM_RUNS ?? 200} cases in ${Date.now() - t0} ms`);
  }, Math.max(240_000, Number(process.env.IPAM_SIM_RUNS ?? 200) * 1000));
});

describe("ipam membership does not depend on holding a block (regression)", () => {
  // The gap docs/ipam.md listed before the member list: a node granted a block but cut off before a
  // majority recorded its first pin lost that block to a reclaim and, with it, its membership (members
  // were derived from the owners) — a 3|3 split of the 6 nodes then looked like 3 of 5 on one side.
  it.each([
    [3, false],
    [11, false],
    [29, false],
    [5, true],
    [17, true],
  ])("a node granted then cut off before its pin was recorded stays a member everywhere (seed %i, signed %s)", (seed, signed) => {
    const sim = new Sim(prng(seed));
    sim.dupRate = 0;
    sim.signed = signed;
    sim.add({ mayFound: true });
    sim.run(1);
    for (let i = 1; i < 5; i++) sim.add({ mayFound: false });
    sim.run(20);
    const old = sim.live();
    const n = sim.add({ mayFound: false });
    // the tick its grant reaches it: it writes its first pin, but nobody has recorded it yet
    for (let t = 0; t < 40 && n.node!.ownedBlocks().length === 0; t++) sim.run(1);
    const granted = n.node!.ownedBlocks();
    expect(granted.length, "the newcomer got a grant").toBeGreaterThan(0);
    expect(n.node!.snapshot().pinned ?? [], "its first pin is not confirmed yet").toEqual([]);
    n.group = 1; // cut off now: what it sent in this tick (its pin) is lost with the links
    sim.syncLinks();
    sim.run(3 * R_TICKS);
    for (const sn of old) {
      // its block was reclaimed (unpinned free space of a silent node) ...
      for (const i of granted) expect(sn.node!.view()[i]![1], `${sn.id}: block ${i} reclaimed`).not.toBe(n.id);
      expect(sn.node!.view().some(([, owner]) => owner === n.id), `${sn.id}: the newcomer owns nothing`).toBe(false);
      // ... but it is still a member, and counts in every majority
      expect(sn.node!.memberList(), `${sn.id}'s member list`).toContain(n.id);
      expect(sn.node!.status(sim.at(sn)).ownership.members).toBe(6);
    }
    sim.checkMembers();
    // a restart keeps it (the list is in the snapshot) ...
    const r = old[1]!;
    sim.crash(r);
    sim.restart(r);
    expect(r.node!.memberList(), "after a restart").toContain(n.id);
    // ... and a node that joins now, and never saw the grant (the block is someone else's by now), learns
    // it from the member list — in a signed cluster by checking the grant's majority promises itself
    const late = sim.add({ mayFound: false });
    for (let t = 0; t < 4 * R_TICKS && late.node!.ownedBlocks().length === 0; t++) sim.run(1);
    expect(late.node!.ownedBlocks().length, "the late joiner got a block").toBeGreaterThan(0);
    sim.run(4);
    expect(late.node!.memberList(), "the late joiner's member list").toContain(n.id);
    expect(late.node!.status(sim.at(late)).ownership.members).toBe(7);
    // heal: one table, one member list, and the returning node gets a new block and allocates
    n.group = 0;
    sim.syncLinks();
    let ip: string | null = null;
    for (let t = 0; t < 4 * R_TICKS && ip === null; t++) {
      sim.run(1);
      ip = sim.allocate(n);
    }
    expect(ip, "the returning member allocates").not.toBeNull();
    for (let t = 0; t < 4 * R_TICKS && new Set(sim.live().map((sn) => sn.node!.digest())).size > 1; t++) sim.run(1);
    expect(new Set(sim.live().map((sn) => sn.node!.digest())).size).toBe(1);
    sim.checkMembers();
    sim.checkMemberLists();
    expect(sim.revoked).toBe(0);
  });
});
