// Force release in a signed cluster (issue 12): another node's blocks are released only with the
// operator's signature (--operator-key; `weftnet ipam release --operator-key-file`) or by a node that saw
// the owner gone itself (its Kubernetes Node deleted). A rogue member with the token and its own valid
// key cannot release a silent (partitioned or dead) node's blocks: refused and counted on every node.
import { describe, expect, it } from "vitest";
import { generateIdentity, signFields, type Identity } from "../../src/identity.js";
import { IpamError } from "../../src/ipam/index.js";
import { CTX_ENTRY, CTX_MEMBER, CTX_RELEASE, CTX_REMOVE, releaseFields, removalFields, removeFields } from "../../src/ipam/signing.js";
import { SIM_CFG, Sim, type SimNode, prng } from "../property/ipam-harness.js";

function signedCluster(n: number, operator: Identity | undefined, seed = 7, syncIntervalMs = SIM_CFG.syncIntervalMs) {
  const sim = new Sim(prng(seed), { ...SIM_CFG, syncIntervalMs });
  sim.dupRate = 0;
  sim.signed = true;
  sim.operatorKey = operator?.publicKey;
  const f = sim.add({ mayFound: true });
  sim.run(1);
  const others = Array.from({ length: n - 1 }, () => sim.add({ mayFound: false }));
  sim.run(4 + 3 * n);
  return { sim, nodes: [f, ...others] };
}

/** The last node takes a block (a pod), then goes away for good. */
function withGoneNode(sim: Sim, nodes: SimNode[]) {
  const gone = nodes[nodes.length - 1]!;
  for (let k = 0; k < 20 && gone.node!.ownedBlocks().length === 0; k++) {
    sim.allocate(gone);
    sim.run(1);
  }
  sim.run(4);
  const blocks = gone.node!.ownedBlocks();
  expect(blocks.length).toBeGreaterThan(0);
  sim.crash(gone, true);
  sim.run(2);
  return { gone, blocks };
}

const owners = (sn: SimNode, blocks: number[]) => blocks.map((i) => sn.node!.view()[i]![1]);
const entriesOf = (sn: SimNode, blocks: number[]) => JSON.stringify(blocks.map((i) => sn.node!.view()[i]));

function operatorSigs(op: Identity, sn: SimNode, node: string, blocks: number[], versionDelta = 1): Map<number, Uint8Array> {
  const epoch = sn.node!.epochInfo()!.id;
  return new Map(blocks.map((i) => [i, signFields(op, CTX_RELEASE, ...releaseFields(epoch, i, node, sn.node!.view()[i]![2] + versionDelta, sn.id))]));
}

function forbidden(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(IpamError);
    expect((e as IpamError).code).toBe("ERR_FORBIDDEN");
    return (e as Error).message;
  }
  throw new Error("expected ERR_FORBIDDEN");
}

describe("force release in a signed cluster", () => {
  it("needs the operator's signature of each block at its next version: none, another key's, a stale one or another block's are refused", () => {
    const op = generateIdentity();
    const { sim, nodes } = signedCluster(4, op);
    const [a] = nodes as [SimNode];
    const { gone, blocks } = withGoneNode(sim, nodes);
    expect(forbidden(() => a.node!.forceRelease(gone.id, sim.at(a)))).toMatch(/operator/);
    forbidden(() => a.node!.forceRelease(gone.id, sim.at(a), { operator: operatorSigs(generateIdentity(), a, gone.id, blocks) }));
    forbidden(() => a.node!.forceRelease(gone.id, sim.at(a), { operator: operatorSigs(op, a, gone.id, blocks, 0) })); // signed for the version it had
    forbidden(() => a.node!.forceRelease(gone.id, sim.at(a), { operator: operatorSigs(op, a, gone.id, blocks, 2) }));
    if (blocks.length === 1) {
      // a signature for one block does not release another (here: for block+1, which the node does not own)
      const sig = operatorSigs(op, a, gone.id, [blocks[0]! + 1]).get(blocks[0]! + 1)!;
      forbidden(() => a.node!.forceRelease(gone.id, sim.at(a), { operator: new Map([[blocks[0]!, sig]]) }));
    }
    expect(owners(a, blocks).every((o) => o === gone.id)).toBe(true);
    // the operator's signature works, and every other node accepts it
    sim.apply(a, a.node!.forceRelease(gone.id, sim.at(a), { operator: operatorSigs(op, a, gone.id, blocks) }));
    sim.run(4);
    for (const sn of nodes.slice(0, 3)) expect(owners(sn, blocks)).toEqual(blocks.map(() => a.id));
    for (const sn of nodes.slice(0, 3)) expect(sn.node!.status(sim.at(sn)).counters.releasesRefused).toBe(0);
  });

  it("an agent without --operator-key cannot issue an operator release (its peers could not check it)", () => {
    const { sim, nodes } = signedCluster(3, undefined);
    const [a] = nodes as [SimNode];
    const { gone, blocks } = withGoneNode(sim, nodes);
    expect(forbidden(() => a.node!.forceRelease(gone.id, sim.at(a), { operator: operatorSigs(generateIdentity(), a, gone.id, blocks) }))).toMatch(/no --operator-key/);
  });

  it("a rogue member's release of a silent node (unsigned, or signed with its own key as 'operator') is refused and counted everywhere", () => {
    const op = generateIdentity();
    const { sim, nodes } = signedCluster(4, op);
    const [a, b, rogue] = nodes as [SimNode, SimNode, SimNode];
    const { gone, blocks } = withGoneNode(sim, nodes);
    const epoch = rogue.node!.epochInfo()!.id;
    const rogueIdn = { sign: (ctx: string, f: string[]) => rogue.keys!.sign(ctx, f) };
    const state = (withOp: "none" | "own-key" | "operator-other-block") => {
      const entries = blocks.map((i) => [i, rogue.id, rogue.node!.view()[i]![2] + 1, "f"]);
      const certs = entries.map(([i, owner, v, k]) => {
        const sig = rogueIdn.sign(CTX_ENTRY, [epoch, String(i), String(owner), String(v), String(k), gone.id]);
        const base = [gone.id, rogue.id, rogue.keys!.publicKey, sig];
        if (withOp === "none") return base;
        // "operator" signatures the rogue can make: its own key's, or the real operator's for another block
        const opSig = withOp === "own-key" ? rogueIdn.sign(CTX_RELEASE, releaseFields(epoch, Number(i), gone.id, Number(v), rogue.id)) : signFields(op, CTX_RELEASE, ...releaseFields(epoch, Number(i) + 1, gone.id, Number(v), rogue.id));
        return [...base, null, opSig];
      });
      return { v: 1, t: "state", epoch, entries, certs, handovers: entries.map(() => null) };
    };
    const refused0 = [a, b].map((sn) => sn.node!.status(sim.at(sn)).counters.releasesRefused);
    for (const how of ["none", "own-key", "operator-other-block"] as const) for (const to of [a, b]) sim.inject(rogue.id, to.id, state(how));
    sim.run(3);
    for (const [k, sn] of [a, b].entries()) {
      expect(owners(sn, blocks).every((o) => o === gone.id), "the silent node keeps its blocks").toBe(true);
      expect(sn.node!.status(sim.at(sn)).counters.releasesRefused - refused0[k]!).toBe(3 * blocks.length);
    }
  });

  it.each([17, 23, 29])("a rogue's refused release held back by x does not beat the operator's release on x once the node is gone (whatever the ids), and every node agrees (seed %i)", (seed) => {
    const op = generateIdentity();
    const { sim, nodes } = signedCluster(4, op, seed, 3_600_000); // no full resync: the held merge alone must agree
    const { gone, blocks } = withGoneNode(sim, nodes);
    // the operator releases on the highest id; the rogue has the lowest: a tie at one version went to the rogue
    const live = nodes.filter((sn) => sn !== gone).sort((p, q) => (p.id < q.id ? -1 : 1));
    const [rogue, other, x] = live as [SimNode, SimNode, SimNode];
    const epoch = x.node!.epochInfo()!.id;
    const entries = blocks.map((i) => [i, rogue.id, x.node!.view()[i]![2] + 1, "f"] as [number, string, number, "f"]);
    const certs = entries.map(([i, owner, v, k]) => [gone.id, rogue.id, rogue.keys!.publicKey, rogue.keys!.sign(CTX_ENTRY, [epoch, String(i), owner, String(v), k, gone.id])]);
    for (const to of [x, other]) sim.inject(rogue.id, to.id, { v: 1, t: "state", epoch, entries, certs, handovers: entries.map(() => null) });
    sim.run(2);
    for (const sn of [x, other]) expect(sn.node!.status(sim.at(sn)).counters.releasesRefused).toBe(blocks.length);
    expect(owners(x, blocks).every((o) => o === gone.id)).toBe(true);
    sim.apply(x, x.node!.forceRelease(gone.id, sim.at(x), { operator: operatorSigs(op, x, gone.id, blocks) }));
    sim.run(4);
    for (const sn of live) expect(owners(sn, blocks), `${sn === x ? "x" : sn === rogue ? "rogue" : "other"}'s view`).toEqual(blocks.map(() => x.id));
    expect(new Set(live.map((sn) => entriesOf(sn, blocks))).size, "one entry per block everywhere").toBe(1);
    // the rogue cannot take them afterwards either: its own force at that version, now the node is known gone
    // everywhere (with or without the operator's signature for x copied into its cert), loses to the operator's
    const v1 = entries.map(([i]) => x.node!.view()[i]![2]);
    const again = (kind: "f" | "o") => {
      const es = blocks.map((i, k) => [i, rogue.id, v1[k]!, kind] as [number, string, number, "f" | "o"]);
      const cs = es.map(([i, owner, v, kd]) => [gone.id, rogue.id, rogue.keys!.publicKey, rogue.keys!.sign(CTX_ENTRY, [epoch, String(i), owner, String(v), kd, gone.id]), null, signFields(op, CTX_RELEASE, ...releaseFields(epoch, i, gone.id, v, x.id))]);
      return { v: 1, t: "state", epoch, entries: es, certs: cs, handovers: es.map(() => null) };
    };
    for (const kind of ["f", "o"] as const) for (const to of [x, other]) sim.inject(rogue.id, to.id, again(kind));
    sim.run(4);
    for (const sn of live) expect(owners(sn, blocks)).toEqual(blocks.map(() => x.id));
    expect(new Set(live.map((sn) => entriesOf(sn, blocks))).size).toBe(1);
  });

  it("Kubernetes path: a node that saw the Node deleted itself accepts the others' releases; one that did not refuses them until it does", () => {
    const { sim, nodes } = signedCluster(4, undefined, 11, 3_600_000); // no full resync during the test
    const [a, b, c] = nodes as [SimNode, SimNode, SimNode];
    const { gone, blocks } = withGoneNode(sim, nodes);
    // a sees the deletion first; b and c refuse its forced entries (they did not see it)
    sim.apply(a, a.node!.forceRelease(gone.id, sim.at(a), { observedGone: true }));
    sim.run(3);
    for (const sn of [b, c]) {
      expect(owners(sn, blocks).every((o) => o === gone.id)).toBe(true);
      expect(sn.node!.status(sim.at(sn)).counters.releasesRefused).toBeGreaterThan(0);
    }
    // then b and c see it too: every node ends with the same single owner per block
    sim.apply(b, b.node!.forceRelease(gone.id, sim.at(b), { observedGone: true }));
    sim.apply(c, c.node!.forceRelease(gone.id, sim.at(c), { observedGone: true }));
    // (at once: each merges the releases it refused before, not only at the next full sync)
    sim.run(3);
    expect(new Set([a, b, c].map((sn) => sn.node!.digest())).size).toBe(1);
    const views = [a, b, c].map((sn) => owners(sn, blocks));
    expect(views[1]).toEqual(views[0]);
    expect(views[2]).toEqual(views[0]);
    expect(views[0]!.every((o) => o !== gone.id && [a.id, b.id, c.id].includes(o))).toBe(true);
  });

  it("an agent that cannot see the deletion itself (it never knew the node's name) converges once the operator releases the node on any agent", () => {
    const op = generateIdentity();
    const { sim, nodes } = signedCluster(4, op, 13, 3_600_000);
    const [a, b, c] = nodes as [SimNode, SimNode, SimNode];
    const { gone, blocks } = withGoneNode(sim, nodes);
    sim.apply(a, a.node!.forceRelease(gone.id, sim.at(a), { observedGone: true }));
    sim.run(3);
    expect(owners(b, blocks).every((o) => o === gone.id)).toBe(true);
    // the operator releases it on c: b and c accept it and merge what they refused from a
    sim.apply(c, c.node!.forceRelease(gone.id, sim.at(c), { operator: operatorSigs(op, c, gone.id, blocks) }));
    sim.run(3);
    expect(new Set([a, b, c].map((sn) => sn.node!.digest())).size).toBe(1);
    expect(owners(b, blocks).every((o) => o !== gone.id)).toBe(true);
    // and it survives a restart (the node stays known gone)
    sim.crash(b);
    sim.restart(b);
    expect(b.node!.snapshot().gone).toContain(gone.id);
  });

  it("the operator's signed removal takes a dead member that owns no block off every member list; forged, unsigned and wrong-key removals are refused and counted", () => {
    const op = generateIdentity();
    const { sim, nodes } = signedCluster(3, op, 31);
    const [a, b, c] = nodes as [SimNode, SimNode, SimNode];
    // the dead member died while it joined: its first block was granted (so it is a member) but the grant
    // never reached it, so it never pinned the block; reclaim takes the block back, the member stays
    const live = [a, b, c];
    const granted = () => live.some((sn) => sn.node!.view().some(([, o]) => o === dead.id)) || dead.node!.ownedBlocks().length > 0;
    const dead = sim.add({ mayFound: false });
    for (let k = 0; k < 40 && !granted(); k++) sim.tick();
    expect(granted()).toBe(true);
    expect(dead.node!.ownedBlocks(), "the grant has not reached it").toEqual([]);
    sim.crash(dead, true);
    for (let k = 0; k < 200 && live.some((sn) => sn.node!.view().some(([, o]) => o === dead.id)); k++) sim.run(1);
    for (const sn of live) {
      expect(sn.node!.view().filter(([, o]) => o === dead.id), "its blocks were reclaimed").toEqual([]);
      expect(sn.node!.memberList(), "but it is still a member").toContain(dead.id);
    }
    // the operator's block release has nothing to sign: without the removal it is refused
    expect(forbidden(() => a.node!.forceRelease(dead.id, sim.at(a), { operator: new Map() }))).toMatch(/owns no block/);
    // a removal signed by another key, for another epoch, of another node: refused where issued
    const epoch = a.node!.epochInfo()!.id;
    const removeSig = (by: Identity, ep: string, node: string) => signFields(by, CTX_REMOVE, ...removeFields(ep, node));
    forbidden(() => a.node!.forceRelease(dead.id, sim.at(a), { operator: new Map(), remove: removeSig(generateIdentity(), epoch, dead.id) }));
    forbidden(() => a.node!.forceRelease(dead.id, sim.at(a), { operator: new Map(), remove: removeSig(op, `${epoch}x`, dead.id) }));
    forbidden(() => a.node!.forceRelease(dead.id, sim.at(a), { operator: new Map(), remove: removeSig(op, epoch, b.id) }));
    // ... and by every receiver: a rogue's "op" removal (unsigned, its own key, a release signature), a
    // "gone" nobody knows, and the operator's removal of the receiver itself
    const rogue = c;
    const forged0 = [a, b].map((sn) => sn.node!.status(sim.at(sn)).counters.forged);
    const pk = rogue.keys!.publicKey;
    const forgeries = [
      [dead.id, "x", null],
      [dead.id, "x", ["op", rogue.id, pk, rogue.keys!.sign(CTX_REMOVE, removeFields(epoch, dead.id))]],
      [dead.id, "x", ["op", rogue.id, pk, signFields(op, CTX_RELEASE, ...removeFields(epoch, dead.id))]],
      [dead.id, "x", ["op", rogue.id, pk, removeSig(op, epoch, rogue.id)]],
      [dead.id, "x", ["leave", rogue.id, pk, rogue.keys!.sign(CTX_MEMBER, removalFields(epoch, dead.id, "leave", rogue.id))]],
    ];
    for (const to of [a, b]) {
      sim.inject(rogue.id, to.id, { v: 1, t: "members", epoch, records: forgeries });
      sim.inject(rogue.id, to.id, { v: 1, t: "members", epoch, records: [[to.id, "x", ["op", rogue.id, pk, removeSig(op, epoch, to.id)]]] });
    }
    sim.run(3);
    for (const [k, sn] of [a, b].entries()) {
      expect(sn.node!.memberList()).toContain(dead.id);
      expect(sn.node!.memberList(), "never its own removal").toContain(sn.id);
      expect(sn.node!.status(sim.at(sn)).counters.forged - forged0[k]!).toBe(forgeries.length + 1);
    }
    // the operator's removal, run on a: every node takes the dead member off its list
    sim.apply(a, a.node!.forceRelease(dead.id, sim.at(a), { operator: new Map(), remove: removeSig(op, epoch, dead.id) }));
    sim.run(4);
    for (const sn of live) {
      expect(sn.node!.memberList()).toEqual([a.id, b.id, c.id].sort());
      expect(sn.node!.removedMembers()).toEqual([dead.id]);
      expect(sn.node!.snapshot().gone).toContain(dead.id);
    }
    // idempotent: again on a, and the same record delivered again, change nothing and count nothing
    const snap = JSON.stringify(b.node!.snapshot().members);
    const forged1 = b.node!.status(sim.at(b)).counters.forged;
    sim.apply(a, a.node!.forceRelease(dead.id, sim.at(a), { operator: new Map(), remove: removeSig(op, epoch, dead.id) }));
    sim.inject(a.id, b.id, { v: 1, t: "members", epoch, records: [[dead.id, "x", ["op", a.id, a.keys!.publicKey, removeSig(op, epoch, dead.id)]]] });
    sim.run(3);
    expect(JSON.stringify(b.node!.snapshot().members)).toBe(snap);
    expect(b.node!.status(sim.at(b)).counters.forged).toBe(forged1);
    // persisted: it survives a restart (the record and the node known gone)
    sim.crash(b);
    sim.restart(b);
    sim.run(2);
    expect(b.node!.removedMembers()).toEqual([dead.id]);
    expect(b.node!.memberList()).not.toContain(dead.id);
    expect(b.node!.snapshot().gone).toContain(dead.id);
    // majorities are of the three members left (2 of 3): the dead one counts no more
    expect(b.node!.status(sim.at(b)).ownership.members).toBe(3);
  });

  it("a node that learns the operator's removal only from a relay (not from the issuing agent) accepts it too; the block release and the removal go out together", () => {
    const op = generateIdentity();
    const { sim, nodes } = signedCluster(4, op, 37);
    const [a, b, c] = nodes as [SimNode, SimNode, SimNode];
    const { gone, blocks } = withGoneNode(sim, nodes);
    const epoch = a.node!.epochInfo()!.id;
    sim.apply(a, a.node!.forceRelease(gone.id, sim.at(a), { operator: operatorSigs(op, a, gone.id, blocks), remove: signFields(op, CTX_REMOVE, ...removeFields(epoch, gone.id)) }));
    sim.run(4);
    for (const sn of [a, b, c]) {
      expect(owners(sn, blocks)).toEqual(blocks.map(() => a.id));
      expect(sn.node!.removedMembers()).toEqual([gone.id]);
      expect(sn.node!.memberList()).not.toContain(gone.id);
    }
    // the record a keeps is the operator's removal, not its own "gone"
    const rec = a.node!.snapshot().members!.find(([n, k]) => n === gone.id && k === "x")!;
    expect((rec[2] as unknown[])[0]).toBe("op");
  });
});
