/**
 * Route policy: which prefixes this node announces, which routes of other nodes it installs, and who may
 * use which address (cryptokey routing).
 *
 *   localPrefixes()     this node's IPAM blocks (aggregated) + its advertised routes: what its topology
 *                       record announces (src/mesh/router.ts asks for it)
 *   prefixAllowed()     route ownership comes from what a node owns, not what it claims (router filter)
 *   checkConflicts()    our --advertise-routes against every other node's prefixes outside the cluster range:
 *                       conflicts are reported, never settled by node id (ids can be ground)
 *   acceptedRoutes()    other nodes' routes this node installs (--accept-routes; agent/os/advertise.ts
 *                       decideRoutes), kept as `decisions` for status
 *   refreshSources()    the address -> node table the data path checks every packet's source against
 *
 * checkAdvertisedRoutes() validates the flag at start (CLI and Agent.start).
 */
import { UsageError } from "../src/errors.js";
import { aggregateCidrs } from "../src/ipam/aggregate.js";
import { overlaps, parseCidr, type Cidr } from "../src/ipam/cidr.js";
import type { IpamOwners } from "../src/ipam/index.js";
import type { Logger } from "../src/log.js";
import { PrefixTable } from "../src/packet/prefix-table.js";
import { decideRoutes, type RouteDecision } from "./os/advertise.js";
import type { RouteConflict } from "./status.js";

/** Advertised routes must be valid IPv4 CIDRs outside the cluster range. */
export function checkAdvertisedRoutes(routes: string[], clusterRange: string): void {
  const range = parseCidr(clusterRange);
  for (const r of routes) {
    let c;
    try {
      c = parseCidr(r);
    } catch {
      throw new UsageError(`advertised route ${JSON.stringify(r)} is not an IPv4 CIDR like 192.168.1.0/24`);
    }
    if (overlaps(c, range)) throw new UsageError(`advertised route ${r} overlaps the cluster range ${clusterRange}: the mesh already routes it to pods; advertise networks outside it`);
  }
  for (let i = 0; i < routes.length; i++)
    for (let j = i + 1; j < routes.length; j++) if (overlaps(parseCidr(routes[i]!), parseCidr(routes[j]!))) throw new UsageError(`advertised routes ${routes[i]} and ${routes[j]} overlap each other`);
}

/** parsed CIDR strings kept by RoutePolicy.parse (well above records x prefixes + blocks of a big cluster) */
const MAX_PARSED = 65_536;

interface BlockIndex {
  st: IpamOwners;
  rangeStr: string;
  range: Cidr;
  /** cidr, owner, cidr, owner, ... of st.blocks in order */
  pairs: string[];
  byOwner: Map<string, Cidr[]>;
  /** "node cidr" -> prefixAllowed for cluster prefixes, valid for this ownership */
  results: Map<string, boolean>;
}

function sameOwners(pairs: string[], blocks: IpamOwners["blocks"]): boolean {
  if (pairs.length !== blocks.length * 2) return false;
  for (let i = 0; i < blocks.length; i++) if (pairs[2 * i] !== blocks[i]!.cidr || pairs[2 * i + 1] !== blocks[i]!.owner) return false;
  return true;
}

/** A cluster prefix `c` is a node's when its `blocks` cover every address of it (or one block holds it). */
function ownsAll(c: Cidr, range: Cidr, blocks: Cidr[]): boolean {
  if (c.prefix < range.prefix) return false;
  let covered = 0;
  for (const bc of blocks) {
    if (bc.prefix >= c.prefix && overlaps(bc, c)) covered += 2 ** (32 - bc.prefix);
    else if (bc.prefix < c.prefix && overlaps(bc, c)) return true; // inside one of its blocks
  }
  return covered === 2 ** (32 - c.prefix);
}

export interface RoutePolicyDeps {
  selfId: string;
  /** the configured cluster range (conflict checks) */
  configuredRange: string;
  /** --advertise-routes */
  advertise: readonly string[];
  /** --accept-routes */
  accept: "all" | string[] | undefined;
  /** this node's IPAM blocks, the same array until ownership changes (undefined: IPAM not up yet) */
  ownedBlocks(): string[] | undefined;
  /**
   * The IPAM block owners (undefined: IPAM not up yet). Cheap and the same object until an owner changes
   * (src/ipam/owners.ts): asked on every prefix of every routing recompute and every sources refresh.
   */
  ipamOwners(): IpamOwners | undefined;
  /** every node's gossiped prefixes */
  records(): Iterable<{ readonly node: string; readonly prefixes: readonly string[] }>;
  peerName(id: string): string | undefined;
  /** IPv4 networks of this host's interfaces (the underlay; never routed into the overlay) */
  hostNetworks(): Cidr[];
  /** addresses never routed into the overlay: the signaling and STUN/TURN servers, peers' addresses */
  protectedHosts(): string[];
  /** our prefixes changed: re-announce them */
  prefixesChanged(): void;
  logger: Logger;
}

export class RoutePolicy {
  /**
   * Conflicts between our advertised routes and other nodes'. Reported, not settled by node id (ids can be
   * ground): both sides keep advertising and every receiver installs neither (agent/os/advertise.ts
   * decideRoutes) until an operator changes --advertise-routes. `kept` is always true (kept for the API).
   */
  conflicts: RouteConflict[] = [];
  /** the last decision on every route other nodes advertise (status: installed or why not) */
  decisions: RouteDecision[] = [];
  /** address -> node allowed to use it (the Forwarder's `sources`), rebuilt by refreshSources() */
  readonly sources = new PrefixTable<string>();
  private sourcesKey = "";
  private sourcesIdx: BlockIndex | undefined;
  /** bumped whenever `sources` changes (the router's owner table follows it) */
  sourcesVersion = 0;
  private aggKey: string[] | undefined;
  private aggregated: string[] = [];
  private readonly parsed = new Map<string, Cidr>();
  private index: BlockIndex | undefined;
  private acceptedKeysOf: RouteDecision[] | undefined;
  private acceptedKeys = new Set<string>();
  /** work prefixAllowed did (tests: the cached path parses nothing again) */
  readonly counters = { cidrParses: 0, indexBuilds: 0, sourcesBuilds: 0 };

  constructor(private readonly d: RoutePolicyDeps) {}

  /** Prefixes this node owns or advertises (IPAM blocks, aggregated). */
  localPrefixes(): string[] {
    const owned = this.d.ownedBlocks() ?? [];
    if (owned !== this.aggKey) {
      // ownedBlocks() returns the same array until ownership changes: aggregate once per change.
      this.aggKey = owned;
      this.aggregated = aggregateCidrs(owned);
    }
    return [...this.aggregated, ...this.advertisedRoutes()];
  }

  /**
   * Route ownership comes from what a node owns, not from what it claims: a cluster prefix only when the
   * IPAM table gives every address of it to that node, an external one only when this node installs it
   * (--accept-routes, decideRoutes; without a data plane none is decided, so none is used).
   */
  prefixAllowed(node: string, cidr: string): boolean {
    const c = this.parse(cidr);
    const st = this.d.ipamOwners();
    if (!st) return false;
    const idx = this.blockIndex(st);
    if (overlaps(c, idx.range)) {
      const key = `${node} ${cidr}`;
      const known = idx.results.get(key);
      if (known !== undefined) return known;
      const ok = ownsAll(c, idx.range, idx.byOwner.get(node) ?? []);
      idx.results.set(key, ok);
      return ok;
    }
    if (this.acceptedKeysOf !== this.decisions) {
      this.acceptedKeysOf = this.decisions;
      this.acceptedKeys = new Set(this.decisions.filter((d) => d.accepted).map((d) => `${d.node} ${d.cidr}`));
    }
    return this.acceptedKeys.has(`${node} ${cidr}`);
  }

  /**
   * Parsed CIDRs by their string (records' prefixes, block CIDRs, the range): a router recompute asks
   * prefixAllowed for every prefix of every record, and parsing them each time cost 150-200 ms per
   * recompute in CPU profiles (issue 10). A string's parse never changes; an advertisement that changes
   * is a new string. Invalid strings are not cached (they throw every time, as before). Bounded: cleared
   * when it outgrows MAX_PARSED (prefixes nobody advertises any more).
   */
  private parse(s: string): Cidr {
    let c = this.parsed.get(s);
    if (!c) {
      c = parseCidr(s);
      if (this.parsed.size >= MAX_PARSED) this.parsed.clear();
      this.parsed.set(s, c);
      this.counters.cidrParses++;
    }
    return c;
  }

  /**
   * The IPAM table's blocks grouped by owner, parsed, with the cluster-prefix decisions made on it: kept
   * while the table's (cidr, owner) pairs and range stay the same (compared pair by pair, no parsing), so
   * a refreshed snapshot with the same ownership reuses every decision; any ownership change drops them.
   */
  private blockIndex(st: IpamOwners): BlockIndex {
    const idx = this.index;
    if (idx && idx.st === st) return idx;
    if (idx && idx.rangeStr === st.range && sameOwners(idx.pairs, st.blocks)) {
      idx.st = st;
      return idx;
    }
    const byOwner = new Map<string, Cidr[]>();
    const pairs: string[] = [];
    for (const b of st.blocks) {
      pairs.push(b.cidr, b.owner);
      let l = byOwner.get(b.owner);
      if (!l) byOwner.set(b.owner, (l = []));
      l.push(this.parse(b.cidr));
    }
    this.counters.indexBuilds++;
    return (this.index = { st, rangeStr: st.range, range: this.parse(st.range), pairs, byOwner, results: new Map() });
  }

  /** Advertised routes still in force (withdrawn ones: `kept` false; none today, see `conflicts`). */
  advertisedRoutes(): string[] {
    const withdrawn = new Set(this.conflicts.filter((c) => !c.kept).map((c) => c.route));
    return this.d.advertise.filter((r) => !withdrawn.has(r));
  }

  /** Re-check our advertised routes against every other node's prefixes (outside the cluster range). */
  checkConflicts(): void {
    const mine = this.d.advertise;
    if (mine.length === 0) return;
    const range = parseCidr(this.d.configuredRange);
    const next: RouteConflict[] = [];
    for (const rec of this.d.records()) {
      if (rec.node === this.d.selfId) continue;
      for (const p of rec.prefixes) {
        const pc = parseCidr(p);
        if (overlaps(pc, range)) continue;
        for (const r of mine) {
          if (!overlaps(parseCidr(r), pc)) continue;
          next.push({ route: r, other: p, node: rec.node, nodeName: this.d.peerName(rec.node) ?? rec.node, kept: true });
        }
      }
    }
    const key = (l: RouteConflict[]) => JSON.stringify(l.map((c) => [c.route, c.other, c.node, c.kept]).sort());
    if (key(next) === key(this.conflicts)) return;
    for (const c of next)
      this.d.logger.error(`advertised route ${c.route} overlaps ${c.other} advertised by ${c.nodeName} (${c.node}); other nodes install neither until one side changes --advertise-routes`, { route: c.route, other: c.other, node: c.node });
    this.conflicts = next;
    this.d.prefixesChanged();
  }

  /**
   * Prefixes other nodes advertise outside the cluster range that this node routes into the TUN (sorted,
   * unique); updates `decisions`. A prefix that overlaps one of this host's own networks, or holds the
   * signaling server, a STUN/TURN server or a peer's address, is never installed: those are reachable
   * directly, and routing them into the overlay would carry the overlay's own packets.
   */
  acceptedRoutes(): string[] {
    const offers = [];
    for (const rec of this.d.records()) {
      if (rec.node === this.d.selfId) continue;
      for (const cidr of rec.prefixes) offers.push({ node: rec.node, cidr });
    }
    const range = this.d.ipamOwners()?.range ?? this.d.configuredRange;
    this.decisions = decideRoutes({ offers, accept: this.d.accept, clusterRange: range, localNetworks: this.d.hostNetworks(), protectedHosts: this.d.protectedHosts(), own: this.advertisedRoutes() });
    return [...new Set(this.decisions.filter((d) => d.accepted).map((d) => d.cidr))].sort();
  }

  /**
   * Rebuild the cryptokey routing table from the IPAM owners and the route decisions. Cheap when nothing
   * changed (the agent calls it on every IPAM owner change, every router change and once a second): the
   * IPAM part is compared by its owners index (the same object while the owners stay the same), the routes
   * by a key over the few route entries; a change bumps sourcesVersion.
   */
  refreshSources(): void {
    const st = this.d.ipamOwners();
    const idx = st ? this.blockIndex(st) : undefined;
    const routes: [string, string][] = [];
    for (const r of this.advertisedRoutes()) routes.push([r, this.d.selfId]);
    this.acceptedRoutes();
    for (const d of this.decisions) if (d.accepted) routes.push([d.cidr, d.node]);
    const key = JSON.stringify(routes);
    if (idx === this.sourcesIdx && key === this.sourcesKey) return;
    this.sourcesIdx = idx;
    this.sourcesKey = key;
    this.sourcesVersion++;
    this.counters.sourcesBuilds++;
    const entries: [string, string][] = [];
    for (const b of st?.blocks ?? []) if (b.owner) entries.push([b.cidr, b.owner]);
    entries.push(...routes);
    // An exact prefix can appear once: the first (IPAM, then ours, then accepted) wins.
    const seen = new Set<string>();
    this.sources.replaceAll(entries.filter(([c]) => !seen.has(c) && !!seen.add(c)));
  }
}
