import { describe, expect, it } from "vitest";
import { PrefixTable } from "../../src/packet/prefix-table.js";
import { parseIPv4 } from "../../src/packet/ip.js";
import { buildGraph, computeRoutes, diffRoutes, nextHopEntries, prefixRoutes } from "../../src/mesh/paths.js";
import type { TopologyRecord } from "../../src/mesh/topology.js";

const id = (n: number) => n.toString(16).padStart(16, "0");
const [A, B, C, D] = [id(0xa), id(0xb), id(0xc), id(0xd)];

/** Symmetric graph from edges [a, b, rtt]; extra one-sided links via `oneSided`. */
function recs(nodes: string[], edges: [string, string, number][], prefixes: Record<string, string[]> = {}, oneSided: [string, string, number][] = []): TopologyRecord[] {
  return nodes.map((n) => ({
    node: n,
    seq: 1,
    links: [
      ...edges.filter(([a, b]) => a === n || b === n).map(([a, b, rttMs]) => ({ peer: a === n ? b : a, rttMs })),
      ...oneSided.filter(([a]) => a === n).map(([, b, rttMs]) => ({ peer: b, rttMs })),
    ],
    prefixes: prefixes[n] ?? [],
  }));
}

describe("computeRoutes", () => {
  it("line A-B-C: C is reached via B", () => {
    const t = computeRoutes(A, recs([A, B, C], [[A, B, 10], [B, C, 10]]));
    expect(t.nextHop(B)).toBe(B);
    expect(t.nextHop(C)).toBe(B);
    expect(t.path(C)).toEqual([A, B, C]);
    expect(t.entries()).toEqual([
      { dst: B, nextHop: B, via: "direct", cost: 12, path: [A, B] },
      { dst: C, nextHop: B, via: B, cost: 24, path: [A, B, C] },
    ]);
    expect(t.nextHop(A)).toBeUndefined();
    expect(t.path(A)).toEqual([]);
  });

  it("triangle with the A-C edge broken: traffic goes via the third node", () => {
    const full = computeRoutes(A, recs([A, B, C], [[A, B, 10], [B, C, 10], [A, C, 15]]));
    expect(full.get(C)?.via).toBe("direct");
    const broken = computeRoutes(A, recs([A, B, C], [[A, B, 10], [B, C, 10]]));
    expect(broken.get(C)?.via).toBe(B);
    expect(diffRoutes(full, broken)).toEqual([{ dst: C, from: C, to: B }]);
  });

  it("asymmetric (one-sided) link reports are ignored", () => {
    const r = recs([A, B, C], [[A, B, 10], [B, C, 10]], {}, [[A, C, 1]]); // only A claims A-C
    expect(buildGraph(r).get(A)!.has(C)).toBe(false);
    expect(computeRoutes(A, r).nextHop(C)).toBe(B);
    // the pessimistic RTT of the two ends is used
    const asym = recs([A, B], [], {}, [[A, B, 1], [B, A, 30]]);
    expect(computeRoutes(A, asym).cost(B)).toBe(32);
  });

  it("the per-hop penalty makes direct win over a marginally faster 2-hop path", () => {
    // direct 21 ms; via B 10 + 10 = 20 ms: direct costs 23, via B 24
    const t = computeRoutes(A, recs([A, B, C], [[A, B, 10], [B, C, 10], [A, C, 21]]));
    expect(t.get(C)?.via).toBe("direct");
    // a clearly faster detour still wins
    const u = computeRoutes(A, recs([A, B, C], [[A, B, 10], [B, C, 10], [A, C, 40]]));
    expect(u.get(C)?.via).toBe(B);
  });

  it("unreachable nodes get no entry", () => {
    const t = computeRoutes(A, recs([A, B, C, D], [[A, B, 1], [C, D, 1]]));
    expect(t.entries().map((e) => e.dst)).toEqual([B]);
    expect(t.nextHop(D)).toBeUndefined();
  });

  it("ties are broken by the lowest next hop, whatever the record order", () => {
    const edges: [string, string, number][] = [[A, C, 5], [C, D, 5], [A, B, 5], [B, D, 5]];
    const r = recs([D, C, B, A], edges);
    expect(computeRoutes(A, r).nextHop(D)).toBe(B);
    expect(computeRoutes(A, [...r].reverse()).nextHop(D)).toBe(B);
  });

  describe("hysteresis", () => {
    const tri = (ac: number) => recs([A, B, C], [[A, B, 10], [B, C, 10], [A, C, ac]]);

    it("keeps the current path unless another relayed path is better by more than 20%; a direct path only has to be cheaper", () => {
      let t = computeRoutes(A, tri(100)); // via B: 24
      expect(t.nextHop(C)).toBe(B);
      // direct 25 (cost 27) vs via B 24: keep B
      t = computeRoutes(A, tri(25), {}, t);
      expect(t.nextHop(C)).toBe(B);
      expect(t.cost(C)).toBe(24);
      expect(t.path(C)).toEqual([A, B, C]);
      // direct 21 (cost 23) vs via B 24: cheaper, and a direct path needs no margin (the relayed path's hops
      // are measured warm while they carry the traffic, the idle direct link cold): switch
      t = computeRoutes(A, tri(21), {}, t);
      expect(t.nextHop(C)).toBe(C);
      // direct back to 28 (cost 30): via B (24) is not 20% better: stay direct
      t = computeRoutes(A, tri(28), {}, t);
      expect(t.nextHop(C)).toBe(C);
      // between two relayed paths the 20% margin holds: A-B-D 24 vs A-C-D
      const D = "000000000000000d";
      const sq = (cd: number) => recs([A, B, C, D], [[A, B, 10], [B, D, 10], [A, C, 10], [C, D, cd]]);
      let u = computeRoutes(A, sq(9)); // via C 23 < via B 24
      expect(u.nextHop(D)).toBe(C);
      u = computeRoutes(A, sq(11), {}, u); // via C 25, via B 24: not 20% better, keep C
      expect(u.nextHop(D)).toBe(C);
      u = computeRoutes(A, sq(20), {}, u); // via C 34, via B 24 < 27.2: switch
      expect(u.nextHop(D)).toBe(B);
    });

    it("switches at once when the current path is gone, and back to direct when it returns and is better", () => {
      let t = computeRoutes(A, tri(5));
      expect(t.nextHop(C)).toBe(C);
      t = computeRoutes(A, recs([A, B, C], [[A, B, 10], [B, C, 10]]), {}, t);
      expect(t.nextHop(C)).toBe(B);
      t = computeRoutes(A, tri(5), {}, t); // 7 vs 24
      expect(t.nextHop(C)).toBe(C);
    });

    it("hysteresis 0 always takes the best path", () => {
      let t = computeRoutes(A, tri(100));
      t = computeRoutes(A, tri(21), { hysteresis: 0 }, t);
      expect(t.nextHop(C)).toBe(C);
    });

    it("never keeps a next hop that is not closer to the destination (feasibility)", () => {
      // Previous: A -> B -> D (B-D short). Then B-D degrades to 100: B's best route to D is back through
      // A (3 + 32 = 35), so via B costs 3 + 35 = 38 and the best (direct, 32) is within 20% of it —
      // the 20% rule alone would keep B, and A <-> B would loop. Feasibility (35 < 32 fails) switches.
      const prev = computeRoutes(A, recs([A, B, D], [[A, B, 1], [B, D, 1], [A, D, 30]]));
      expect(prev.nextHop(D)).toBe(B);
      const t = computeRoutes(A, recs([A, B, D], [[A, B, 1], [B, D, 100], [A, D, 30]]), {}, prev);
      expect(t.nextHop(D)).toBe(D);
      expect(computeRoutes(B, recs([A, B, D], [[A, B, 1], [B, D, 100], [A, D, 30]])).nextHop(D)).toBe(A);
    });
  });

  it("rejects bad options", () => {
    expect(() => computeRoutes(A, [], { hopPenaltyMs: 0 })).toThrow(RangeError);
    expect(() => computeRoutes(A, [], { hysteresis: 1 })).toThrow(RangeError);
  });
});

describe("prefix routes", () => {
  it("maps each prefix to its owner's next hop; own and unreachable prefixes are skipped", () => {
    const r = recs([A, B, C, D], [[A, B, 1], [B, C, 1]], {
      [A]: ["10.40.0.0/24"],
      [B]: ["10.40.1.0/24"],
      [C]: ["10.40.2.0/24", "10.40.3.0/25"],
      [D]: ["10.40.4.0/24"],
    });
    const table = computeRoutes(A, r);
    const { routes, conflicts } = prefixRoutes(r, table);
    expect(conflicts).toEqual([]);
    expect(routes).toEqual([
      { cidr: "10.40.1.0/24", owner: B, nextHop: B },
      { cidr: "10.40.2.0/24", owner: C, nextHop: B },
      { cidr: "10.40.3.0/25", owner: C, nextHop: B },
    ]);
    const rt = new PrefixTable<string>();
    rt.replaceAll(nextHopEntries(r, table));
    expect(rt.lookup4(parseIPv4("10.40.2.9")!)).toBe(B);
    expect(rt.lookup4(parseIPv4("10.40.4.9")!)).toBeUndefined();
  });

  it("a prefix claimed by several nodes goes to the lowest reachable owner and is reported", () => {
    const r = recs([A, B, C], [[A, B, 1], [A, C, 1]], { [B]: ["10.40.1.0/24"], [C]: ["10.40.1.0/24"] });
    const { routes, conflicts } = prefixRoutes(r, computeRoutes(A, r));
    expect(routes).toEqual([{ cidr: "10.40.1.0/24", owner: B, nextHop: B }]);
    expect(conflicts).toEqual([{ cidr: "10.40.1.0/24", owners: [B, C] }]);
  });
});
