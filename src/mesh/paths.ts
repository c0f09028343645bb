/**
 * Link-state routing over the gossiped topology (topology.ts). Pure: records in, table out.
 *
 * Graph: an edge A-B exists only when BOTH A's record lists B and B's record lists A (a one-sided report
 * — a link that is still coming up, or going down, or a lie — is ignored). Its weight, in integer
 * microseconds so sums are exact and ties are real ties, is
 *     round(1000 * (max(rttA, rttB) + hopPenaltyMs))
 * max() because the two ends measure the same round trip and the pessimist is safer; the per-hop penalty
 * (default 2 ms) makes a direct link win over a 2-hop path that is only marginally faster.
 *
 * Paths: Dijkstra from self. Ties are broken deterministically: among equal-cost paths to v the one with
 * the lowest first hop wins, then the lowest predecessor. Cost is reported in ms.
 *
 * Hysteresis (per destination, on top of the sticky RTTs in topology.ts): given the previous table,
 * a destination keeps its previous next hop N unless
 *   - N is no longer a bidirectional neighbour or cannot reach dst (the current path is gone), or
 *   - the best path is better by more than `hysteresis` (default 20%): best < (1 - h) * costVia(N),
 *     where costVia(N) = w(self, N) + dist(N, dst), or
 *   - the best path is the direct link to dst (it replaces a relayed path as soon as it is cheaper; see
 *     computeRoutes), or
 *   - N fails the feasibility condition dist(N, dst) < dist(self, dst).
 * The feasibility condition (EIGRP's) is what keeps hysteresis loop-free: every hop then goes to a node
 * strictly closer to dst in the shared topology, whatever each node's history, so forwarding cannot
 * loop once all nodes hold the same records. (A node on a shortest path always satisfies it because every
 * weight is > 0.) During convergence nodes may disagree for a moment — the data plane's hop limit covers
 * those transient micro-loops.
 */
import type { TopologyRecord } from "./topology.js";

export interface RoutingOptions {
  /** added to every hop's RTT (ms); must be > 0 (default 2) */
  hopPenaltyMs?: number;
  /** keep the previous next hop unless the best path is cheaper by more than this fraction (default 0.2) */
  hysteresis?: number;
}

export interface RouteEntry {
  readonly dst: string;
  readonly nextHop: string;
  /** "direct" when nextHop is dst, else the intermediate agent (the next hop) */
  readonly via: "direct" | string;
  /** ms, including hop penalties */
  readonly cost: number;
  /** [self, ..., dst] */
  readonly path: readonly string[];
}

/** Undirected weighted graph: node -> neighbour -> weight in integer microseconds. */
export type Graph = Map<string, Map<string, number>>;

const DEFAULT_PENALTY_MS = 2;
const DEFAULT_HYSTERESIS = 0.2;

function opts(o: RoutingOptions = {}): { penalty: number; h: number } {
  const penalty = o.hopPenaltyMs ?? DEFAULT_PENALTY_MS;
  const h = o.hysteresis ?? DEFAULT_HYSTERESIS;
  if (!(penalty > 0) || !Number.isFinite(penalty)) throw new RangeError("hopPenaltyMs must be > 0");
  if (!(h >= 0 && h < 1)) throw new RangeError("hysteresis must be within [0, 1)");
  return { penalty, h };
}

/** Edge weight in integer µs for two reported RTTs. */
export function linkWeight(rttA: number, rttB: number, hopPenaltyMs = DEFAULT_PENALTY_MS): number {
  return Math.max(1, Math.round(1000 * (Math.max(rttA, rttB) + hopPenaltyMs)));
}

/** Bidirectional graph of the records (every record's node is a vertex, linked or not). */
export function buildGraph(records: Iterable<TopologyRecord>, o: RoutingOptions = {}): Graph {
  const { penalty } = opts(o);
  const byNode = new Map<string, Map<string, number>>();
  for (const r of records) byNode.set(r.node, new Map(r.links.map((l) => [l.peer, l.rttMs])));
  const g: Graph = new Map();
  for (const n of byNode.keys()) g.set(n, new Map());
  for (const [a, links] of byNode) {
    for (const [b, rttA] of links) {
      if (a >= b) continue;
      const rttB = byNode.get(b)?.get(a);
      if (rttB === undefined) continue;
      const w = linkWeight(rttA, rttB, penalty);
      g.get(a)!.set(b, w);
      g.get(b)!.set(a, w);
    }
  }
  return g;
}

export interface ShortestPaths {
  readonly src: string;
  /** µs */
  readonly dist: Map<string, number>;
  readonly firstHop: Map<string, string>;
  readonly pred: Map<string, string>;
}

/** Dijkstra with deterministic tie-breaks (lowest first hop, then lowest predecessor). */
export function shortestPaths(g: Graph, src: string): ShortestPaths {
  const dist = new Map<string, number>();
  const firstHop = new Map<string, string>();
  const pred = new Map<string, string>();
  const done = new Set<string>();
  if (!g.has(src)) return { src, dist, firstHop, pred };
  dist.set(src, 0);
  const heap = new MinHeap();
  heap.push(0, src);
  for (;;) {
    const top = heap.pop();
    if (!top) break;
    const [d, u] = top;
    if (done.has(u) || d !== dist.get(u)) continue;
    done.add(u);
    for (const [v, w] of g.get(u)!) {
      if (done.has(v)) continue;
      const nd = d + w;
      const fh = u === src ? v : firstHop.get(u)!;
      const cur = dist.get(v);
      let better = cur === undefined || nd < cur;
      if (!better && nd === cur) {
        const cfh = firstHop.get(v)!;
        better = fh < cfh || (fh === cfh && u < pred.get(v)!);
      }
      if (better) {
        dist.set(v, nd);
        firstHop.set(v, fh);
        pred.set(v, u);
        if (cur === undefined || nd < cur) heap.push(nd, v);
      }
    }
  }
  return { src, dist, firstHop, pred };
}

function pathTo(sp: ShortestPaths, dst: string): string[] {
  if (!sp.dist.has(dst)) return [];
  const out = [dst];
  let n = dst;
  while (n !== sp.src) {
    n = sp.pred.get(n)!;
    out.push(n);
  }
  return out.reverse();
}

export class RoutingTable {
  private readonly byDst: Map<string, RouteEntry>;

  constructor(
    readonly self: string,
    entries: Iterable<RouteEntry>,
  ) {
    this.byDst = new Map([...entries].sort((a, b) => (a.dst < b.dst ? -1 : 1)).map((e) => [e.dst, e]));
  }

  get size(): number {
    return this.byDst.size;
  }

  nextHop(dst: string): string | undefined {
    return this.byDst.get(dst)?.nextHop;
  }

  /** [self, ..., dst], or [] when dst is unreachable (or is self). */
  path(dst: string): string[] {
    const e = this.byDst.get(dst);
    return e ? [...e.path] : [];
  }

  cost(dst: string): number | undefined {
    return this.byDst.get(dst)?.cost;
  }

  get(dst: string): RouteEntry | undefined {
    return this.byDst.get(dst);
  }

  /** Every reachable destination except self, sorted by dst. */
  entries(): RouteEntry[] {
    return [...this.byDst.values()];
  }
}

/**
 * Routing table of `self` over `records`. Pass the previous table to apply hysteresis (see header).
 */
export function computeRoutes(self: string, records: Iterable<TopologyRecord>, o: RoutingOptions = {}, prev?: RoutingTable): RoutingTable {
  const { h } = opts(o);
  const g = buildGraph(records, o);
  const sp = shortestPaths(g, self);
  const fromNeighbour = new Map<string, ShortestPaths>();
  const spOf = (n: string): ShortestPaths => {
    let s = fromNeighbour.get(n);
    if (!s) {
      s = shortestPaths(g, n);
      fromNeighbour.set(n, s);
    }
    return s;
  };
  const out: RouteEntry[] = [];
  const selfEdges = g.get(self) ?? new Map<string, number>();
  for (const [dst, best] of sp.dist) {
    if (dst === self) continue;
    let nextHop = sp.firstHop.get(dst)!;
    let costUs = best;
    let path = pathTo(sp, dst);
    const old = prev?.nextHop(dst);
    // A direct path needs no margin to replace a relayed one (it only has to be cheaper): the margin would
    // otherwise favour the path that carries the traffic, whose hops are measured warm (a busy link answers
    // pings at once), over the direct link, idle and measured cold (each ping wakes a sleeping reader).
    if (old !== undefined && old !== nextHop && selfEdges.has(old) && nextHop !== dst) {
      const w = selfEdges.get(old)!;
      const spN = spOf(old);
      const dN = spN.dist.get(dst);
      if (dN !== undefined && dN < best && !(best < (1 - h) * (w + dN))) {
        nextHop = old;
        costUs = w + dN;
        path = [self, ...pathTo(spN, dst)];
      }
    }
    out.push({ dst, nextHop, via: nextHop === dst ? "direct" : nextHop, cost: costUs / 1000, path });
  }
  return new RoutingTable(self, out);
}

export interface PrefixRoute {
  readonly cidr: string;
  /** the node that advertises the prefix (the frame's destination node) */
  readonly owner: string;
  /** where to send the frame first */
  readonly nextHop: string;
}

/**
 * Prefix routes for packet/prefix-table.ts: every prefix advertised by a reachable node other than self.
 * A prefix advertised by several nodes goes to the lowest owner id (deterministic on every node);
 * `conflicts` lists such prefixes so the agent can warn. Sorted by cidr text.
 */
export function prefixRoutes(records: Iterable<TopologyRecord>, table: RoutingTable): { routes: PrefixRoute[]; conflicts: { cidr: string; owners: string[] }[] } {
  const owners = new Map<string, string[]>();
  for (const r of records) for (const p of r.prefixes) (owners.get(p) ?? owners.set(p, []).get(p)!).push(r.node);
  const routes: PrefixRoute[] = [];
  const conflicts: { cidr: string; owners: string[] }[] = [];
  for (const cidr of [...owners.keys()].sort()) {
    const os = owners.get(cidr)!.sort();
    if (os.length > 1) conflicts.push({ cidr, owners: os });
    if (os.includes(table.self)) continue; // ours: delivered locally, never forwarded
    const owner = os.find((n) => table.nextHop(n) !== undefined);
    if (owner === undefined) continue;
    routes.push({ cidr, owner, nextHop: table.nextHop(owner)! });
  }
  return { routes, conflicts };
}

/** [cidr, nextHop] pairs ready for PrefixTable.replaceAll(). */
export function nextHopEntries(records: Iterable<TopologyRecord>, table: RoutingTable): [string, string][] {
  return prefixRoutes(records, table).routes.map((r) => [r.cidr, r.nextHop]);
}

export interface RouteChange {
  readonly dst: string;
  readonly from: string | undefined;
  readonly to: string | undefined;
}

/** Next-hop changes between two tables (for logs and `weftnet status`). Sorted by dst. */
export function diffRoutes(prev: RoutingTable | undefined, next: RoutingTable): RouteChange[] {
  const dsts = new Set<string>([...(prev?.entries() ?? []).map((e) => e.dst), ...next.entries().map((e) => e.dst)]);
  const out: RouteChange[] = [];
  for (const dst of [...dsts].sort()) {
    const from = prev?.nextHop(dst);
    const to = next.nextHop(dst);
    if (from !== to) out.push({ dst, from, to });
  }
  return out;
}

/** Binary min-heap of (key, id), ordered by key then id. */
class MinHeap {
  private k: number[] = [];
  private v: string[] = [];
  push(key: number, id: string): void {
    this.k.push(key);
    this.v.push(id);
    let i = this.k.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.less(i, p)) break;
      this.swap(i, p);
      i = p;
    }
  }
  pop(): [number, string] | undefined {
    const n = this.k.length;
    if (n === 0) return undefined;
    const top: [number, string] = [this.k[0]!, this.v[0]!];
    const lk = this.k.pop()!;
    const lv = this.v.pop()!;
    if (n > 1) {
      this.k[0] = lk;
      this.v[0] = lv;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < n - 1 && this.less(l, m)) m = l;
        if (r < n - 1 && this.less(r, m)) m = r;
        if (m === i) break;
        this.swap(i, m);
        i = m;
      }
    }
    return top;
  }
  private less(a: number, b: number): boolean {
    return this.k[a]! < this.k[b]! || (this.k[a] === this.k[b] && this.v[a]! < this.v[b]!);
  }
  private swap(a: number, b: number): void {
    [this.k[a], this.k[b]] = [this.k[b]!, this.k[a]!];
    [this.v[a], this.v[b]] = [this.v[b]!, this.v[a]!];
  }
}
