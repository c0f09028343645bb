import { describe, expect, it } from "vitest";
import { IpamError, IpamNode, type IpamOutput } from "../../src/ipam/index.js";
import { ProtocolError } from "../../src/errors.js";
import { SIM_CFG, Sim, TICK, prng } from "../property/ipam-harness.js";

const R = SIM_CFG.reclaimAfterMs;
const ticks = (ms: number) => Math.ceil(ms / TICK);

function cluster(n: number, seed = 1) {
  const sim = new Sim(prng(seed));
  sim.dupRate = 0;
  const f = sim.add({ mayFound: true });
  sim.run(1);
  const others = Array.from({ length: n - 1 }, () => sim.add({ mayFound: false }));
  sim.run(4 + 3 * n);
  return { sim, nodes: [f, ...others] };
}

describe("ipam node", () => {
  it("founds, joins, gives every node a block, allocates idempotently", () => {
    const { sim, nodes } = cluster(4);
    const epochs = new Set(nodes.map((n) => n.node!.epochInfo()?.id));
    expect(epochs.size).toBe(1);
    for (const n of nodes) expect(n.node!.ownedBlocks().length).toBeGreaterThan(0);
    const a = nodes[1]!;
    const ip1 = sim.allocate(a, "pod-a");
    expect(ip1).toMatch(/^10\.40\./);
    const again = a.node!.allocate("pod-a", sim.now);
    expect(again.ok && again.ip).toBe(ip1);
    expect(again.ok && again.changed).toBe(false);
    const rel = a.node!.release("pod-a");
    expect(rel.changed).toBe(true);
    expect(a.node!.release("pod-a").changed).toBe(false);
    // disjoint ownership
    const seen = new Set<number>();
    for (const n of nodes) for (const b of n.node!.ownedBlocks()) expect(seen.has(b)).toBe(false), seen.add(b);
  });

  it("a full node asks for another block", () => {
    const { sim, nodes } = cluster(3);
    const a = nodes[2]!;
    const before = a.node!.ownedBlocks().length;
    for (let i = 0; i < 14 * before + 20; i++) {
      if (sim.allocate(a) === null) sim.run(2);
    }
    expect(a.node!.ownedBlocks().length).toBeGreaterThan(before);
  });

  it("restart from snapshot keeps blocks and pod IPs, and allocates at once (no resync wait)", () => {
    const { sim, nodes } = cluster(3);
    const a = nodes[1]!;
    const ip = sim.allocate(a, "keep");
    const blocks = a.node!.ownedBlocks();
    sim.crash(a);
    sim.run(2);
    sim.restart(a);
    expect(a.node!.ownedBlocks()).toEqual(blocks);
    expect(a.node!.allocations().get("keep")).toBe(ip);
    // before any gossip arrived: its pinned blocks are its own, nobody else can take them
    expect(sim.allocate(a, "new")).not.toBeNull();
  });

  it("a dead node's free blocks are reclaimed by exactly one heir; blocks holding its pods stay reserved; it comes back with every pod", () => {
    const { sim, nodes } = cluster(5);
    const dead = nodes[3]!;
    const ip = sim.allocate(dead, "old")!;
    const pinnedBlock = sim.blockOf(ip);
    sim.run(4);
    const its = dead.node!.ownedBlocks();
    const free = its.filter((b) => dead.node!.view()[b]![3] !== "p");
    sim.crash(dead);
    sim.run(ticks(R) - 4);
    for (const n of sim.live()) for (const b of its) expect(n.node!.view()[b]![1]).toBe(dead.id);
    sim.run(12);
    for (const b of its) if (b !== pinnedBlock && !free.includes(b)) expect(nodes[0]!.node!.view()[b]![1]).toBe(dead.id);
    expect(nodes[0]!.node!.view()[pinnedBlock]![1]).toBe(dead.id);
    const owners = new Set(free.map((b) => nodes[0]!.node!.view()[b]![1]));
    expect(owners.has(dead.id)).toBe(false);
    expect(owners.size).toBeLessThanOrEqual(1);
    const claims = sim.live().reduce((s, n) => s + n.node!.status(sim.now).counters.claims, 0);
    expect(claims).toBe(free.length);
    expect(nodes[0]!.node!.status(sim.now).reserved.map((r) => r.owner)).toContain(dead.id);
    // others keep allocating meanwhile
    for (const n of sim.live()) expect(sim.allocate(n)).not.toBeNull();
    // the old owner comes back: its pod keeps its address, nothing is revoked, it allocates at once
    const revoked: string[] = [];
    const orig = sim.apply.bind(sim);
    sim.apply = (sn, out: IpamOutput) => {
      revoked.push(...out.revoked.map((r) => r.ip));
      orig(sn, out);
    };
    sim.restart(dead);
    expect(sim.allocate(dead, "right-after-restart")).not.toBeNull();
    sim.run(8);
    expect(revoked).toEqual([]);
    expect(dead.node!.allocations().get("old")).toBe(ip);
    expect(nodes[0]!.node!.view()[pinnedBlock]![1]).toBe(dead.id);
  });

  it("partition: the minority keeps allocating from its pinned blocks and says why new blocks wait; the majority grants; heal converges", () => {
    const { sim, nodes } = cluster(5);
    for (const n of nodes) sim.allocate(n);
    sim.run(2);
    const [a, b] = [nodes[0]!, nodes[1]!];
    a.group = 1;
    b.group = 1;
    sim.syncLinks();
    sim.run(ticks(SIM_CFG.reclaimAfterMs - SIM_CFG.safetyMarginMs) + 1);
    expect(a.node!.canAllocate(sim.now)).toBe(true);
    expect(sim.allocate(a)).not.toBeNull();
    const st = a.node!.status(sim.now);
    expect(st.ownership.lease).toBe(false);
    expect(st.ownership.reason).toMatch(/no majority: 2 of 5 members heard \(need 3\).*existing blocks keep allocating/);
    expect(nodes[2]!.node!.hasLease(sim.now)).toBe(true);
    sim.run(ticks(R) + 6);
    for (let k = 0; k < 40; k++) sim.allocate(a);
    for (let k = 0; k < 40; k++) sim.allocate(nodes[2]!), sim.run(1);
    for (const n of nodes) n.group = 0;
    sim.syncLinks();
    sim.run(ticks(SIM_CFG.resyncMs) + 6);
    const d = new Set(nodes.map((n) => n.node!.digest()));
    expect(d.size).toBe(1);
    for (const n of nodes) expect(sim.allocate(n)).not.toBeNull();
    expect(sim.revoked).toBe(0);
  });

  it("2|2 split: no side may change ownership, both keep allocating, status says why", () => {
    const { sim, nodes } = cluster(4);
    for (const n of nodes) sim.allocate(n);
    sim.run(2);
    nodes[0]!.group = 1;
    nodes[1]!.group = 1;
    sim.syncLinks();
    sim.run(ticks(R) + 10);
    for (const n of nodes) {
      expect(n.node!.hasLease(sim.now)).toBe(false);
      const st = n.node!.status(sim.now);
      expect(st.ownership.reason).toMatch(/no majority: 2 of 4/);
      // status lists the members and names the ones not heard (the other side)
      const other = nodes.filter((m) => m.group !== n.group).map((m) => m.id);
      expect(st.members.map((m) => m.id).sort()).toEqual(nodes.map((m) => m.id).sort());
      expect(st.members.filter((m) => !m.heard).map((m) => m.id).sort()).toEqual(other.sort());
      for (const o of other) expect(st.ownership.reason).toContain(o.slice(0, 8));
      expect(sim.allocate(n)).not.toBeNull();
    }
    expect(sim.live().reduce((s, n) => s + n.node!.status(sim.now).counters.claims, 0)).toBe(0);
  });

  it("resync hold U counts unbroken majority contact: 'contact, cut off, wait' does not earn the lease", () => {
    const { sim, nodes } = cluster(5);
    const a = nodes[4]!;
    sim.crash(a);
    sim.run(2);
    sim.restart(a);
    expect(a.node!.hasLease(sim.now)).toBe(false);
    const contact = Math.floor(ticks(SIM_CFG.resyncMs) / 2); // half of U with the majority
    sim.run(contact);
    a.group = 1; // cut off again: heard-within-W still counts the majority, but contact is broken
    sim.syncLinks();
    for (let t = 0; t < ticks(SIM_CFG.resyncMs) + 4; t++) {
      sim.run(1);
      expect(a.node!.hasLease(sim.now)).toBe(false);
    }
    a.group = 0; // back: U of unbroken contact, then the lease
    sim.syncLinks();
    sim.run(ticks(SIM_CFG.resyncMs) - 1);
    expect(a.node!.hasLease(sim.now)).toBe(false);
    sim.run(3);
    expect(a.node!.hasLease(sim.now)).toBe(true);
  });

  it("operator force release hands the blocks to the caller (after settle), the gone node's pods with them", () => {
    const { sim, nodes } = cluster(3);
    const gone = nodes[2]!;
    sim.allocate(gone);
    const its = gone.node!.ownedBlocks();
    sim.crash(gone, true);
    sim.apply(nodes[0]!, nodes[0]!.node!.forceRelease(gone.id, sim.now));
    expect(nodes[0]!.node!.allocatableBlocks(sim.now)).not.toContain(its[0]);
    sim.run(ticks(SIM_CFG.claimSettleMs) + 2);
    for (const b of its) expect(nodes[1]!.node!.view()[b]![1]).toBe(nodes[0]!.id);
    for (let k = 0; k < 13 * 8 && !nodes[0]!.node!.allocatableBlocks(sim.now).some((b) => its.includes(b)); k++) {
      sim.allocate(nodes[0]!);
      sim.run(1);
    }
    expect(nodes[0]!.node!.allocatableBlocks(sim.now).some((b) => its.includes(b))).toBe(true);
  });

  it("member list: removed only by leave() or a release (reclaim never removes anyone); an old snapshot derives it from the owners", () => {
    const { sim, nodes } = cluster(5);
    for (const n of nodes) sim.allocate(n);
    sim.run(4);
    const ids = nodes.map((n) => n.id).sort();
    for (const n of nodes) expect(n.node!.memberList()).toEqual(ids);
    // a silent node stays a member however long it is away
    const silent = nodes[4]!;
    silent.group = 1;
    sim.syncLinks();
    sim.run(3 * ticks(R));
    for (const n of nodes.slice(0, 4)) expect(n.node!.memberList()).toContain(silent.id);
    silent.group = 0;
    sim.syncLinks();
    sim.run(6);
    // leave(): the node takes itself off, by its own word, everywhere
    const leaver = nodes[3]!;
    const r = leaver.node!.leave(sim.now);
    expect(r.ok).toBe(true);
    sim.apply(leaver, r.output);
    sim.deliver();
    sim.crash(leaver, true);
    sim.run(4);
    for (const n of sim.live()) {
      expect(n.node!.memberList()).not.toContain(leaver.id);
      expect(n.node!.removedMembers()).toEqual([leaver.id]);
      expect(n.node!.status(sim.now).ownership.members).toBe(4);
    }
    // a release of a dead node (the operator; unsigned here) takes it off too
    const dead = nodes[2]!;
    sim.crash(dead, true);
    sim.apply(nodes[0]!, nodes[0]!.node!.forceRelease(dead.id, sim.now));
    sim.run(4);
    for (const n of sim.live()) expect(n.node!.memberList()).toEqual([nodes[0]!.id, nodes[1]!.id, silent.id].sort());
    // a snapshot from before the member list: the list is derived from the owners once, then kept
    const a = nodes[1]!;
    const snap = structuredClone(a.node!.snapshot());
    expect(snap.members?.length).toBeGreaterThan(0);
    delete snap.members;
    const old = IpamNode.restore(snap, { ...SIM_CFG, id: a.id }, sim.now);
    expect(old.memberList()).toEqual([...new Set(a.node!.view().map(([, o]) => o))].sort());
    expect(old.snapshot().members?.length).toBeGreaterThan(0);
  });

  it("two separately founded IPAMs refuse to merge, with a counted error", () => {
    const sim = new Sim(prng(3));
    const a = sim.add({ mayFound: true, group: 1 });
    const b = sim.add({ mayFound: true, group: 2 });
    const perMesh = () => {}; // two separate meshes may each use the same block: they never merge
    sim.run(3, perMesh);
    expect(a.node!.epochInfo()!.id).not.toBe(b.node!.epochInfo()!.id);
    b.group = 1;
    sim.syncLinks();
    sim.run(2, perMesh);
    expect(a.node!.status(sim.now).counters.epochMismatch).toBeGreaterThan(0);
    expect(a.node!.status(sim.now).conflicts[0]!.code).toBe("ERR_EPOCH_MISMATCH");
    expect(sim.errors.some((e) => e.includes("ERR_EPOCH_MISMATCH"))).toBe(true);
    // never merged: each keeps its own founder as the owner of everything it did not pin
    expect(a.node!.view()[0]![1]).toBe(a.id);
    expect(b.node!.view()[0]![1]).toBe(b.id);
  });

  it("several nodes starting at once found exactly one IPAM (lowest id founds)", () => {
    const sim = new Sim(prng(9));
    const ns = Array.from({ length: 5 }, () => sim.add({ mayFound: true }));
    sim.run(6);
    expect(new Set(ns.map((n) => n.node!.epochInfo()?.id)).size).toBe(1);
    expect(ns.map((n) => n.node!.epochInfo()!.founder)[0]).toBe([...ns.map((n) => n.id)].sort()[0]);
  });

  it("a node configured with another range refuses the mesh's IPAM", () => {
    const sim = new Sim(prng(4));
    sim.add({ mayFound: true });
    sim.run(1);
    const other = new IpamNode({ ...SIM_CFG, id: "ffffffffffffffff", range: "10.50.0.0/16", mayFound: false }, sim.now);
    const f = sim.nodes[0]!;
    const hello = f.node!.handle({ type: "peerUp", peer: other.id }, sim.now).send.find((s) => s.to === other.id)!;
    const out = other.handle({ type: "message", from: f.id, body: hello.body }, sim.now);
    expect(out.errors[0]).toBeInstanceOf(IpamError);
    expect(out.errors[0]!.code).toBe("ERR_RANGE_MISMATCH");
    expect(other.epochInfo()).toBeNull();
    const snap = f.node!.snapshot();
    expect(() => IpamNode.restore(snap, { ...SIM_CFG, id: f.id, range: "10.50.0.0/16" }, sim.now)).toThrow(/ERR_RANGE_MISMATCH|started with/);
  });

  it("drops malformed and conflicting remote data with typed errors", () => {
    const { sim, nodes } = cluster(3);
    const a = nodes[0]!.node!;
    const epoch = a.epochInfo()!.id;
    const bad = a.handle({ type: "message", from: nodes[1]!.id, body: { v: 1, t: "state", epoch, entries: [[0, "XYZ", 1, "t"]] } }, sim.now);
    expect(bad.errors[0]).toBeInstanceOf(ProtocolError);
    const owned = a.ownedBlocks()[0]!;
    const e = a.view()[owned]!;
    // our confirmed pin, and another owner's pin at the same version (a disputed pin: a grant and a claim
    // of the version below were both written), in one batch with an entry that is fine
    expect(e[3]).toBe("p");
    const other = a.view().find(([i, o, v]) => o !== a.id && i !== owned && v > 0)!;
    const conflict = a.handle({ type: "message", from: nodes[1]!.id, body: { v: 1, t: "state", epoch, entries: [[owned, nodes[1]!.id, e[2], e[3]], [other[0], other[1], other[2] + 1, "t"]] } }, sim.now);
    expect(conflict.errors[0]!.code).toBe("ERR_CONFLICT");
    expect(a.status(sim.now).counters).toMatchObject({ malformed: 1, conflicts: 1 });
    // the rest of the batch is merged; the owner of the confirmed pin pins again one version higher
    expect(a.view()[other[0]]).toEqual([other[0], other[1], other[2] + 1, "t"]);
    expect(a.view()[owned]).toEqual([owned, a.id, e[2] + 1, "p"]);
    expect(conflict.send.some((m) => JSON.stringify(m.body).includes(`[${owned},"${a.id}",${e[2] + 1},"p"]`))).toBe(true);
    expect(a.canAllocate(sim.now)).toBe(true);
  });

  it("status lists range, blocks with owners and free counts, allocations", () => {
    const { sim, nodes } = cluster(2);
    sim.allocate(nodes[1]!, "p1");
    const st = nodes[1]!.node!.status(sim.now);
    expect(st.range).toBe("10.40.0.0/22");
    expect(st.blocks).toHaveLength(64);
    const mine = st.blocks.filter((b) => b.mine);
    expect(mine.length).toBeGreaterThan(0);
    expect(mine.some((b) => b.free === 12)).toBe(true); // /28: 16 - network - broadcast - gateway - p1
    expect(st.allocations).toEqual([{ podId: "p1", ip: expect.stringMatching(/^10\.40\./) }]);
    expect(JSON.parse(JSON.stringify(st)).blocks[0].cidr).toBe("10.40.0.0/28");
  });
});
