// Property tests for the link-state core: Dijkstra against a slow reference (Floyd–Warshall), loop-free
// forwarding (with and without hysteresis), merge laws, and gossip convergence over random graphs with
// random delivery order, duplication and a restart that lost its seq counter.
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { buildGraph, computeRoutes, linkWeight, type RoutingTable } from "../../src/mesh/paths.js";
import { Topology, type TopologyRecord } from "../../src/mesh/topology.js";
import { prng } from "../helpers/prng.js";

const id = (n: number) => (0x1000 + n * 7919).toString(16).padStart(16, "0");


// ---- random topologies ------------------------------------------------------------------------------

interface RandGraph {
  nodes: string[];
  records: TopologyRecord[];
}

const rtt = fc.oneof(fc.integer({ min: 0, max: 100 }), fc.double({ min: 0, max: 100, noNaN: true }).map((x) => Math.round(x * 10) / 10));

/** 3..12 nodes; each unordered pair: absent, both ends report (RTTs may differ), or only one end reports. */
const graphArb: fc.Arbitrary<RandGraph> = fc.integer({ min: 3, max: 12 }).chain((n) => {
  const pairs: [number, number][] = [];
  for (let i = 0; i < n; i++) for (let j = i + 1; j < n; j++) pairs.push([i, j]);
  return fc
    .tuple(...pairs.map(() => fc.tuple(fc.constantFrom<"none" | "both" | "a" | "b">("none", "both", "both", "a", "b"), rtt, rtt)))
    .map((choices) => {
      const nodes = Array.from({ length: n }, (_, i) => id(i));
      const links: { peer: string; rttMs: number }[][] = nodes.map(() => []);
      choices.forEach(([kind, ra, rb], k) => {
        const [i, j] = pairs[k]!;
        if (kind === "both" || kind === "a") links[i]!.push({ peer: nodes[j]!, rttMs: ra });
        if (kind === "both" || kind === "b") links[j]!.push({ peer: nodes[i]!, rttMs: rb });
      });
      const records = nodes.map((node, i) => ({ node, seq: 1, links: links[i]!, prefixes: [] }));
      return { nodes, records };
    });
});

/** Floyd–Warshall on an independently built graph (edge iff both ends report it). µs, Infinity = none. */
function floyd(g: RandGraph, penalty = 2): number[][] {
  const n = g.nodes.length;
  const idx = new Map(g.nodes.map((x, i) => [x, i]));
  const d = Array.from({ length: n }, (_, i) => Array.from({ length: n }, (_, j) => (i === j ? 0 : Infinity)));
  const rep = new Map<string, number>();
  for (const r of g.records) for (const l of r.links) rep.set(`${r.node}>${l.peer}`, l.rttMs);
  for (const r of g.records) {
    for (const l of r.links) {
      const back = rep.get(`${l.peer}>${r.node}`);
      if (back === undefined) continue;
      const i = idx.get(r.node)!;
      const j = idx.get(l.peer)!;
      d[i]![j] = Math.min(d[i]![j]!, linkWeight(l.rttMs, back, penalty));
    }
  }
  for (let k = 0; k < n; k++) for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) if (d[i]![k]! + d[k]![j]! < d[i]![j]!) d[i]![j] = d[i]![k]! + d[k]![j]!;
  return d;
}

/** Follow next hops from src to dst through each node's own table; returns the hop count or -1 on a loop/dead end. */
function walk(tables: Map<string, RoutingTable>, src: string, dst: string, max: number): number {
  let at = src;
  for (let hops = 0; hops <= max; hops++) {
    if (at === dst) return hops;
    const nh = tables.get(at)!.nextHop(dst);
    if (nh === undefined) return -1;
    at = nh;
  }
  return -1;
}

describe("routing properties", () => {
  it("Dijkstra costs equal Floyd–Warshall, and every path is a real path of that cost", () => {
    fc.assert(
      fc.property(graphArb, (g) => {
        const fw = floyd(g);
        const graph = buildGraph(g.records);
        g.nodes.forEach((src, i) => {
          const t = computeRoutes(src, g.records);
          g.nodes.forEach((dst, j) => {
            if (i === j) return;
            const e = t.get(dst);
            if (fw[i]![j] === Infinity) {
              expect(e).toBeUndefined();
              return;
            }
            expect(e).toBeDefined();
            expect(Math.round(e!.cost * 1000)).toBe(fw[i]![j]);
            expect(e!.path[0]).toBe(src);
            expect(e!.path.at(-1)).toBe(dst);
            expect(e!.nextHop).toBe(e!.path[1]);
            expect(e!.via).toBe(e!.nextHop === dst ? "direct" : e!.nextHop);
            let sum = 0;
            for (let k = 1; k < e!.path.length; k++) sum += graph.get(e!.path[k - 1]!)!.get(e!.path[k]!)!;
            expect(sum).toBe(fw[i]![j]);
          });
        });
      }),
      { numRuns: 150 },
    );
  });

  it("result does not depend on record order (deterministic tie-breaks)", () => {
    fc.assert(
      fc.property(graphArb, fc.integer(), (g, seed) => {
        const rand = prng(seed);
        const shuffled = [...g.records].sort(() => rand() - 0.5).map((r) => ({ ...r, links: [...r.links].sort(() => rand() - 0.5) }));
        for (const src of g.nodes) expect(computeRoutes(src, shuffled).entries()).toEqual(computeRoutes(src, g.records).entries());
      }),
      { numRuns: 100 },
    );
  });

  it("no forwarding loops when all nodes share the topology, with or without hysteresis history", () => {
    fc.assert(
      fc.property(graphArb, fc.array(graphArb, { minLength: 0, maxLength: 3 }), fc.double({ min: 0, max: 0.9, noNaN: true }), (g, history, h) => {
        const fw = floyd(g);
        // each node carries its own history: tables computed from earlier (random, unrelated) topologies
        const tables = new Map<string, RoutingTable>();
        g.nodes.forEach((self, i) => {
          let prev: RoutingTable | undefined;
          for (const old of history) {
            // reuse node ids: old graphs with fewer nodes are fine, absent nodes just have no routes
            const recs = old.records.filter((r) => g.nodes.includes(r.node));
            prev = computeRoutes(self, i % 2 === 0 ? recs : [...recs].reverse(), { hysteresis: h }, prev);
          }
          tables.set(self, computeRoutes(self, g.records, { hysteresis: h }, prev));
        });
        g.nodes.forEach((src, i) =>
          g.nodes.forEach((dst, j) => {
            if (fw[i]![j] === Infinity) return;
            const hops = walk(tables, src, dst, g.nodes.length);
            expect(hops, `${src} -> ${dst}`).toBeGreaterThanOrEqual(0);
          }),
        );
        // hysteresis never picks a path worse than best / (1 - h)
        for (const [src, t] of tables) {
          const i = g.nodes.indexOf(src);
          for (const e of t.entries()) expect(e.cost * 1000 * (1 - h)).toBeLessThanOrEqual(fw[i]![g.nodes.indexOf(e.dst)]! + 1e-6);
        }
      }),
      { numRuns: 150 },
    );
  });
});

// ---- merge laws ------------------------------------------------------------------------------------

const SELF = id(99);
const origins = [id(1), id(2), id(3), id(4)];
const recArb: fc.Arbitrary<TopologyRecord> = fc.record({
  node: fc.constantFrom(...origins),
  seq: fc.integer({ min: 1, max: 4 }),
  links: fc.uniqueArray(fc.constantFrom(...origins, SELF), { maxLength: 3 }).chain((peers) =>
    fc.tuple(...peers.map(() => fc.integer({ min: 0, max: 3 }))).map((rtts) => peers.map((peer, k) => ({ peer, rttMs: rtts[k]! }))),
  ),
  prefixes: fc.uniqueArray(fc.constantFrom("10.40.1.0/24", "10.40.2.0/24", "fd00::/64"), { maxLength: 2 }).map((p) => p.sort()),
}).map((r) => ({ ...r, links: r.links.filter((l) => l.peer !== r.node).sort((a, b) => (a.peer < b.peer ? -1 : 1)) }));
const batch = fc.array(recArb, { maxLength: 8 });

function of(...batches: TopologyRecord[][]): Topology {
  const t = new Topology(SELF);
  for (const b of batches) t.merge(b, 0);
  return t;
}
const state = (t: Topology) => JSON.stringify(t.records());
const join = (a: Topology, b: Topology) => of(a.records(), b.records());

describe("merge laws", () => {
  it("commutative, associative, idempotent; order of records inside a batch does not matter", () => {
    fc.assert(
      fc.property(batch, batch, batch, (x, y, z) => {
        const [a, b, c] = [of(x), of(y), of(z)];
        expect(state(join(a, b))).toBe(state(join(b, a)));
        expect(state(join(join(a, b), c))).toBe(state(join(a, join(b, c))));
        expect(state(join(a, a))).toBe(state(a));
        expect(state(of([...x].reverse()))).toBe(state(a));
        expect(state(of(x, y))).toBe(state(join(a, b)));
      }),
      { numRuns: 300 },
    );
  });

  it("delta is exactly what changed, and merging only the delta reaches the same state", () => {
    fc.assert(
      fc.property(batch, batch, (x, y) => {
        const t = of(x);
        const before = new Map(t.records().map((r) => [r.node, JSON.stringify(r)]));
        const delta = t.merge(y, 0);
        const after = t.records();
        const changed = after.filter((r) => before.get(r.node) !== JSON.stringify(r));
        // the delta may name an origin twice (two newer versions in one batch); its last entry is the state
        const lastOfDelta = new Map(delta.map((r) => [r.node, JSON.stringify(r)]));
        expect([...lastOfDelta.keys()].sort()).toEqual(changed.map((r) => r.node));
        for (const r of changed) expect(lastOfDelta.get(r.node)).toBe(JSON.stringify(r));
        // delta suppression: a replay is not new
        expect(t.merge(y, 0)).toEqual([]);
        expect(t.merge(delta, 0)).toEqual([]);
        expect(state(of(x, delta))).toBe(state(t));
      }),
      { numRuns: 300 },
    );
  });
});

// ---- gossip simulation -----------------------------------------------------------------------------

interface Msg {
  from: string;
  to: string;
  recs: TopologyRecord[];
}

function connectedGraph(n: number, rand: () => number): [number, number][] {
  const edges = new Set<string>();
  for (let i = 1; i < n; i++) edges.add(`${Math.floor(rand() * i)},${i}`); // random spanning tree
  const extra = Math.floor(rand() * n);
  for (let k = 0; k < extra; k++) {
    const a = Math.floor(rand() * n);
    const b = Math.floor(rand() * n);
    if (a !== b) edges.add(`${Math.min(a, b)},${Math.max(a, b)}`);
  }
  return [...edges].map((e) => e.split(",").map(Number) as [number, number]);
}

describe("gossip simulation", () => {
  it("random connected graphs, random delivery order and duplicates, RTT changes, a restart: all nodes converge and routes are loop-free", () => {
    fc.assert(
      fc.property(fc.integer({ min: 3, max: 12 }), fc.integer(), (n, seed) => {
        const rand = prng(seed);
        const nodes = Array.from({ length: n }, (_, i) => id(i));
        const edges = connectedGraph(n, rand);
        const nbrs = new Map(nodes.map((x) => [x, new Set<string>()]));
        for (const [a, b] of edges) {
          nbrs.get(nodes[a]!)!.add(nodes[b]!);
          nbrs.get(nodes[b]!)!.add(nodes[a]!);
        }
        const rtts = new Map<string, number>();
        const key = (a: string, b: string) => (a < b ? `${a}|${b}` : `${b}|${a}`);
        for (const [a, b] of edges) rtts.set(key(nodes[a]!, nodes[b]!), 1 + Math.floor(rand() * 80));
        let now = 1_000_000;
        const topo = new Map(nodes.map((x) => [x, new Topology(x)]));
        const queue: Msg[] = [];
        let sent = 0;
        const flood = (from: string, recs: TopologyRecord[], except?: string) => {
          if (recs.length === 0) return;
          for (const p of nbrs.get(from)!) if (p !== except) queue.push({ from, to: p, recs }), sent++;
        };
        const local = (x: string) => {
          const r = topo.get(x)!.setLocal([...nbrs.get(x)!].map((p) => ({ peer: p, rttMs: rtts.get(key(x, p))! })), [`10.40.${nodes.indexOf(x)}.0/24`], now);
          if (r) flood(x, [r]);
        };
        const linkUp = (x: string) => {
          local(x);
          for (const p of nbrs.get(x)!) queue.push({ from: x, to: p, recs: topo.get(x)!.fullSync() });
        };
        const deliver = (steps: number) => {
          for (let s = 0; s < steps && queue.length > 0; s++) {
            const i = Math.floor(rand() * queue.length);
            const m = queue[i]!;
            if (rand() < 0.1) queue.push(m); // duplicate
            else queue.splice(i, 1);
            const { delta, originated } = topo.get(m.to)!.mergeDetailed(m.recs, now);
            flood(m.to, delta.filter((r) => r !== originated), m.from);
            if (originated) flood(m.to, [originated]);
            now += 1;
          }
        };

        for (const x of nodes) linkUp(x);
        deliver(Math.floor(rand() * 50));
        // RTT changes while gossip is in flight (some beyond the stickiness threshold)
        for (let k = 0; k < 3; k++) {
          const [a, b] = edges[Math.floor(rand() * edges.length)]!;
          rtts.set(key(nodes[a]!, nodes[b]!), 1 + Math.floor(rand() * 200));
          local(nodes[a]!);
          local(nodes[b]!);
          deliver(Math.floor(rand() * 30));
        }
        // one node restarts without its counter and with a clock behind its old seq
        const victim = nodes[Math.floor(rand() * n)]!;
        queue.splice(0, queue.length, ...queue.filter((m) => m.to !== victim && m.from !== victim));
        topo.set(victim, new Topology(victim));
        const savedNow = now;
        now = 1000; // its clock: far behind
        linkUp(victim);
        now = savedNow;
        for (const p of nbrs.get(victim)!) queue.push({ from: p, to: victim, recs: topo.get(p)!.fullSync() });
        // a periodic refresh somewhere
        const r = topo.get(nodes[0]!)!.refresh(now, true);
        if (r) flood(nodes[0]!, [r]);
        deliver(1_000_000);
        expect(queue).toHaveLength(0);

        const ref = JSON.stringify(topo.get(nodes[0]!)!.records());
        for (const x of nodes) expect(JSON.stringify(topo.get(x)!.records()), x).toBe(ref);
        expect(topo.get(nodes[0]!)!.size).toBe(n);
        // the restarted node's current record won everywhere
        const vr = topo.get(nodes[0]!)!.get(victim)!;
        expect(vr.links.map((l) => l.peer).sort()).toEqual([...nbrs.get(victim)!].sort());
        expect(vr.seq).toBe(topo.get(victim)!.seq);

        // loop-free forwarding over each node's own converged copy; everyone reaches everyone
        const tables = new Map(nodes.map((x) => [x, computeRoutes(x, topo.get(x)!.records())]));
        for (const s of nodes) for (const d of nodes) expect(walk(tables, s, d, n)).toBeGreaterThanOrEqual(0);
        // delta suppression keeps traffic bounded: each version crosses each link direction at most once
        expect(sent).toBeLessThan(2 * edges.length * (n * 8 + 10));
      }),
      { numRuns: 120 },
    );
  });
});
