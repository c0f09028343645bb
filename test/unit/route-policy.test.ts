// Route policy without an agent (agent/route-policy.ts): what this node announces, which prefixes of other
// nodes the router may use, which of their routes it installs, and the cryptokey source table.
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { RoutePolicy, type RoutePolicyDeps } from "../../agent/route-policy.js";
import { formatCidr, overlaps, parseCidr } from "../../src/ipam/cidr.js";
import type { IpamOwners } from "../../src/ipam/index.js";
import { silentLogger } from "../../src/log.js";

const A = "aaaaaaaaaaaaaaaa";
const B = "bbbbbbbbbbbbbbbb";
const C = "cccccccccccccccc";

let revision = 0;
/** a fresh owners view per call (as a new IPAM table would give): the policy must compare contents */
function ipam(blocks: [string, string][]): IpamOwners {
  return { revision: ++revision, range: "10.40.0.0/16", blocks: blocks.map(([cidr, owner]) => ({ cidr, owner })) };
}

function policy(opts: Partial<Omit<RoutePolicyDeps, "records">> & { records?: { node: string; prefixes: string[] }[] } = {}) {
  let now = 0;
  const changed: number[] = [];
  const { records = [], ...over } = opts;
  const p = new RoutePolicy({
    selfId: A,
    configuredRange: "10.40.0.0/16",
    advertise: [],
    accept: "all",
    ownedBlocks: () => ["10.40.0.0/26", "10.40.0.64/26"],
    ipamOwners: () => ipam([["10.40.0.0/26", A], ["10.40.0.64/26", A], ["10.40.1.0/26", B]]),
    records: () => records,
    peerName: (id) => (id === B ? "node-b" : undefined),
    hostNetworks: () => [],
    protectedHosts: () => ["192.0.2.10"],
    prefixesChanged: () => changed.push(++now),
    logger: silentLogger,
    ...over,
  });
  return { p, changed };
}

describe("RoutePolicy", () => {
  it("announces its blocks aggregated, plus its advertised routes", () => {
    const { p } = policy({ advertise: ["192.168.7.0/24"] });
    expect(p.localPrefixes()).toEqual(["10.40.0.0/25", "192.168.7.0/24"]);
  });

  it("a cluster prefix is allowed only to the node the IPAM table gives every address of it", () => {
    const { p } = policy();
    expect(p.prefixAllowed(B, "10.40.1.0/26")).toBe(true);
    expect(p.prefixAllowed(B, "10.40.1.0/27")).toBe(true); // inside its block
    expect(p.prefixAllowed(B, "10.40.0.0/25")).toBe(false); // A's
    expect(p.prefixAllowed(A, "10.40.0.0/25")).toBe(true);
    expect(p.prefixAllowed(A, "10.40.0.0/24")).toBe(false); // half of it is nobody's
    expect(p.prefixAllowed(B, "10.40.0.0/16")).toBe(false);
  });

  it("an outside prefix is allowed only once this node decided to install it", () => {
    const { p } = policy({ records: [{ node: B, prefixes: ["10.40.1.0/26", "172.20.0.0/16"] }, { node: C, prefixes: ["192.0.2.0/24"] }] });
    expect(p.prefixAllowed(B, "172.20.0.0/16")).toBe(false); // nothing decided yet (no data plane)
    expect(p.acceptedRoutes()).toEqual(["172.20.0.0/16"]); // 192.0.2.0/24 holds a protected host
    expect(p.decisions.find((d) => d.cidr === "192.0.2.0/24")).toMatchObject({ node: C, accepted: false });
    expect(p.prefixAllowed(B, "172.20.0.0/16")).toBe(true);
    expect(p.prefixAllowed(C, "172.20.0.0/16")).toBe(false);
  });

  it("accepts nothing by default (--accept-routes unset)", () => {
    const { p } = policy({ accept: undefined, records: [{ node: B, prefixes: ["172.20.0.0/16"] }] });
    expect(p.acceptedRoutes()).toEqual([]);
    expect(p.decisions[0]).toMatchObject({ accepted: false, reason: "not accepted here (--accept-routes)" });
  });

  it("the source table: IPAM owners, our advertised routes, accepted routes; a change bumps its version", () => {
    const records = [{ node: B, prefixes: ["172.20.0.0/16"] }];
    const { p } = policy({ advertise: ["192.168.7.0/24"], records });
    expect(p.sourcesVersion).toBe(0);
    p.refreshSources();
    expect(p.sourcesVersion).toBe(1);
    expect(Object.fromEntries(p.sources.entries().map((e) => [e.cidr, e.value]))).toEqual({
      "10.40.0.0/26": A,
      "10.40.0.64/26": A,
      "10.40.1.0/26": B,
      "192.168.7.0/24": A,
      "172.20.0.0/16": B,
    });
    p.refreshSources();
    expect(p.sourcesVersion).toBe(1); // unchanged: not rebuilt
    records.push({ node: C, prefixes: ["172.21.0.0/16"] });
    p.refreshSources();
    expect(p.sourcesVersion).toBe(2);
    expect(p.sources.get("172.21.0.0/16")).toBe(C);
  });

  it("the source table follows the owners view: the same view (or the same owners in a new one) rebuilds nothing, an owner change does", () => {
    let view = ipam([["10.40.0.0/26", A], ["10.40.1.0/26", B]]);
    const { p } = policy({ ipamOwners: () => view });
    p.refreshSources();
    expect(p.counters.sourcesBuilds).toBe(1);
    for (let i = 0; i < 5; i++) p.refreshSources();
    expect(p.counters.sourcesBuilds).toBe(1);
    expect(p.counters.indexBuilds).toBe(1);
    view = ipam([["10.40.0.0/26", A], ["10.40.1.0/26", B]]); // a new view object, the same owners
    p.refreshSources();
    expect(p.counters.sourcesBuilds).toBe(1);
    expect(p.sourcesVersion).toBe(1);
    view = ipam([["10.40.0.0/26", A], ["10.40.1.0/26", A]]); // B's block went to A
    p.refreshSources();
    expect(p.counters.sourcesBuilds).toBe(2);
    expect(p.sourcesVersion).toBe(2);
    expect(p.sources.get("10.40.1.0/26")).toBe(A);
  });

  it("reports a conflict with another node's prefix and re-announces once; both keep advertising", () => {
    const records = [{ node: B, prefixes: ["192.168.7.128/25"] }];
    const { p, changed } = policy({ advertise: ["192.168.7.0/24"], records });
    p.checkConflicts();
    expect(p.conflicts).toEqual([{ route: "192.168.7.0/24", other: "192.168.7.128/25", node: B, nodeName: "node-b", kept: true }]);
    expect(changed.length).toBe(1);
    p.checkConflicts();
    expect(changed.length).toBe(1);
    expect(p.advertisedRoutes()).toEqual(["192.168.7.0/24"]);
    // and this node does not install the other side either
    expect(p.acceptedRoutes()).toEqual([]);
  });

  it("parses each prefix once across router recomputes; an ownership change or a changed advertisement is decided anew", () => {
    let table: [string, string][] = [["10.40.0.0/26", A], ["10.40.0.64/26", A], ["10.40.1.0/26", B]];
    const records = [{ node: B, prefixes: ["10.40.1.0/26", "172.20.0.0/16"] }];
    const { p } = policy({ ipamOwners: () => ipam(table), records });
    p.acceptedRoutes();
    // a recompute asks for every prefix of every record (src/mesh/router.ts); each call here gets a fresh owners view
    const recompute = () => records.flatMap((r) => r.prefixes.map((c) => p.prefixAllowed(r.node, c)));
    expect(recompute()).toEqual([true, true]);
    const parses = p.counters.cidrParses;
    expect(p.counters.indexBuilds).toBe(1);
    for (let i = 0; i < 5; i++) expect(recompute()).toEqual([true, true]);
    expect(p.counters.cidrParses).toBe(parses); // cached: nothing parsed again
    expect(p.counters.indexBuilds).toBe(1); // same owners in every new snapshot: decisions reused
    // the advertisement changes: B now announces a prefix half of which is A's
    records[0]!.prefixes = ["10.40.1.0/26", "10.40.0.0/25"];
    expect(recompute()).toEqual([true, false]);
    expect(p.counters.cidrParses).toBe(parses + 1);
    // the IPAM table changes: A's blocks go to B; the cached decision for B's prefix is dropped
    table = [["10.40.0.0/26", B], ["10.40.0.64/26", B], ["10.40.1.0/26", B]];
    expect(recompute()).toEqual([true, true]);
    expect(p.counters.indexBuilds).toBe(2);
    // and back: ownership decides, not the cache
    table = [["10.40.0.0/26", A], ["10.40.0.64/26", B], ["10.40.1.0/26", B]];
    expect(recompute()).toEqual([true, false]);
    expect(p.prefixAllowed(B, "10.40.0.64/27")).toBe(true);
    expect(p.prefixAllowed(A, "10.40.0.0/26")).toBe(true);
    // outside prefixes follow the latest route decisions
    expect(p.prefixAllowed(B, "172.20.0.0/16")).toBe(true);
    records[0]!.prefixes = ["10.40.1.0/26"];
    p.acceptedRoutes();
    expect(p.prefixAllowed(B, "172.20.0.0/16")).toBe(false);
  });

  it("an invalid prefix throws every time (not cached), as before", () => {
    const { p } = policy();
    expect(() => p.prefixAllowed(B, "10.40.1.1/26")).toThrow();
    expect(() => p.prefixAllowed(B, "10.40.1.1/26")).toThrow();
  });

  it("the cached decisions equal a fresh computation over random tables, prefixes and ownership changes", () => {
    // the rule as written before the cache (parse everything on every call)
    const fresh = (st: IpamOwners, node: string, cidr: string) => {
      const c = parseCidr(cidr);
      const range = parseCidr(st.range);
      if (c.prefix < range.prefix) return false;
      let covered = 0;
      for (const b of st.blocks) {
        if (b.owner !== node) continue;
        const bc = parseCidr(b.cidr);
        if (bc.prefix >= c.prefix && overlaps(bc, c)) covered += 2 ** (32 - bc.prefix);
        else if (bc.prefix < c.prefix && overlaps(bc, c)) return true;
      }
      return covered === 2 ** (32 - c.prefix);
    };
    const owner = fc.constantFrom(A, B, C, "");
    const table = fc.array(owner, { minLength: 16, maxLength: 16 }).map((owners) => ipam(owners.map((o, i) => [`10.40.0.${i * 16}/28`, o])));
    const prefix = fc.tuple(fc.integer({ min: 0, max: 255 }), fc.integer({ min: 23, max: 30 })).map(([n, len]) => formatCidr({ base: (0x0a280000 + (n << 2)) & ~(2 ** (32 - len) - 1) >>> 0, prefix: len }));
    fc.assert(
      fc.property(fc.array(fc.tuple(table, fc.array(fc.tuple(owner, prefix), { minLength: 1, maxLength: 12 })), { minLength: 1, maxLength: 6 }), (rounds) => {
        let st = rounds[0]![0];
        const { p } = policy({ ipamOwners: () => st });
        for (const [t, asks] of rounds) {
          st = t;
          for (let rep = 0; rep < 2; rep++) for (const [n, c] of asks) expect(p.prefixAllowed(n, c)).toBe(fresh(st, n, c));
        }
      }),
      { numRuns: 300 },
    );
  });
});
