// Signed IPAM state (issue 12 items 2-3), property-tested: a simulated mesh where every node has a real
// Ed25519 identity, with random partitions, restarts, message loss, reordering, duplication and clock
// steps — and a rogue insider (a member with its own key and the cluster's trust, running the honest
// engine) that keeps injecting forged state: entries with huge versions, claims with made-up promises,
// transfers and pins "by" other nodes, force releases of live nodes, heartbeats for other nodes. Each
// must be refused and counted; so must forged member records (a made-up node "added" with promises the
// rogue signed itself, a live node "removed" as gone, or as leaving, in the rogue's name or the victim's);
// nothing the rogue says changes what another node owns or who is a member; the usual
// invariants (no block allocatable twice, nothing revoked, convergence) hold.
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { CTX_BEAT, CTX_ENTRY, CTX_MEMBER, CTX_PROMISE, CTX_RELEASE, CTX_REMOVE, releaseFields, removalFields, removeFields } from "../../src/ipam/signing.js";
import { generateIdentity, signFields } from "../../src/identity.js";
import { encodeIpamMessage, type EntryKind } from "../../src/ipam/index.js";
import { SIM_CFG, Sim, type SimNode, TICK, prng } from "./ipam-harness.js";

const OPERATOR = generateIdentity();
/** kinds of forgery (attack()) */
const ATTACKS = 12;
/** made-up nodes the rogue tries to add to the member list */
const FAKE = Array.from({ length: 4 }, () => generateIdentity());
const R_TICKS = Math.ceil(SIM_CFG.reclaimAfterMs / TICK);

type Op =
  | { k: "alloc"; n: number; c: number }
  | { k: "release"; n: number }
  | { k: "wait"; t: number }
  | { k: "crash"; n: number }
  | { k: "restart"; n: number }
  | { k: "partition"; g: number[] }
  | { k: "heal" }
  | { k: "clock"; n: number; d: number }
  | { k: "loss"; p: number }
  | { k: "attack"; a: number; n: number; b: number };

const ix = fc.nat(1000);
const op: fc.Arbitrary<Op> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ k: fc.constant("alloc" as const), n: ix, c: fc.integer({ min: 1, max: 6 }) }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("release" as const), n: ix }) },
  { weight: 4, arbitrary: fc.record({ k: fc.constant("wait" as const), t: fc.integer({ min: 1, max: R_TICKS }) }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("crash" as const), n: ix }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("restart" as const), n: ix }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant("partition" as const), g: fc.array(fc.integer({ min: 0, max: 1 }), { minLength: 8, maxLength: 8 }) }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("heal" as const) }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("clock" as const), n: ix, d: fc.integer({ min: -SIM_CFG.reclaimAfterMs, max: SIM_CFG.reclaimAfterMs }) }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("loss" as const), p: fc.integer({ min: 0, max: 20 }) }) },
  { weight: 6, arbitrary: fc.record({ k: fc.constant("attack" as const), a: fc.nat(ATTACKS - 1), n: ix, b: ix }) },
);

const pick = <T>(xs: T[], n: number): T | undefined => (xs.length === 0 ? undefined : xs[n % xs.length]);

/** The rogue's forgeries: everything it may try with its own key (it has no other node's key). */
function attack(sim: Sim, rogue: SimNode, kind: number, victimIx: number, targetIx: number): boolean {
  const rn = rogue.node;
  if (!rn || !rogue.keys) return false;
  const epoch = rn.epochInfo()?.id;
  if (!epoch) return false;
  const honest = sim.live().filter((n) => n !== rogue);
  const target = pick(honest, targetIx);
  const victim = pick(honest, victimIx);
  if (!target || !victim) return false;
  const view = target.node!.view();
  const theirs = view.filter((e) => e[1] === victim.id);
  const blk = pick(theirs, victimIx);
  if (!blk) return false;
  const [i, , v] = blk;
  const keys = rogue.keys;
  const pk = keys.publicKey;
  const entry = (owner: string, version: number, k: EntryKind, from: string, by: string, proof?: unknown[]) => {
    const sig = keys.sign(CTX_ENTRY, [epoch, String(i), owner, String(version), k, from]);
    return { v: 1, t: "state", epoch, entries: [[i, owner, version, k]], certs: [proof ? [from, by, pk, sig, proof] : [from, by, pk, sig]], handovers: [null] };
  };
  let body: unknown;
  switch (kind) {
    case 0: // the 2^53-1 version that used to move a block for good
      body = entry(rogue.id, Number.MAX_SAFE_INTEGER, "t", victim.id, victim.id);
      break;
    case 1: {
      // a claim with promises "from" every honest node, all signed with the rogue's own key
      const fields = [epoch, String(i), String(v + 1), "c", victim.id, rogue.id];
      const proof = [rogue, ...honest].map((n) => [n.id, pk, keys.sign(CTX_PROMISE, [...fields, "1"]), 1]);
      body = entry(rogue.id, v + 1, "c", victim.id, rogue.id, proof);
      break;
    }
    case 2: // a transfer "by" the victim, signed by the rogue
      body = entry(rogue.id, v + 1, "t", victim.id, victim.id);
      break;
    case 3: // a pin "by" the victim at a later version (to wedge its block), signed by the rogue
      body = entry(victim.id, v + 5, "p", victim.id, victim.id);
      break;
    case 4: {
      // force release of another node's block, connected or not (partitioned away from the target):
      // without the operator's signature, or with an "operator" signature made with the rogue's own key,
      // as a force ("f") or as an operator force ("o")
      const kind = targetIx % 3 === 2 ? "o" : "f";
      const e = entry(rogue.id, v + 1, kind, victim.id, rogue.id);
      if (targetIx % 3 !== 0) e.certs = [[...(e.certs[0] as unknown[]), null, keys.sign(CTX_RELEASE, releaseFields(epoch, i, victim.id, v + 1, rogue.id))] as never];
      body = e;
      break;
    }
    case 5: // a heartbeat for the victim far in the future (made it look silent forever)
      body = encodeIpamMessage({ t: "hello", epoch: rn.epochInfo(), beat: Math.floor(sim.at(rogue)), pk, sig: keys.sign(CTX_BEAT, [epoch, rogue.id, String(Math.floor(sim.at(rogue)))]), beats: [[victim.id, Number.MAX_SAFE_INTEGER - 1, pk, keys.sign(CTX_BEAT, [epoch, victim.id, String(Number.MAX_SAFE_INTEGER - 1)])]], free: 0, digest: 0, promised: [] });
      break;
    case 6: {
      // a plausible heartbeat for the victim, signed with the rogue's key
      const b = Math.floor(sim.at(victim)) + 60_000;
      body = encodeIpamMessage({ t: "hello", epoch: rn.epochInfo(), beat: Math.floor(sim.at(rogue)), pk, sig: keys.sign(CTX_BEAT, [epoch, rogue.id, String(Math.floor(sim.at(rogue)))]), beats: [[victim.id, b, pk, keys.sign(CTX_BEAT, [epoch, victim.id, String(b)])]], free: 0, digest: 0, promised: theirs.map((e) => [e[0], e[2] + 1] as [number, number]) });
      break;
    }
    case 8: {
      // a made-up node "added" to the member list: a grant "by" the victim of a block to it, with promises
      // "from" every honest node, all signed with the rogue's key (or no proof at all: counted as nothing)
      const fake = FAKE[targetIx % FAKE.length]!;
      const fields = [epoch, String(i), String(v + 1), "t", victim.id, fake.id];
      const proof = [rogue, ...honest].map((n) => [n.id, pk, keys.sign(CTX_PROMISE, [...fields, "1"]), 1]);
      const sig = keys.sign(CTX_ENTRY, [epoch, String(i), fake.id, String(v + 1), "t", victim.id]);
      body = { v: 1, t: "members", epoch, records: [[fake.id, "m", [i, v + 1, victim.id, victim.id, pk, sig, proof]]] };
      break;
    }
    case 9: {
      // a live node "removed" as gone, validly signed by the rogue (nobody saw it gone), or as leaving
      // "by" the victim (signed with the rogue's key)
      const reason = targetIx % 2 === 0 ? "gone" : "leave";
      const by = reason === "gone" ? rogue.id : victim.id;
      body = { v: 1, t: "members", epoch, records: [[victim.id, "x", [reason, by, pk, keys.sign(CTX_MEMBER, removalFields(epoch, victim.id, reason, by))]]] };
      break;
    }
    case 10: // a removal of the target itself, signed by the rogue: nobody else's word shrinks a node's own majorities
      body = { v: 1, t: "members", epoch, records: [[target.id, "x", ["gone", rogue.id, pk, keys.sign(CTX_MEMBER, removalFields(epoch, target.id, "gone", rogue.id))]]] };
      break;
    case 11: {
      // the operator's removal ("op") of a live node, signed with the rogue's own key — or with the real
      // operator's signature of something else (a block release of the victim: another domain)
      const sig = targetIx % 2 === 0 ? keys.sign(CTX_REMOVE, removeFields(epoch, victim.id)) : signFields(OPERATOR, CTX_RELEASE, ...releaseFields(epoch, i, victim.id, v + 1, rogue.id));
      body = { v: 1, t: "members", epoch, records: [[victim.id, "x", ["op", rogue.id, pk, sig]]] };
      break;
    }
    default: // an unsigned entry (the pre-signing wire format)
      body = { v: 1, t: "state", epoch, entries: [[i, rogue.id, v + 1, "c"]] };
  }
  sim.inject(rogue.id, target.id, body);
  return true;
}

function run(seed: number, initial: number, ops: Op[]): void {
  const sim = new Sim(prng(seed));
  sim.signed = true;
  sim.operatorKey = OPERATOR.publicKey; // every node checks operator-signed releases (none is issued here)
  sim.dupRate = 0.05;
  sim.add({ mayFound: true });
  sim.run(1);
  for (let i = 1; i < initial; i++) sim.add({ mayFound: false });
  const rogue = sim.add({ mayFound: false });
  sim.run(6 + 2 * initial);
  let attacks = 0;
  for (const o of ops) {
    const alive = sim.live();
    switch (o.k) {
      case "alloc": {
        const sn = pick(alive, o.n);
        if (sn) for (let k = 0; k < o.c; k++) sim.allocate(sn);
        break;
      }
      case "release": {
        const sn = pick(alive, o.n);
        const pod = sn ? pick([...sn.node!.allocations().keys()], o.n) : undefined;
        if (sn && pod) sim.release(sn, pod);
        break;
      }
      case "wait":
        sim.run(o.t);
        break;
      case "crash": {
        const sn = pick(alive.filter((n) => n !== rogue), o.n);
        if (sn && alive.length > 2) sim.crash(sn);
        break;
      }
      case "restart": {
        const sn = pick(sim.nodes.filter((n) => !n.node && !n.gone), o.n);
        if (sn) {
          sim.restart(sn);
          sim.allocate(sn);
        }
        break;
      }
      case "partition":
        sim.nodes.forEach((n, k) => (n.group = o.g[k % o.g.length]!));
        sim.syncLinks();
        break;
      case "heal":
        for (const n of sim.nodes) n.group = 0;
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
      case "attack":
        if (attack(sim, rogue, o.a, o.n, o.b)) attacks++;
        break;
    }
    sim.checkSafety();
    sim.checkKept();
    sim.tick();
  }
  // heal, restart everyone, quiet time: one view everywhere — the rogue's own engine included, whose
  // table never held a forged entry: so no forged entry survived anywhere
  sim.lossRate = 0;
  for (const n of sim.nodes) n.group = 0;
  for (const n of sim.nodes) if (!n.node && !n.gone) sim.restart(n);
  sim.syncLinks();
  sim.run(2 * R_TICKS + 10);
  const live = sim.live();
  for (let extra = 0; extra < 2 * R_TICKS && new Set(live.map((n) => n.node!.digest())).size > 1; extra++) sim.run(1);
  if (new Set(live.map((n) => n.node!.digest())).size !== 1) {
    const v0 = live[0]!.node!.view();
    const diff = live.map((n) => [n.id.slice(0, 4), n.node!.status(sim.now).counters.forged, n.node!.status(sim.now).counters.jumps, n.node!.view().filter((e, i) => JSON.stringify(e) !== JSON.stringify(v0[i])).map((e) => e.join(":")).join(" ")]);
    throw new Error(`views differ: ${JSON.stringify(diff)} rogue ${rogue.id.slice(0, 4)} ref ${JSON.stringify(live.map((n) => n.node!.view().filter((e, i) => live.some((m) => JSON.stringify(m.node!.view()[i]) !== JSON.stringify(e))).map((e) => e.join(":").replace(/([0-9a-f]{4})[0-9a-f]{12}/g, "$1"))))}`);
  }
  // no forged member record survived: one member list everywhere, no made-up node, nobody removed
  const lists = new Set(live.map((n) => n.node!.memberList().join(",")));
  expect(lists.size, "one member list everywhere").toBe(1);
  for (const f of FAKE) expect(live[0]!.node!.memberList()).not.toContain(f.id);
  for (const n of live) expect(n.node!.removedMembers(), `${n.id} removed nobody`).toEqual([]);
  const rogueOwns = new Set(rogue.node!.ownedBlocks());
  for (const n of live) for (const [i, owner] of n.node!.view()) if (owner === rogue.id) expect(rogueOwns.has(i), `block ${i} given to the rogue by a forgery`).toBe(true);
  sim.checkKept();
  expect(sim.revoked).toBe(0);
  // (that each kind of forgery is counted where it lands is checked one by one in the test below:
  // here a target may crash afterwards and restart with fresh counters)
  void attacks;
}

describe("signed ipam state (property)", () => {
  it("a rogue insider's forgeries are refused and counted; honest nodes keep their blocks and addresses", () => {
    fc.assert(
      fc.property(fc.nat(), fc.integer({ min: 3, max: 6 }), fc.array(op, { minLength: 5, maxLength: 25 }), (seed, initial, ops) => run(seed, initial, ops)),
      {
        numRuns: Number(process.env.IPAM_SIGNED_RUNS ?? 40),
        // a case found while the box was loaded (kept: it exercises crash + attack + partition)
        examples: [[2147467235, 4, [{ k: "clock", n: 0, d: 0 }, { k: "crash", n: 0 }, { k: "alloc", n: 0, c: 1 }, { k: "attack", a: 0, n: 0, b: 0 }, { k: "alloc", n: 0, c: 1 }, { k: "wait", t: 6 }, { k: "heal" }, { k: "attack", a: 0, n: 0, b: 0 }, { k: "alloc", n: 0, c: 1 }, { k: "partition", g: [0, 0, 0, 0, 0, 0, 0, 0] }, { k: "heal" }, { k: "alloc", n: 0, c: 1 }, { k: "attack", a: 0, n: 0, b: 0 }, { k: "partition", g: [0, 0, 0, 0, 1, 0, 0, 0] }, { k: "attack", a: 0, n: 0, b: 0 }, { k: "crash", n: 0 }]]],
      },
    );
  }, 600_000);

  it("each forgery kind alone is refused and counted, and changes nothing", () => {
    for (let kind = 0; kind < ATTACKS; kind++) {
      const sim = new Sim(prng(100 + kind));
      sim.signed = true;
      sim.operatorKey = OPERATOR.publicKey; // every node checks operator-signed releases (none is issued here)
      sim.dupRate = 0;
      sim.add({ mayFound: true });
      sim.run(1);
      for (let k = 0; k < 3; k++) sim.add({ mayFound: false });
      const rogue = sim.add({ mayFound: false });
      sim.run(20);
      for (const n of sim.live()) sim.allocate(n);
      sim.run(4);
      // (from a converged state: a grant may still be in flight after the allocations)
      for (let t = 0; t < 40 && new Set(sim.live().map((n) => n.node!.digest())).size > 1; t++) sim.run(1);
      const before = sim.live().filter((n) => n !== rogue).map((n) => n.node!.digest());
      let sent = 0;
      for (let k = 0; k < 6; k++) if (attack(sim, rogue, kind, k, k + 1)) sent++;
      sim.run(2);
      expect(sent, `attack ${kind} delivered`).toBeGreaterThan(0);
      const counted = sim.live().reduce((s, n) => { const c = n.node!.status(sim.now).counters; return s + c.forged + c.jumps + c.malformed; }, 0);
      // (attack 9 also sends validly signed "gone" removals, refused but not counted: honest ones race the
      // releases that make a node known gone; its "leave" forgeries are counted)
      expect(counted, `attack ${kind} counted`).toBeGreaterThan(0);
      for (const n of sim.live()) expect(n.node!.removedMembers(), `attack ${kind}: nobody removed`).toEqual([]);
      for (const n of sim.live()) expect(n.node!.memberList().length, `attack ${kind}: no member added`).toBe(5);
      const after = sim.live().filter((n) => n !== rogue).map((n) => n.node!.digest());
      expect(after, `attack ${kind} changed a table`).toEqual(before);
      // and liveness: a forged heartbeat never makes a connected node look silent
      for (const n of sim.live()) for (const m of n.node!.status(sim.now).members) if (m.silentMs !== null) expect(m.silentMs).toBeLessThan(SIM_CFG.reclaimAfterMs);
      sim.checkKept();
    }
  }, 120_000);
});
