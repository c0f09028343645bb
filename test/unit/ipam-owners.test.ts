// The cheap owners view (src/ipam/owners.ts, IpamNode.owners()): the block table's revision moves with
// every change, the view is rebuilt only then, it is the same object while the owners stay the same, and it
// always agrees with what the full status (buildStatus) says about range and owners.
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { IpamDriver } from "../../agent/ipam.js";
import { BlockTable, OwnersCache, parseCidr } from "../../src/ipam/index.js";
import { silentLogger } from "../../src/log.js";
import { cluster, flush } from "../helpers/memory-mesh.js";
import { Sim, prng } from "../property/ipam-harness.js";

const A = "aaaaaaaaaaaaaaaa";
const B = "bbbbbbbbbbbbbbbb";

describe("block table revision", () => {
  it("every write and every merge that changes an entry bumps it; a merge that changes nothing does not", () => {
    const t = new BlockTable(16, A);
    expect(t.revision).toBe(0);
    t.write(3, { owner: B, version: 1, kind: "t" });
    expect(t.revision).toBe(1);
    t.write(3, { owner: B, version: 2, kind: "p" }); // a pin: same owner, still a change of the table
    expect(t.revision).toBe(2);
    expect(t.merge([[3, B, 2, "p"]])).toEqual([]); // already held
    expect(t.merge([[3, A, 1, "t"]])).toEqual([]); // older
    expect(t.revision).toBe(2);
    expect(t.merge([[5, B, 1, "t"]])).toHaveLength(1);
    expect(t.revision).toBe(3);
  });
});

describe("owners view", () => {
  it("is rebuilt only when the table changed, and a new object only when an owner changed", () => {
    const cache = new OwnersCache(parseCidr("10.40.0.0/24"), 26);
    expect(cache.get(null)).toBeUndefined();
    const t = new BlockTable(4, A);
    const v1 = cache.get(t)!;
    expect(v1.range).toBe("10.40.0.0/24");
    expect(v1.blocks).toEqual([0, 64, 128, 192].map((o) => ({ cidr: `10.40.0.${o}/26`, owner: A })));
    expect(cache.get(t)).toBe(v1);
    expect(cache.builds).toBe(1);
    t.write(1, { owner: A, version: 1, kind: "p" }); // revision moves, owners do not
    expect(cache.get(t)).toBe(v1);
    expect(cache.builds).toBe(1);
    t.write(2, { owner: B, version: 1, kind: "t" });
    const v2 = cache.get(t)!;
    expect(v2).not.toBe(v1);
    expect(v2.revision).toBeGreaterThan(v1.revision);
    expect(v2.blocks[2]).toEqual({ cidr: "10.40.0.128/26", owner: B });
    expect(v1.blocks[2]!.owner).toBe(A); // a view never changes under its reader
    // a new table (a new epoch) with other owners: a new view; with the same owners: the same view
    const other = new BlockTable(4, B);
    const v3 = cache.get(other)!;
    expect(v3.blocks.map((b) => b.owner)).toEqual([B, B, B, B]);
    const same = new BlockTable(4, B);
    expect(cache.get(same)).toBe(v3);
  });

  it("agrees with the full status of every node while a cluster forms, grows and hands blocks around", () => {
    const sim = new Sim(prng(7));
    sim.dupRate = 0;
    const f = sim.add({ mayFound: true });
    expect(f.node!.owners()).toBeUndefined(); // no cluster IPAM yet
    sim.run(1);
    const nodes = [f, ...Array.from({ length: 3 }, () => sim.add({ mayFound: false }))];
    const check = () => {
      for (const n of nodes) {
        const node = n.node!;
        const st = node.status(sim.now);
        const v = node.owners();
        if (st.blocks.length === 0) {
          expect(v).toBeUndefined();
          continue;
        }
        expect(v!.range).toBe(st.range);
        expect(v!.blocks).toEqual(st.blocks.map((b) => ({ cidr: b.cidr, owner: b.owner })));
        // asked again without a change: the same object, nothing rebuilt
        const builds = node.ownersBuilds;
        expect(node.owners()).toBe(v);
        expect(node.ownersBuilds).toBe(builds);
      }
    };
    const first = f.node!.owners()!;
    for (let round = 0; round < 12; round++) {
      sim.run(3);
      check();
      // allocations fill blocks and make nodes ask for more: owners change under the views
      for (const n of nodes.slice(1)) for (let i = 0; i < 20; i++) sim.allocate(n);
    }
    check();
    // blocks were granted (every node ended with blocks of its own): the founder's view moved on with them
    for (const n of nodes) expect(n.node!.ownedBlocks().length).toBeGreaterThan(0);
    const last = f.node!.owners()!;
    expect(last).not.toBe(first);
    expect(last.revision).toBeGreaterThan(first.revision);
    expect(new Set(last.blocks.map((b) => b.owner)).size).toBe(nodes.length);
  });

  it("the agent's IPAM driver says when any node's block changed hands (real meshes): once per change, never while nothing changes", async () => {
    const c = cluster(3);
    const dirs = c.ids.map(() => mkdtempSync(join(tmpdir(), "weft-ipam-owners-")));
    let ipams: IpamDriver[] = [];
    try {
      ipams = c.ids.map((idn, i) => {
        const m = c.managers.get(idn.id)!;
        const mayFound = () => m.knownPeers().every((p) => p > idn.id && m.isConnected(p));
        return new IpamDriver({ id: idn.id, mayFound, range: "10.40.0.0/16", blockPrefix: 26, reclaimAfterMs: 600_000, resyncMs: 1000, claimSettleMs: 500, bootstrapWaitMs: 500 }, dirs[i]!, m, silentLogger, () => c.clock.now);
      });
      const seen = ipams.map(() => [] as (readonly string[])[]);
      ipams.forEach((ip, i) => ip.onOwnersChanged(() => seen[i]!.push(ip.owners()!.blocks.map((b) => b.owner))));
      c.welcome();
      const step = async () => {
        c.clock.now += 200;
        for (const m of c.all) m.tick();
        for (const ip of ipams) ip.tick();
        await flush();
      };
      const owners = (ip: IpamDriver) => JSON.stringify(ip.owners()?.blocks.map((b) => b.owner) ?? null);
      const mine = (i: number) => ipams[i]!.owners()?.blocks.some((b) => b.owner === c.ids[i]!.id) ?? false;
      // every node asks for an address: each gets a block of its own, and every node learns of every block
      const got = ipams.map((ip, i) => ip.allocate(`pod/p${i}`, 600_000).then(() => true));
      for (let t = 0; t < 3000 && !(ipams.every((_, i) => mine(i)) && new Set(ipams.map(owners)).size === 1); t++) {
        await step();
        await new Promise((r) => setTimeout(r, 2)); // allocate() retries on a real 200 ms timer
      }
      expect(await Promise.all(got)).toEqual([true, true, true]);
      expect(new Set(ipams.map(owners)).size).toBe(1);
      ipams.forEach((ip, i) => {
        // a notification for every change it saw, each with different owners than the one before
        expect(seen[i]!.length).toBeGreaterThanOrEqual(2); // the founding table, then others' blocks
        for (let k = 1; k < seen[i]!.length; k++) expect(seen[i]![k]).not.toEqual(seen[i]![k - 1]);
        expect(JSON.stringify(seen[i]!.at(-1))).toBe(owners(ip));
        expect(ip.owners()!.blocks).toEqual(ip.status().blocks.map((b) => ({ cidr: b.cidr, owner: b.owner })));
      });
      // settled: heartbeats, hellos and pins go on, owners do not change, and nobody is told they did
      const counts = seen.map((l) => l.length);
      for (let t = 0; t < 25; t++) await step();
      expect(seen.map((l) => l.length)).toEqual(counts);
      for (const d of dirs) expect(existsSync(join(d, "ipam.json"))).toBe(true);
    } finally {
      await Promise.all(ipams.map((ip) => ip.close().catch(() => {})));
      for (const d of dirs) rmSync(d, { recursive: true, force: true });
    }
  }, 60_000);
});
