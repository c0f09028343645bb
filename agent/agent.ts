/**
 * The agent's composition root: identity + signaling client + transport + mesh manager + local API.
 * Everything with I/O is created here and passed into the core (src/), which never imports it.
 */
import { uplinkMtu } from "./os/mtu.js";
import { MAX_LINK_MTU, SAFE_LINK_MTU } from "./transport/link-base.js";
import { existsSync, unlinkSync } from "node:fs";
import { hostname } from "node:os";
import { DEFAULT_CLUSTER_RANGE } from "../src/defaults.js";
import { UsageError, WeftError } from "../src/errors.js";
import { peerKeyOf } from "../src/identity.js";
import { identityKeys } from "../src/ipam/signing.js";
import { createLogger, type Logger } from "../src/log.js";
import { MeshManager, type PeerStatus, type MeshCounters } from "../src/mesh/manager.js";
import type { PeerTiming } from "../src/mesh/peer.js";
import type { Transport } from "../src/mesh/transport.js";
import { Router } from "../src/mesh/router.js";
import { IpamDriver, type PodAddress } from "./ipam.js";
import { createRelayTransport, type RelayTransport } from "./transport/relay.js";
import { BulkService, refuseBulk, type BulkPeerStatus } from "./transport/bulk.js";
import type { BulkTiming } from "../src/bulk/session.js";
import { aggregateCidrs } from "../src/ipam/aggregate.js";
import { containsIp, overlaps, parseCidr, parseIp, type Cidr } from "../src/ipam/cidr.js";
import type { DataPlane, PodInfo } from "./dataplane.js";
import type { MetricsServer } from "./metrics.js";
import type { NodeWatchConfig, NodeWatcher } from "./k8s.js";

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

/** Is `ip` (any family; only IPv4 can match) inside the IPv4 CIDR? */
function inRange(ip: string, cidr: Cidr): boolean {
  if (!/^\d+\.\d+\.\d+\.\d+$/.test(ip)) return false;
  try {
    return containsIp(cidr, parseIp(ip));
  } catch {
    return false;
  }
}
import { startApiServer, type ApiServer } from "./api.js";
import type { AgentStatus, AgentView, IpamView, LinkType, PeerPath, RouteConflict, RouteStatus } from "./status.js";
import { newInstanceId, SignalClient } from "./signal-client.js";
import { apiSocketPath, loadOrCreateIdentity } from "./state.js";
import { apiRequest } from "./api-client.js";
import { VERSION } from "./version.js";
import { AgentStun, ownStun, stunPlan, type StunUse } from "./stun-server.js";

export type IceServer = { urls: string | string[]; username?: string; credential?: string };

export interface AgentConfig {
  signal: string;
  token: string;
  stateDir: string;
  name?: string;
  /** Data plane: TUN device, bridge and routes (root / CAP_NET_ADMIN). Default false here; the CLI defaults to true. */
  tun?: boolean;
  /** TUN interface name (default weft0), pod bridge (default weft-br0), MTU of both (default 1400). */
  iface?: string;
  bridge?: string;
  mtu?: number;
  iceServers?: IceServer[];
  /** Use the signaling server's STUN responder (default true). */
  useServerStun?: boolean;
  /** Serve STUN on this UDP port (0 = any free port) and advertise it through the mesh (agent/stun-server.ts); --stun-advertise addresses. */
  stunPort?: number;
  stunAdvertise?: string[];
  logger?: Logger;
  timing?: Partial<PeerTiming>;
  /** Serve the local API on <stateDir>/agent.sock (default true). */
  api?: boolean;
  meta?: Record<string, string>;
  /** Prefixes this node is a gateway for (a home LAN, another cluster's pod range); `snatRoutes` masquerades mesh traffic to them. */
  advertiseRoutes?: string[];
  snatRoutes?: boolean;
  /** Routes other nodes advertise that this node installs: "all", or CIDRs that contain them. Default none. */
  acceptRoutes?: "all" | string[];
  /** Cluster label shown to peers (status groups peers by it). */
  cluster?: string;
  /** Use the signaling server's data relay when WebRTC cannot connect (default true). */
  relay?: boolean;
  /** Inject a transport (tests). */
  transport?: Transport;
  /** WebRTC implementation: werift (pure JS), native (libdatachannel via node-datachannel), auto (native when it loads). Default werift. */
  transportKind?: "auto" | "werift" | "native";
  /**
   * Path MTU the native transport's links assume (see NativeTransportOptions.mtu): a number, or "auto"
   * (default): this host's uplink MTU (agent/os/mtu.ts) clamped to 1280..4096. Links above 1280 check the
   * path once open and fall back to 1280 for a peer whose path carries less.
   */
  linkMtu?: number | "auto";
  /** IPAM: cluster range (default 10.40.0.0/16), block prefix (default 26), reclaim grace (default 10 min). */
  ipam?: { range?: string; blockPrefix?: number; reclaimAfterMs?: number; resyncMs?: number; claimSettleMs?: number; bootstrapWaitMs?: number; safetyMarginMs?: number };
  /** werift tuning, e.g. { loopbackOnly: true } for single-host tests and demos. */
  werift?: { loopbackOnly?: boolean; icePortRange?: [number, number] };
  /** Serve Prometheus metrics on HOST:PORT (GET /metrics; port 0 = any free port). Off when unset. */
  metricsListen?: string;
  /**
   * The bulk link (agent/transport/bulk.ts): a direct UDP fast path per peer beside WebRTC, negotiated over
   * the control channel. Default false here; the CLI turns it on with the data plane (--no-bulk: off).
   */
  bulk?: boolean;
  /** UDP port of the bulk link (default 0: any free port; set one to open it in firewalls). */
  bulkPort?: number;
  /** Bulk link timing (tests). */
  bulkTiming?: Partial<BulkTiming>;
  /** Watch Kubernetes Node objects (in-cluster) and release a deleted Node's blocks (agent name = Node name). Off when unset. */
  k8sNodeWatch?: NodeWatchConfig;
  /**
   * The operator's Ed25519 public key (32 bytes, --operator-key): `weftnet ipam release NODE` then needs
   * the operator's signature of each released block, and this agent accepts other nodes' force releases
   * only with it (or after seeing the node's Kubernetes Node deleted itself). Unset: only that path.
   */
  operatorKey?: Uint8Array;
}

export type { AgentStatus, AgentView, IpamView, LinkType, PeerPath, RouteConflict, RouteStatus } from "./status.js";

export class Agent implements AgentView {
  private tickTimer: NodeJS.Timeout | undefined;
  private api: ApiServer | undefined;
  private readonly startedAt = Date.now();
  private fatalError: WeftError | undefined;
  private fatalListeners: ((e: WeftError) => void)[] = [];
  private registeredWaiters: (() => void)[] = [];
  private stunPort = 0;
  /** has this agent ever been welcomed by the signaling server (IPAM bootstrap needs presence) */
  everRegistered = false;
  private stunAltPort = 0;
  /** handed out by the signaling server in `welcome` (TURN REST credentials); replaced on every welcome */
  private serverIceServers: IceServer[] = [];
  private reflexive: string | null = null;
  /** our STUN responder (--stun-port) */
  stun: AgentStun | undefined;
  private stopping: Promise<void> | undefined;
  readonly router: Router;
  ipam!: IpamDriver;
  dataplane: DataPlane | undefined;
  relay: RelayTransport | undefined;
  /** the bulk link service (--bulk), when enabled */
  bulk: BulkService | undefined;
  /** the --metrics-listen server (its bound address), when enabled */
  metrics: MetricsServer | undefined;
  /** the --k8s-node-watch watcher, when enabled */
  k8s: NodeWatcher | undefined;
  /** id -> name of every peer seen connected (the mesh forgets gone peers; a Node may be deleted much later) */
  private readonly seenNames = new Map<string, string>();
  /** Nodes deleted while their agent was still reachable: name -> re-check deadline */
  private readonly pendingDeletes = new Map<string, number>();

  private constructor(
    readonly cfg: AgentConfig,
    readonly id: string,
    readonly name: string,
    readonly instance: string,
    readonly mesh: MeshManager,
    readonly signal: SignalClient,
    readonly transport: Transport,
    readonly log: Logger,
  ) {
    this.router = new Router({ mesh, logger: log.child("router"), now: () => Date.now(), localPrefixes: () => this.localPrefixes(), prefixAllowed: (node, cidr) => this.prefixAllowed(node, cidr), localStun: () => this.stun?.advertised(this.reflexive) ?? [] });
  }

  /** Prefixes this node owns or advertises (IPAM blocks; filled in by the data plane). */
  localPrefixes(): string[] {
    const owned = this.ipam ? this.ipam.localBlocks() : [];
    if (owned !== this.aggKey) {
      // localBlocks() returns the same array until ownership changes: aggregate once per change.
      this.aggKey = owned;
      this.aggregated = aggregateCidrs(owned);
    }
    return [...this.aggregated, ...this.advertisedRoutes()];
  }

  /**
   * Route ownership comes from what a node owns, not from what it claims: a cluster prefix only when the
   * IPAM table gives every address of it to that node, an external one only when this node installs it
   * (--accept-routes, agent/os/advertise.ts decideRoutes; without a data plane none is used).
   */
  prefixAllowed(node: string, cidr: string): boolean {
    const c = parseCidr(cidr);
    // One IPAM snapshot per routing recompute (it asks for every prefix of every record).
    const now = Date.now();
    if (!this.ipamSnap || now - this.ipamSnap.at > 100) this.ipamSnap = this.ipam ? { at: now, st: this.ipam.status() } : undefined;
    const st = this.ipamSnap?.st;
    if (!st) return false;
    const range = parseCidr(st.range);
    if (overlaps(c, range)) {
      if (c.prefix < range.prefix) return false;
      let covered = 0;
      for (const b of st.blocks) {
        if (b.owner !== node) continue;
        const bc = parseCidr(b.cidr);
        if (bc.prefix >= c.prefix && overlaps(bc, c)) covered += 2 ** (32 - bc.prefix);
        else if (bc.prefix < c.prefix && overlaps(bc, c)) return true; // inside one of its blocks
      }
      return covered === 2 ** (32 - c.prefix);
    }
    return this.dataplane?.routeDecisions.some((d) => d.accepted && d.node === node && d.cidr === cidr) ?? false;
  }

  private ipamSnap: { at: number; st: ReturnType<IpamDriver["status"]> } | undefined;
  private aggKey: string[] | undefined;
  private aggregated: string[] = [];

  /**
   * Conflicts between our advertised routes and other nodes'. Reported, not settled by node id (ids can be
   * ground): both sides keep advertising and every receiver installs neither (agent/os/advertise.ts
   * decideRoutes) until an operator changes --advertise-routes. `kept` is always true (kept for the API).
   */
  routeConflicts: RouteConflict[] = [];

  /** Advertised routes still in force (overlaps with a lower node id's prefixes are withdrawn). */
  advertisedRoutes(): string[] {
    const withdrawn = new Set(this.routeConflicts.filter((c) => !c.kept).map((c) => c.route));
    return (this.cfg.advertiseRoutes ?? []).filter((r) => !withdrawn.has(r));
  }

  /** Re-check our advertised routes against every other node's prefixes (outside the cluster range). */
  checkRouteConflicts(): void {
    const mine = this.cfg.advertiseRoutes ?? [];
    if (mine.length === 0) return;
    const range = parseCidr(this.cfg.ipam?.range ?? DEFAULT_CLUSTER_RANGE);
    const next: typeof this.routeConflicts = [];
    for (const rec of this.router.records()) {
      if (rec.node === this.id) continue;
      for (const p of rec.prefixes) {
        const pc = parseCidr(p);
        if (overlaps(pc, range)) continue;
        for (const r of mine) {
          if (!overlaps(parseCidr(r), pc)) continue;
          next.push({ route: r, other: p, node: rec.node, nodeName: this.mesh.peerName(rec.node) ?? rec.node, kept: true });
        }
      }
    }
    const key = (l: typeof next) => JSON.stringify(l.map((c) => [c.route, c.other, c.node, c.kept]).sort());
    if (key(next) === key(this.routeConflicts)) return;
    for (const c of next)
      this.log.error(`advertised route ${c.route} overlaps ${c.other} advertised by ${c.nodeName} (${c.node}); other nodes install neither until one side changes --advertise-routes`, { route: c.route, other: c.other, node: c.node });
    this.routeConflicts = next;
    this.router.prefixesChanged();
  }

  static async start(cfg: AgentConfig): Promise<Agent> {
    const log = cfg.logger ?? createLogger({ level: "warn" });
    checkAdvertisedRoutes(cfg.advertiseRoutes ?? [], cfg.ipam?.range ?? DEFAULT_CLUSTER_RANGE);
    const { identity, created } = loadOrCreateIdentity(cfg.stateDir);
    const name = cfg.name ?? hostname();
    const instance = newInstanceId();
    const sock = apiSocketPath(cfg.stateDir);
    if (cfg.api !== false) await claimSocket(sock, cfg.stateDir);
    const transport = cfg.transport ?? (await createTransport(cfg, log));
    const agentLog = log.child("agent", { node: identity.id, name });
    if (created) agentLog.info("created a new node identity", { stateDir: cfg.stateDir });

    // The mesh and the signaling client refer to each other; wire them through closures.
    let agent: Agent | undefined;
    const signal = new SignalClient({
      url: cfg.signal,
      token: cfg.token,
      identity,
      name,
      instance,
      meta: { version: VERSION, ...(cfg.cluster ? { cluster: cfg.cluster } : {}), ...(cfg.meta ?? {}) },
      logger: agentLog.child("signal"),
      ...(cfg.timing?.backoff ? { backoff: cfg.timing.backoff } : {}),
      events: {
        onWelcome: (peers, info) => {
          if (!agent) return;
          agent.everRegistered = true;
          agent.stunPort = info.stunPort;
          agent.stunAltPort = info.stunAltPort ?? 0;
          agent.serverIceServers = info.iceServers ?? [];
          agent.reflexive = info.addr;
          agent.mesh.onWelcome(peers);
          for (const w of agent.registeredWaiters.splice(0)) w();
        },
        onJoin: (p) => agent?.mesh.onJoin(p),
        onLeave: (id) => agent?.mesh.onLeave(id),
        onSignal: (from, data) => agent?.mesh.onSignal(from, data),
        onRelay: (from, data) => relay?.deliver(from, data),
        onServerError: (code, msg, ref) => {
          if (code === "ERR_RELAY_DISABLED" && agent && !agent.mesh.relayRefused) {
            agent.mesh.relayRefused = true;
            agentLog.warn("the signaling server does not relay data (--no-relay): peers unreachable by WebRTC stay disconnected", { msg });
          } else agentLog.debug("signaling server reported an error", { code, msg, ref });
        },
        onDown: (reason) => agentLog.warn("lost the signaling server; existing links stay up", { reason }),
        onFatal: (err) => agent?.fatal(err),
      },
    });
    const relay = cfg.relay === false ? undefined : createRelayTransport({ selfId: identity.id, token: peerKeyOf(cfg.token), port: signal, logger: log });
    const mesh = new MeshManager({
      ...(relay ? { relay } : {}),
      identity,
      token: cfg.token,
      name,
      instance,
      version: VERSION,
      transport,
      signal,
      iceServers: () => agent?.iceServers() ?? [],
      logger: agentLog.child("mesh"),
      now: () => Date.now(),
      monotonic: () => performance.now(),
      delay: (ms) => new Promise((r) => setTimeout(r, ms)),
      timing: cfg.timing ?? {},
    });
    agent = new Agent(cfg, identity.id, name, instance, mesh, signal, transport, agentLog);
    agent.relay = relay;
    if (cfg.bulk) {
      const a = agent;
      const rangeCidr = parseCidr(cfg.ipam?.range ?? "10.40.0.0/16");
      try {
        agent.bulk = BulkService.open({
          identity,
          mesh,
          logger: agentLog,
          port: cfg.bulkPort ?? 0,
          ...(cfg.mtu !== undefined ? { mtu: cfg.mtu } : {}),
          loopbackOnly: cfg.werift?.loopbackOnly === true,
          excludeAddress: (ip) => inRange(ip, rangeCidr),
          stun: () => (cfg.useServerStun !== false && a.stunPort > 0 ? { host: a.signal.host, port: a.stunPort } : a.agentStunFor4()),
          ...(cfg.bulkTiming ? { timing: cfg.bulkTiming } : {}),
        });
      } catch (e) {
        await transport.close();
        throw e;
      }
    } else {
      refuseBulk(mesh);
    }
    try {
      // Bootstrap rule: found the cluster's IPAM only when registered with the signaling server and this
      // node has the lowest id of every node known to exist.
      const a = agent;
      // It must also be linked to every node it knows of, so it has heard whether any of them already
      // belongs to an IPAM (a node cut off at start must not found one of its own next to the real one).
      const mayFound = () => {
        if (!a.everRegistered) return false;
        const known = a.mesh.knownPeers();
        const linked = new Set(a.mesh.connectedPeers());
        return known.every((p) => p > identity.id && linked.has(p));
      };
      // every heartbeat, owner write and promise signed with the node key; unsigned remote state refused
      agent.ipam = new IpamDriver({ id: identity.id, mayFound, keys: identityKeys(identity, cfg.operatorKey), ...(cfg.ipam ?? {}) }, cfg.stateDir, mesh, agentLog.child("ipam"));
    } catch (e) {
      await transport.close();
      throw e;
    }
    agent.ipam.onBlocksChanged(() => agent!.router.prefixesChanged());
    mesh.onPeerUp((id) => {
      const n = mesh.peerName(id);
      if (n !== undefined) agent!.seenNames.set(id, n);
    });
    if (cfg.tun) {
      try {
        agent.dataplane = await (await import("./dataplane.js")).DataPlane.start(agent, {
          logger: agentLog.child("dataplane"),
          ...(cfg.iface !== undefined ? { iface: cfg.iface } : {}),
          ...(cfg.bridge !== undefined ? { bridge: cfg.bridge } : {}),
          ...(cfg.mtu !== undefined ? { mtu: cfg.mtu } : {}),
        });
      } catch (e) {
        await transport.close();
        throw e;
      }
    }
    if (cfg.api !== false) agent.api = await startApiServer(sock, agent);
    if (cfg.metricsListen !== undefined) {
      try {
        agent.metrics = await (await import("./metrics.js")).startAgentMetrics(agent, cfg.metricsListen, agentLog.child("metrics"));
      } catch (e) {
        await agent.stop();
        throw e;
      }
    }
    if (cfg.k8sNodeWatch) {
      const { NodeWatcher } = await import("./k8s.js");
      const a = agent;
      try {
        a.k8s = new NodeWatcher(cfg.k8sNodeWatch, { onDeleted: (n) => a.k8sNodeDeleted(n), onPresent: (n) => a.pendingDeletes.delete(n) }, agentLog.child("k8s"));
      } catch (e) {
        await a.stop();
        throw e;
      }
      a.k8s.start();
    }
    if (cfg.stunPort !== undefined) {
      try {
        agent.stun = await AgentStun.start({ port: cfg.stunPort, ...(cfg.stunAdvertise ? { advertise: cfg.stunAdvertise } : {}), logger: agentLog.child("stun") });
      } catch (e) {
        await agent.stop();
        throw e;
      }
    }
    signal.start();
    let ticks = 0;
    agent.tickTimer = setInterval(() => {
      mesh.tick();
      agent!.router.flush();
      if (++ticks % 5 === 0) {
        agent!.router.tick();
        agent!.checkRouteConflicts();
        agent!.ipam.tick();
        agent!.recheckPendingDeletes();
      }
    }, 200);
    return agent;
  }

  iceServers(): IceServer[] {
    const out: IceServer[] = [];
    if (this.cfg.useServerStun !== false && this.stunPort > 0) {
      const host = this.signal.host.includes(":") ? `[${this.signal.host}]` : this.signal.host;
      out.push({ urls: `stun:${host}:${this.stunPort}` });
    }
    // no STUN of our own (a Workers signaling server, no --ice-server): the agents' advertised ones
    const agents = this.stunUses().filter((u) => u.node !== undefined).map((u) => ({ urls: `stun:${u.server}` }));
    return out.concat(this.cfg.iceServers ?? [], this.serverIceServers, agents);
  }

  /** The STUN servers this agent uses and where each came from (agent/stun-server.ts). */
  stunUses(): StunUse[] {
    const own = ownStun({ useServerStun: this.cfg.useServerStun !== false, serverHost: this.signal.host, stunPort: this.stunPort, stunAltPort: this.stunAltPort, flagIce: this.cfg.iceServers ?? [], serverIce: this.serverIceServers });
    return stunPlan(own, this.router.records(), this.id, (id) => this.peerName(id));
  }

  /** The first IPv4 agent STUN server in use, for the bulk link's mapping. */
  private agentStunFor4(): { host: string; port: number } | undefined {
    const u = this.stunUses().find((x) => x.node !== undefined && !x.server.startsWith("["));
    const i = u ? u.server.lastIndexOf(":") : -1;
    return u ? { host: u.server.slice(0, i), port: Number(u.server.slice(i + 1)) } : undefined;
  }

  /** Resolves once registered with the signaling server; rejects on a fatal refusal or timeout. */
  whenRegistered(timeoutMs = 10_000): Promise<void> {
    if (this.fatalError) return Promise.reject(this.fatalError);
    if (this.signal.up) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new WeftError("ERR_TIMEOUT", `not registered with ${this.cfg.signal} after ${timeoutMs} ms`)), timeoutMs);
      this.registeredWaiters.push(() => {
        clearTimeout(t);
        resolve();
      });
      this.fatalListeners.push((e) => {
        clearTimeout(t);
        reject(e);
      });
    });
  }

  onFatal(f: (e: WeftError) => void): void {
    if (this.fatalError) f(this.fatalError);
    else this.fatalListeners.push(f);
  }

  private fatal(err: WeftError): void {
    this.fatalError = err;
    this.log.error(err.message, { code: err.code });
    for (const f of this.fatalListeners.splice(0)) f(err);
  }

  async status(): Promise<AgentStatus> {
    return {
      node: {
        id: this.id,
        name: this.name,
        cluster: this.cfg.cluster ?? null,
        instance: this.instance,
        version: VERSION,
        uptimeMs: Date.now() - this.startedAt,
        transport: this.transport.name,
        fingerprint: `${this.transport.fingerprint.algorithm} ${this.transport.fingerprint.value}`,
        signal: { url: this.signal.endpoint, connected: this.signal.up, addr: this.reflexive, stun: { host: this.signal.host, port: this.stunPort, altPort: this.stunAltPort } },
      },
      peers: (await this.mesh.status()).map((p) => this.peerView(p)),
      bulk: this.bulk ? { port: this.bulk.port, candidates: this.bulk.candidates(), crypto: this.bulk.cryptoName, gso: this.bulk.socket.gso, gro: this.bulk.socket.gro, coalesced: { ...this.bulk.gro }, counters: { ...this.bulk.counters } } : null,
      dataplane: this.dataplane ? this.dataplane.stats() : null,
      stun: { serving: this.stun?.status(this.reflexive) ?? null, using: this.stunUses() },
      routes: { advertised: this.cfg.advertiseRoutes ?? [], inForce: this.advertisedRoutes(), snat: !!this.cfg.snatRoutes, conflicts: this.routeConflicts },
      counters: {
        ...this.mesh.counters,
        relayBytesIn: this.relay?.counters.bytesIn ?? 0,
        relayBytesOut: this.relay?.counters.bytesOut ?? 0,
        relayBadFrames: this.relay?.counters.badFrames ?? 0,
        badSignalFrames: this.signal.badFrames, badGossip: this.router.counters.badGossip, rejectedTopologyRecords: this.router.counters.rejectedRecords,
        // records refused for their signature (not by their origin, unsigned) or a seq jump: forged gossip
        forgedTopologyRecords: ["ERR_BAD_SIGNATURE", "ERR_UNSIGNED", "ERR_SEQ_JUMP"].reduce((n, c) => n + (this.router.rejectedByCode.get(c) ?? 0), 0) },
    };
  }

  /** A peer as status shows it: which path its traffic takes (direct, turn, relay, via NODE) and why. */
  private peerView(p: PeerStatus): AgentStatus["peers"][number] {
    const r = this.router.route(p.id);
    const via = r && r.via !== "direct" ? r.via : null;
    const path: PeerPath = via ? `via ${this.mesh.peerName(via) ?? via}` : p.state === "connected" ? linkPath(p) : r ? "direct" : "none";
    const turn = path === "turn";
    const bulk = this.bulk?.status(p.id) ?? null;
    const bulkUp = bulk?.state === "up";
    const linkType: LinkType | null = via ? "via" : p.state !== "connected" ? null : bulkUp ? "bulk" : p.path === "relay" ? "relay" : turn ? "turn" : "webrtc";
    const linkWhy =
      linkType === null
        ? ""
        : linkType === "bulk"
          ? `direct UDP to ${bulk!.endpoint}, path MTU ${bulk!.pathMax}`
          : linkType === "via"
            ? "no direct link; routed via another agent (lowest measured RTT)"
            : !this.bulk
              ? "bulk link disabled here (--no-bulk)"
              : `bulk link ${bulk ? `${bulk.state}: ${bulk.reason}` : "not negotiated yet"}`;
    return { ...p, path, via, linkType, linkWhy, bulk };
  }

  peerName(id: string): string | undefined {
    return this.mesh.peerName(id);
  }

  /** The data plane's drop counters (forwarder and TUN), when it runs. */
  drops() {
    const dp = this.dataplane;
    return dp ? { forwarder: dp.forwarder.drops, tun: dp.tun.drops } : null;
  }

  routes(): RouteStatus[] {
    const name = (id: string) => this.mesh.peerName(id) ?? id;
    return this.router.entries().map((e) => ({ dst: e.dst, name: name(e.dst), nextHop: e.nextHop, nextHopName: name(e.nextHop), via: e.via === "direct" ? "direct" : `via ${name(e.via)}`, costMs: e.cost, path: [...e.path] }));
  }

  ipamStatus(): IpamView {
    const st = this.ipam.status();
    const connected = new Set(this.mesh.connectedPeers());
    const name = (id: string) => (id === this.id ? this.name : (this.mesh.peerName(id) ?? null));
    const reach = new Map<string, boolean>();
    return {
      ...st,
      // once per owner, not per block: a founder or heir owns ~1000 blocks, and nextHop is not free
      blocks: st.blocks.map((b) => {
        let r = reach.get(b.owner);
        if (r === undefined) reach.set(b.owner, (r = b.owner === this.id || connected.has(b.owner) || this.router.nextHop(b.owner) !== undefined));
        return { ...b, ownerName: name(b.owner), reachable: r };
      }),
    };
  }

  /** Also for API clients (the CNI plugin): the bridge gets the block's gateway before this returns. */
  async allocate(podId: string, timeoutMs?: number, signal?: AbortSignal): Promise<PodAddress> {
    const had = this.ipam.node.allocations().has(podId);
    const addr = await this.ipam.allocate(podId, timeoutMs, signal);
    await this.dataplane?.reconcile();
    if (signal?.aborted) {
      const err = this.ipam.abandoned(podId, had); // the caller gave up while the bridge was set up
      void this.dataplane?.reconcile().catch((e) => this.log.error("could not apply the node network", { err: e }));
      throw err;
    }
    return addr;
  }

  release(podId: string): boolean {
    const released = this.ipam.release(podId);
    if (released) void this.dataplane?.reconcile().catch((err) => this.log.error("could not apply the node network", { err }));
    return released;
  }

  /** `weftnet ipam release`: `sigs` are the operator's signatures, block index -> signature (src/ipam/signing.ts releaseFields). */
  ipamRelease(target: string, sigs: Map<number, Uint8Array> = new Map()): { node: string } {
    const id = /^[0-9a-f]{16}$/.test(target) ? target : this.mesh.resolvePeer(target);
    if (!id) throw new WeftError("ERR_NO_PEER", `no node matches ${JSON.stringify(target)}; give the full node id from \`weftnet status ipam\``);
    if (id === this.id) throw new WeftError("ERR_USAGE", "refusing to release this node's own blocks; stop the agent and remove its ipam.json instead");
    if (this.mesh.isConnected(id)) throw new WeftError("ERR_USAGE", `node ${id} is connected right now; release only nodes that are gone`);
    this.ipam.forceRelease(id, { operator: sigs });
    return { node: id };
  }

  /**
   * A Kubernetes Node named `name` was deleted: force-release the blocks of the weftnet node(s) of that
   * name (agents run with --name $(NODE_NAME)). Tolerant, unlike ipamRelease: a name no block owner has,
   * our own name, or a node still reachable is logged and skipped (a reachable one is re-checked for
   * `pendingMs`: a VM that was just terminated still looks connected until its heartbeats time out).
   * The --reclaim-after mesh reclaim stays the fallback. Every agent sees the same deletion and they may
   * all force-release at once: that converges, because forced writes are ordinary CRDT entries
   * (src/ipam/table.ts: higher version wins, at equal version kind "f" beats "c" and "t", and two "f"
   * at one version go to the lower owner id), so the agents agree on exactly one new owner per block.
   */
  k8sNodeDeleted(name: string, recheck = false): void {
    const log = this.log.child("k8s");
    if (name === this.name) {
      log.warn("this node's own Kubernetes Node object was deleted; its blocks stay with it", { k8sNode: name });
      return;
    }
    const owners = [...new Set(this.ipam.status().blocks.map((b) => b.owner).filter((o): o is string => !!o && o !== this.id))];
    const ids = owners.filter((id) => (this.mesh.peerName(id) ?? this.seenNames.get(id)) === name);
    if (ids.length === 0) {
      this.pendingDeletes.delete(name);
      if (!recheck) log.info("deleted Kubernetes Node: no weftnet node of that name owns address blocks (known to this agent); nothing to release", { k8sNode: name });
      return;
    }
    let alive = false;
    for (const id of ids) {
      if (this.reachable(id)) {
        alive = true;
        if (!recheck) log.info("deleted Kubernetes Node: its weftnet agent is still connected; not releasing its blocks (re-checked for a while)", { k8sNode: name, id });
        continue;
      }
      try {
        const blocks = this.ipam.status().blocks.filter((b) => b.owner === id).length;
        this.ipam.forceRelease(id, { observedGone: true });
        log.warn("released the address blocks of a deleted Kubernetes Node", { k8sNode: name, id, blocks });
      } catch (e) {
        log.warn("could not release the blocks of a deleted Kubernetes Node; the mesh reclaims them after --reclaim-after", { k8sNode: name, id, err: (e as Error).message });
      }
    }
    if (alive) {
      if (!this.pendingDeletes.has(name)) this.pendingDeletes.set(name, Date.now() + (this.cfg.k8sNodeWatch?.pendingMs ?? 120_000));
    } else this.pendingDeletes.delete(name);
  }

  private reachable(id: string): boolean {
    return this.mesh.isConnected(id) || this.router.nextHop(id) !== undefined;
  }

  private recheckPendingDeletes(): void {
    for (const [name, until] of [...this.pendingDeletes]) {
      if (Date.now() > until) {
        this.pendingDeletes.delete(name);
        this.log.child("k8s").info("deleted Kubernetes Node's agent is still connected; giving up (the mesh reclaims its blocks if it goes silent)", { k8sNode: name });
      } else this.k8sNodeDeleted(name, true);
    }
  }

  private requireDataplane(): DataPlane {
    if (!this.dataplane) throw new WeftError("ERR_NO_DATAPLANE", "this agent runs without a data plane (--no-tun); pods need the TUN data plane");
    return this.dataplane;
  }

  addPod(name: string): Promise<PodInfo> {
    return this.requireDataplane().addPod(name);
  }

  delPod(name: string): Promise<{ released: boolean }> {
    return this.requireDataplane().delPod(name);
  }

  /** Round trip over the peer's link; `path` is the path that link takes (as in status). */
  async ping(target: string, timeoutMs = 3000): Promise<{ id: string; name: string; rttMs: number; path: PeerPath }> {
    const id = this.mesh.resolvePeer(target);
    if (!id) throw new WeftError("ERR_NO_PEER", `no peer matches ${JSON.stringify(target)} (use a node id, a unique id prefix or a name from \`weftnet status\`)`);
    const rtt = await this.mesh.ping(id, timeoutMs);
    // The ping went over the direct link to the peer (control channel), whatever the route of pod traffic.
    const p = (await this.mesh.status()).find((x) => x.id === id);
    return { id, name: this.mesh.peerName(id) ?? id, rttMs: Math.round(rtt * 1000) / 1000, path: p ? linkPath(p) : "direct" };
  }

  stop(): Promise<void> {
    this.stopping ??= (async () => {
      if (this.tickTimer) clearInterval(this.tickTimer);
      this.k8s?.stop();
      await this.bulk?.close().catch((err) => this.log.warn("could not close the bulk link", { err }));
      await this.stun?.close().catch((err) => this.log.warn("could not close the STUN responder", { err }));
      await this.mesh.stop();
      this.signal.stop();
      await this.api?.close();
      await this.metrics?.close();
      await this.dataplane?.stop().catch((err) => this.log.error("could not remove the node network", { err }));
      await this.transport.close();
    })();
    return this.stopping;
  }
}

/** The path of a connected peer's own link: through the signaling server's relay, a TURN server, or direct. */
function linkPath(p: PeerStatus): "direct" | "turn" | "relay" {
  if (p.path === "relay") return "relay";
  // A WebRTC link whose selected candidate pair goes through a TURN server is reported as "turn".
  if (p.link === "webrtc" && (p.selected?.localType === "relay" || p.selected?.remoteType === "relay")) return "turn";
  return "direct";
}

async function createTransport(cfg: AgentConfig, log: Logger): Promise<Transport> {
  // ICE must never try to reach a peer through the overlay itself (TUN/bridge addresses).
  const range = cfg.ipam?.range ?? DEFAULT_CLUSTER_RANGE;
  const rangeCidr = parseCidr(range);
  const common = { logger: log, ...(cfg.werift ?? {}), excludeAddress: (ip: string) => inRange(ip, rangeCidr) };
  let kind = cfg.transportKind ?? "werift";
  if (kind !== "werift") {
    const native = await import("./transport/native.js");
    if (await native.nativeAvailable()) {
      let mtu = cfg.linkMtu ?? "auto";
      if (mtu === "auto") {
        const up = await uplinkMtu();
        mtu = Math.min(MAX_LINK_MTU, Math.max(SAFE_LINK_MTU, up ?? SAFE_LINK_MTU));
        log.debug("link MTU from the uplink", { uplinkMtu: up ?? "unknown", linkMtu: mtu });
      }
      return native.createNativeTransport({ ...common, mtu });
    }
    if (kind === "native") throw new WeftError("ERR_NO_NATIVE", `--transport native: node-datachannel does not load here (${native.nativeLoadError() ?? "unknown reason"}); use --transport werift`);
    log.info("native transport unavailable; using werift", { reason: native.nativeLoadError() });
    kind = "werift";
  }
  if (typeof cfg.linkMtu === "number") log.warn("--link-mtu applies to the native transport only: werift sends fixed 1200-byte SCTP chunks", { linkMtu: cfg.linkMtu });
  return (await import("./transport/werift.js")).createWeriftTransport(common);
}

/** Refuse to start when another agent already serves this state dir; remove a stale socket. */
async function claimSocket(sock: string, stateDir: string): Promise<void> {
  if (!existsSync(sock)) return;
  try {
    await apiRequest(sock, "GET", "/v1/status", undefined, 1000);
  } catch {
    unlinkSync(sock);
    return;
  }
  throw new WeftError("ERR_ALREADY_RUNNING", `another agent is already running with state dir ${stateDir}; stop it or use a different --state-dir`);
}
