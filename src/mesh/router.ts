/**
 * Router: drives the topology gossip (topology.ts) and link-state routing (paths.ts) from mesh events,
 * and keeps the two tables the data path reads:
 *   owners   prefix -> node that owns/advertises it (frame destination)
 *   routing  node -> next hop (direct or via another agent), with hysteresis
 * Sans-I/O: the agent calls tick(now) about once a second; everything else reacts to mesh events.
 *
 * Recomputing is never the data path's job: nextHop() reads the current table and nothing else. Gossip
 * and new links only mark the routes dirty and ask the driver (onDirty) to call flush() soon, off the
 * packet path (the agent: setImmediate); a lost link is applied at once, in the peer-down event itself,
 * so no packet is sent to a neighbour that is gone. Before (issue 11), the first packet after each topology
 * record paid the whole recompute (computeRoutes, prefixRoutes, the route policy, the change listeners):
 * milliseconds of ping tail on an idle 2-node mesh.
 */
import type { Logger } from "../log.js";
import { PrefixTable } from "../packet/prefix-table.js";
import type { MeshManager } from "./manager.js";
import { computeRoutes, prefixRoutes, type RouteEntry, type RoutingTable } from "./paths.js";
import { decodeTopologyMessage, encodeTopologyMessages, Topology, TOPO_CHANNEL, type TopologyRecord } from "./topology.js";

/** Minimum interval between two records that differ from the last one only in RTTs. */
export const RTT_ORIGIN_MS = 3000;

export interface RouterOptions {
  mesh: MeshManager;
  logger: Logger;
  now: () => number;
  /** prefixes this node owns/advertises (IPAM blocks, advertised routes) */
  localPrefixes: () => string[];
  /**
   * May `node`'s record route `cidr` here? (cluster prefixes: only what the IPAM table gives that node;
   * external ones: only routes this node accepted.) Absent = every claim (simulations, tests).
   */
  prefixAllowed?: (node: string, cidr: string) => boolean;
  /** STUN servers this node serves, advertised in its topology record ("IP:PORT"; absent = none) */
  localStun?: () => string[];
  initialSeq?: number;
  /**
   * The routes went dirty (gossip, a new link): call flush() soon, outside the data path (the agent uses
   * setImmediate). Called once until the next flush. Absent: the periodic flush() picks it up.
   */
  onDirty?: () => void;
}

export class Router {
  readonly topo: Topology;
  private table: RoutingTable;
  readonly owners = new PrefixTable<string>();
  conflicts: { cidr: string; owners: string[] }[] = [];
  readonly counters = { badGossip: 0, rejectedRecords: 0, recomputes: 0 };
  /** refused topology records by reason (ERR_BAD_SIGNATURE, ERR_UNSIGNED, ERR_SEQ_JUMP, ERR_INVALID, ...) */
  readonly rejectedByCode = new Map<string, number>();
  /** peers we already warned about forged gossip (once each: an attacker must not flood the log) */
  private readonly warnedForgers = new Set<string>();
  private readonly changeListeners: (() => void)[] = [];
  private dirtyLocal = false;
  private dirtyRoutes = false;
  /** onDirty was called and flush() has not run since */
  private flushAsked = false;

  /** Routes (or our own record) wait for a flush(). */
  get dirty(): boolean {
    return this.dirtyRoutes || this.dirtyLocal;
  }

  /**
   * Apply what link changes and gossip left pending: the driver calls this when onDirty asked for it, and
   * periodically (the agent: every 200 ms, for our own RTT-only re-origination that RTT_ORIGIN_MS defers).
   */
  flush(): void {
    this.flushAsked = false;
    if (this.dirtyLocal) {
      this.dirtyLocal = false;
      if (this.local()) this.dirtyRoutes = true;
    }
    if (this.dirtyRoutes) {
      this.dirtyRoutes = false;
      this.recompute();
    }
  }

  constructor(private readonly o: RouterOptions) {
    const self = o.mesh.selfId;
    // Signed gossip: our records carry our signature, remote ones are merged only when signed by their origin.
    this.topo = new Topology(self, { identity: o.mesh.identity, ...(o.initialSeq !== undefined ? { initialSeq: o.initialSeq } : {}) });
    this.table = computeRoutes(self, [], {});
    // Link changes come in bursts (a node joining links to everyone within a second): mark dirty and
    // re-originate / recompute once per flush() instead of once per event.
    o.mesh.onPeerUp((p) => {
      for (const body of encodeTopologyMessages(this.topo.fullSync())) o.mesh.sendApp(p, TOPO_CHANNEL, body);
      this.dirtyLocal = true;
      this.markDirty();
    });
    // A lost link is applied now, not at the scheduled flush: until then nextHop() would keep naming a
    // neighbour that is gone (the mesh has already dropped it from linkRtts(), so our record loses it).
    o.mesh.onPeerDown(() => {
      this.dirtyLocal = true;
      this.dirtyRoutes = true;
      this.flush();
    });
    o.mesh.onApp(TOPO_CHANNEL, (from, body) => this.onGossip(from, body));
  }

  onChange(f: () => void): void {
    this.changeListeners.push(f);
  }

  tick(): void {
    const now = this.o.now();
    let changed = this.local();
    const r = this.topo.refresh(now);
    if (r) this.flood([r]);
    if (this.topo.expire(now).length) changed = true;
    if (changed) this.recompute();
  }

  /**
   * The next hop towards `node` from the current table: the data path's per-batch question, so it never
   * recomputes (see the header). A hop that is not a live neighbour is never returned (peer-down applies
   * at once, this is the guard behind it).
   */
  nextHop(node: string): string | undefined {
    const hop = this.table.nextHop(node);
    if (hop !== undefined && this.o.mesh.isConnected(hop)) return hop;
    // Before the first gossip round arrives, a live direct link is a route by itself.
    return this.o.mesh.isConnected(node) ? node : undefined;
  }

  route(node: string): RouteEntry | undefined {
    return this.table.get(node);
  }

  entries(): RouteEntry[] {
    return this.table.entries();
  }

  records(): TopologyRecord[] {
    return this.topo.records();
  }

  /** Recompute the prefix table now (the IPAM table or the accepted routes changed under prefixAllowed). */
  refreshOwners(): void {
    this.recompute();
  }

  /** Re-announce our prefixes now (IPAM blocks changed). */
  prefixesChanged(): void {
    if (this.local()) this.recompute();
  }

  /**
   * Re-originate our record. A change of the link set or prefixes goes out at once; a change of RTTs
   * only at most every RTT_ORIGIN_MS: while a mesh forms on a busy host RTT samples swing wildly, and
   * flooding a new record for each swing costs every agent CPU that the handshakes need.
   */
  private local(): boolean {
    const links = this.o.mesh.linkRtts();
    const prefixes = this.o.localPrefixes();
    const stun = this.o.localStun?.() ?? [];
    const now = this.o.now();
    const shape = links.map((l) => l.peer).join(",") + "|" + prefixes.join(",") + "|" + stun.join(",");
    if (shape === this.lastShape && now - this.lastOriginAt < RTT_ORIGIN_MS) {
      this.dirtyLocal = true; // look again at the next flush
      return false;
    }
    const r = this.topo.setLocal(links, prefixes, now, stun);
    if (r) {
      this.lastShape = shape;
      this.lastOriginAt = now;
      this.flood([r]);
    }
    return r !== undefined;
  }
  private lastShape = "";
  private lastOriginAt = -Infinity;

  private flood(recs: TopologyRecord[], except?: string): void {
    if (recs.length === 0) return;
    const bodies = encodeTopologyMessages(recs);
    for (const p of this.o.mesh.connectedPeers()) if (p !== except) for (const b of bodies) this.o.mesh.sendApp(p, TOPO_CHANNEL, b);
  }

  /**
   * Forward records learnt from `from` to our other peers — except to the record's origin and to the
   * origin's own direct neighbours: an origin sends every new version of its record to all of them
   * itself (and a link that comes up gets a full sync). In a full mesh this turns the flood of each
   * version from ~n^2 messages into ~n, which is what keeps a forming mesh's CPU for the handshakes.
   */
  private forward(recs: TopologyRecord[], from: string): void {
    if (recs.length === 0) return;
    for (const p of this.o.mesh.connectedPeers()) {
      if (p === from) continue;
      const mine = recs.filter((r) => r.node !== p && !r.links.some((l) => l.peer === p));
      if (mine.length === 0) continue;
      for (const b of encodeTopologyMessages(mine)) this.o.mesh.sendApp(p, TOPO_CHANNEL, b);
    }
  }

  private onGossip(from: string, body: unknown): void {
    let recs: TopologyRecord[];
    try {
      recs = decodeTopologyMessage(body);
    } catch (err) {
      this.counters.badGossip++;
      this.o.logger.debug("dropping malformed topology gossip", { peer: from, err });
      return;
    }
    const { delta, originated, rejected } = this.topo.mergeDetailed(recs, this.o.now());
    if (rejected.length) {
      this.counters.rejectedRecords += rejected.length;
      for (const e of rejected) this.rejectedByCode.set(e.code, (this.rejectedByCode.get(e.code) ?? 0) + 1);
      const forged = rejected.filter((e) => e.code === "ERR_BAD_SIGNATURE" || e.code === "ERR_UNSIGNED" || e.code === "ERR_SEQ_JUMP");
      if (forged.length && !this.warnedForgers.has(from) && this.warnedForgers.size < 1024) {
        this.warnedForgers.add(from);
        this.o.logger.warn("refused topology records not signed by their origin (or with a seq jump): a peer forwards forged gossip", { peer: from, count: forged.length, first: forged[0]!.message });
      } else this.o.logger.debug("rejected topology records", { peer: from, count: rejected.length });
    }
    this.forward(
      delta.filter((r) => r !== originated),
      from,
    );
    if (originated) this.flood([originated]);
    if (delta.length) this.markDirty();
  }

  private markDirty(): void {
    this.dirtyRoutes = true;
    if (this.flushAsked || !this.o.onDirty) return;
    this.flushAsked = true;
    this.o.onDirty();
  }

  private recompute(): void {
    this.counters.recomputes++;
    const records = this.topo.records();
    this.table = computeRoutes(this.o.mesh.selfId, records, {}, this.table);
    const allowed = this.o.prefixAllowed;
    const owned = allowed ? records.map((r) => (r.node === this.o.mesh.selfId ? r : { ...r, prefixes: r.prefixes.filter((p) => allowed(r.node, p)) })) : records;
    const { routes, conflicts } = prefixRoutes(owned, this.table);
    this.conflicts = conflicts;
    this.owners.replaceAll(routes.map((r) => [r.cidr, r.owner] as const));
    for (const f of this.changeListeners) f();
  }
}
