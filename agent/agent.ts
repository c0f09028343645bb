/**
 * The agent's composition root and lifecycle: identity + signaling client + transport + mesh manager +
 * IPAM + data plane + local API, started in order and stopped in reverse. Everything with I/O is created
 * here and passed into the core (src/), which never imports it. The rules live in their own modules:
 * transport choice (transport-choice.ts), route policy (route-policy.ts), Kubernetes release rules
 * (k8s-release.ts), status assembly (status.ts), pods (pods.ts); the data plane is built from ports
 * (dataplane.ts). Nothing in agent/ imports this file back except the front ends, cli/ and ui/
 * (test/unit/deps.test.ts).
 */
import { existsSync, unlinkSync } from "node:fs";
import { hostname, networkInterfaces } from "node:os";
import { join } from "node:path";
import { DEFAULT_CLUSTER_RANGE } from "../src/defaults.js";
import { desiredNodeNetwork } from "../src/desired-network.js";
import { WeftError } from "../src/errors.js";
import { peerKeyOf } from "../src/identity.js";
import { parseCidr, parseIp, type Cidr } from "../src/ipam/cidr.js";
import { identityKeys } from "../src/ipam/signing.js";
import { createLogger, type Logger } from "../src/log.js";
import { MeshManager } from "../src/mesh/manager.js";
import type { PeerTiming } from "../src/mesh/peer.js";
import type { Transport } from "../src/mesh/transport.js";
import { Router } from "../src/mesh/router.js";
import { FrameSealer } from "../src/packet/seal.js";
import { ViaPinger } from "./ping.js";
import type { BulkTiming } from "../src/bulk/session.js";
import { startApiServer, type ApiServer } from "./api.js";
import { apiRequest } from "./api-client.js";
import type { DataPlane } from "./dataplane.js";
import { IpamDriver, type PodAddress } from "./ipam.js";
import { K8sRelease } from "./k8s-release.js";
import type { NodeWatchConfig, NodeWatcher } from "./k8s.js";
import type { MetricsServer } from "./metrics.js";
import type { PodInfo, Pods } from "./pods.js";
import { checkAdvertisedRoutes, RoutePolicy } from "./route-policy.js";
import { newInstanceId, SignalClient } from "./signal-client.js";
import { apiSocketPath, loadOrCreateIdentity } from "./state.js";
import { describePeers, ipamView, linkPath, routeStatus, type AgentStatus, type AgentView, type IpamView, type PeerPath, type RouteStatus } from "./status.js";
import { createTransport, inRange } from "./transport-choice.js";
import { BulkService, refuseBulk } from "./transport/bulk.js";
import { loadSodiumChaCha } from "./os/sodium.js";
import { answerWaitStats } from "./os/fd-reader.js";
import { createRelayTransport, type RelayTransport } from "./transport/relay.js";
import { VERSION } from "./version.js";
import { AgentStun, ownStun, stunPlan, type StunUse } from "./stun-server.js";

export { checkAdvertisedRoutes } from "./route-policy.js";
export type { PodInfo } from "./pods.js";

/** IPv4 networks of this host's interfaces (except loopback and the overlay's own). */
function hostNetworks(): Cidr[] {
  const out: Cidr[] = [];
  for (const [name, addrs] of Object.entries(networkInterfaces())) {
    for (const a of addrs ?? []) {
      if (a.family !== "IPv4" || a.internal || !a.cidr) continue;
      if (name.startsWith("weft")) continue;
      const [ip, len] = a.cidr.split("/") as [string, string];
      try {
        const prefix = Number(len);
        const size = 2 ** (32 - prefix);
        out.push({ base: Math.floor(parseIp(ip) / size) * size, prefix });
      } catch {
        // not an address we understand
      }
    }
  }
  return out;
}

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
  /** Software segmentation of GSO packets towards WebRTC links (--segment; default auto, see src/packet/gso-policy.ts). */
  segment?: import("../src/packet/gso-policy.js").SegmentMode;
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
  readonly routePolicy: RoutePolicy;
  readonly k8sRelease: K8sRelease;
  ipam!: IpamDriver;
  dataplane: DataPlane | undefined;
  private pods: Pods | undefined;
  private sourcesTimer: NodeJS.Timeout | undefined;
  /** peers' underlay addresses (selected ICE pairs), never routed into the overlay */
  private peerAddrs: string[] = [];
  relay: RelayTransport | undefined;
  /** the bulk link service (--bulk), when enabled */
  bulk: BulkService | undefined;
  /** the --metrics-listen server (its bound address), when enabled */
  metrics: MetricsServer | undefined;
  /** the --k8s-node-watch watcher, when enabled */
  k8s: NodeWatcher | undefined;

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
    this.routePolicy = new RoutePolicy({
      selfId: id,
      configuredRange: cfg.ipam?.range ?? DEFAULT_CLUSTER_RANGE,
      advertise: cfg.advertiseRoutes ?? [],
      accept: cfg.acceptRoutes,
      ownedBlocks: () => this.ipam?.localBlocks(),
      ipamOwners: () => this.ipam?.owners(),
      records: () => this.router.records(),
      peerName: (n) => mesh.peerName(n),
      hostNetworks,
      protectedHosts: () => {
        const iceHosts = this.iceServers().flatMap((s) => (Array.isArray(s.urls) ? s.urls : [s.urls])).map((u) => /^(?:stuns?|turns?):\[?([^\]?/]+?)\]?(?::\d+)?(?:\?.*)?$/.exec(u)?.[1] ?? "");
        return [this.signal.host, ...iceHosts, ...this.peerAddrs];
      },
      prefixesChanged: () => this.router.prefixesChanged(),
      logger: log,
    });
    this.router = new Router({
      mesh,
      logger: log.child("router"),
      now: () => Date.now(),
      localPrefixes: () => this.routePolicy.localPrefixes(),
      prefixAllowed: (node, cidr) => this.routePolicy.prefixAllowed(node, cidr),
      localStun: () => this.stun?.advertised(this.reflexive) ?? [],
      // Gossip and new links recompute the routes right after the I/O of this loop turn, never inside a
      // packet's nextHop() (src/mesh/router.ts).
      onDirty: () =>
        setImmediate(() => {
          if (!this.stopping) this.router.flush();
        }),
    });
    this.k8sRelease = new K8sRelease({
      selfId: id,
      selfName: name,
      blockOwners: () => this.ipam.status().blocks.map((b) => b.owner),
      // the agent saw the Node deleted itself: that is the release's authority (src/ipam/node.ts ReleaseAuth)
      forceRelease: (node) => this.ipam.forceRelease(node, { observedGone: true }),
      peerName: (n) => mesh.peerName(n),
      reachable: (n) => mesh.isConnected(n) || this.router.nextHop(n) !== undefined,
      ...(cfg.k8sNodeWatch?.pendingMs !== undefined ? { pendingMs: cfg.k8sNodeWatch.pendingMs } : {}),
      now: () => Date.now(),
      logger: log.child("k8s"),
    });
    this.viaPinger = new ViaPinger({ selfId: id, onApp: (ch, h) => mesh.onApp(ch, h), sendApp: (p, ch, b) => mesh.sendApp(p, ch, b), connected: (p) => mesh.isConnected(p), ping: (p, t) => mesh.ping(p, t), nextHop: (n) => this.router.nextHop(n), now: () => performance.now(), log });
  }
  private readonly viaPinger: ViaPinger;

  static async start(cfg: AgentConfig): Promise<Agent> {
    const log = cfg.logger ?? createLogger({ level: "warn" });
    checkAdvertisedRoutes(cfg.advertiseRoutes ?? [], cfg.ipam?.range ?? DEFAULT_CLUSTER_RANGE);
    const { identity, created } = loadOrCreateIdentity(cfg.stateDir);
    const name = cfg.name ?? hostname();
    const instance = newInstanceId();
    const sock = apiSocketPath(cfg.stateDir);
    if (cfg.api !== false) await claimSocket(sock, cfg.stateDir);
    const transport =
      cfg.transport ??
      (await createTransport({
        clusterRange: cfg.ipam?.range ?? DEFAULT_CLUSTER_RANGE,
        logger: log,
        ...(cfg.transportKind !== undefined ? { kind: cfg.transportKind } : {}),
        ...(cfg.linkMtu !== undefined ? { linkMtu: cfg.linkMtu } : {}),
        ...(cfg.werift !== undefined ? { werift: cfg.werift } : {}),
      }));
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
      const rangeCidr = parseCidr(cfg.ipam?.range ?? DEFAULT_CLUSTER_RANGE);
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
        // UDP to the peer works again: a relayed mesh link tries WebRTC now, not at its next probe.
        agent.bulk.onUpDown((peer, up) => up && mesh.directPathWorks(peer));
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
    mesh.onPeerUp((id) => agent!.k8sRelease.peerUp(id));
    if (cfg.tun) {
      try {
        await agent.startDataPlane();
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
        a.k8s = new NodeWatcher(cfg.k8sNodeWatch, { onDeleted: (n) => a.k8sRelease.nodeDeleted(n), onPresent: (n) => a.k8sRelease.present(n) }, agentLog.child("k8s"));
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
        agent!.routePolicy.checkConflicts();
        agent!.ipam.tick();
        agent!.k8sRelease.tick();
      }
    }, 200);
    return agent;
  }

  /**
   * The data plane from its ports: the TUN, the node network (netconf + gateway rules), the mesh's packet
   * side (the bulk link preferred where it is up), the router's tables, the route policy's source table and
   * desiredNodeNetwork() over this agent's inputs. Every input change goes through its one reconcile trigger.
   */
  private async startDataPlane(): Promise<void> {
    const cfg = this.cfg;
    const log = this.log.child("dataplane");
    const [{ DataPlane, segmentModeFromEnv }, { openTun, DEFAULT_TUN_NAME }, { NodeNetwork, DEFAULT_BRIDGE, DEFAULT_MTU }, { LinuxNodeNetwork }, { Pods }] = await Promise.all([
      import("./dataplane.js"),
      import("./os/tun.js"),
      import("./os/netconf.js"),
      import("./os/node-network.js"),
      import("./pods.js"),
    ]);
    const bridge = cfg.bridge ?? DEFAULT_BRIDGE;
    const mtu = cfg.mtu ?? DEFAULT_MTU;
    // reuseSlab: the forwarder copies every packet into a frame inside onBatch.
    const tun = openTun({ name: cfg.iface ?? DEFAULT_TUN_NAME, reuseSlab: true });
    const network = new LinuxNodeNetwork(new NodeNetwork({ tunName: tun.name, bridge, mtu, logger: log, stateFile: join(cfg.stateDir, "netconf.json") }), log);
    const { mesh, bulk, router, routePolicy: policy, ipam } = this;
    const sodiumChaCha = loadSodiumChaCha(); // transit frames sealed per packet: one FFI call each (node:crypto otherwise)
    const dp = new DataPlane({
      selfId: this.id,
      device: tun,
      network,
      mesh: {
        // The bulk UDP link where it is up (agent/transport/bulk.ts), else the mesh link (WebRTC/relay).
        sendPacket: bulk ? (peer, frame) => bulk.send(peer, frame) ?? mesh.sendPacket(peer, frame) : (peer, frame) => mesh.sendPacket(peer, frame),
        // A peer on the bulk link has no WebRTC queue worth asking about (the call reaches into libdatachannel).
        queued: bulk ? (peer) => (bulk.isUp(peer) ? 0 : mesh.queued(peer)) : (peer) => mesh.queued(peer),
        // The bulk link segments by itself (one inner packet per datagram); WebRTC links report their budget.
        linkBudget: (peer) => (bulk?.isUp(peer) ? undefined : mesh.link(peer)?.packetBudget),
        // Frames sealed end to end for a node behind the peer ride the bulk link whole, one per datagram:
        // the forwarder sizes them to this (issue 12: a via path at bulk speed on both hops).
        sealedBudget: (peer) => bulk?.sealedBudget(peer),
        onPacket: (h) => {
          mesh.onPacket(h);
          bulk?.onFrame(h);
        },
        onDrain: (h) => mesh.onDrain(h),
        onPeerDown: (h) => mesh.onPeerDown(h),
      },
      routes: router,
      // Cryptokey routing: who may use which address (IPAM blocks, accepted and own routes), and end-to-end
      // sealing of frames through transit nodes with keys from the nodes' signed topology records.
      sources: policy.sources,
      sealer: new FrameSealer({ identity: mesh.identity, publicKeyOf: (n) => router.topo.get(n)?.pub, now: () => Date.now(), ...(sodiumChaCha ? { cipher: sodiumChaCha } : {}) }),
      desired: () =>
        desiredNodeNetwork({
          tun: tun.name,
          clusterRange: ipam.status().range,
          ownedBlocks: ipam.localBlocks(),
          activeBlocks: ipam.activeBlocks(),
          acceptedRoutes: policy.acceptedRoutes(),
          advertised: policy.advertisedRoutes(),
          snat: !!cfg.snatRoutes,
        }),
      segment: cfg.segment ?? segmentModeFromEnv(),
      now: () => performance.now(),
      logger: log,
      bridge,
      mtu,
    });
    try {
      await dp.start();
    } catch (e) {
      await tun.close().catch(() => {});
      await network.teardown().catch(() => {});
      throw e;
    }
    this.dataplane = dp;
    const reconcile = () => void dp.reconcile().catch((err) => log.error("could not apply the node network", { err }));
    ipam.onBlocksChanged(reconcile);
    // Routes advertised by other nodes (and our own advertisements) change with the gossip.
    let routesKey = "";
    router.onChange(() => {
      const key = JSON.stringify([policy.acceptedRoutes(), policy.advertisedRoutes()]);
      if (key === routesKey) return;
      routesKey = key;
      reconcile();
    });
    const pods = (this.pods = new Pods({ ipam, reconcile: () => dp.reconcile(), bridge, mtu, logger: log }));
    ipam.onRevoked((r) => void pods.revoked(r.podId));
    policy.refreshSources();
    router.onChange(() => policy.refreshSources());
    ipam.onBlocksChanged(() => policy.refreshSources());
    // Any IPAM ownership change (a new block of another node, a reclaim) updates the source table and the
    // router's prefix owners right after this loop turn (coalesced: a state sync applies many entries).
    // What has no event of its own (this host's networks, peers' addresses for the route decisions) is
    // looked at once a second. Before, a 250 ms timer rebuilt the full IPAM status for this (issue 11).
    let ownersVersion = 0;
    const refreshSources = () => {
      policy.refreshSources();
      if (policy.sourcesVersion !== ownersVersion) {
        ownersVersion = policy.sourcesVersion;
        router.refreshOwners(); // forwarding follows IPAM ownership and accepted routes
      }
    };
    let refreshQueued = false;
    ipam.onOwnersChanged(() => {
      if (refreshQueued) return;
      refreshQueued = true;
      setImmediate(() => {
        refreshQueued = false;
        if (!this.stopping) refreshSources();
      });
    });
    this.sourcesTimer = setInterval(() => {
      refreshSources();
      void mesh.status().then((ps) => {
        this.peerAddrs = ps.flatMap((p) => (p.selected ? [p.selected.remoteAddress.replace(/:\d+$/, "")] : []));
      }, () => {});
    }, 1000);
    this.sourcesTimer.unref?.();
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
      peers: describePeers(await this.mesh.status(), (id) => this.router.route(id), (id) => this.mesh.peerName(id), { enabled: !!this.bulk, status: (id) => this.bulk?.status(id) ?? null }),
      bulk: this.bulk ? { port: this.bulk.port, candidates: this.bulk.candidates(), crypto: this.bulk.cryptoName, gso: this.bulk.socket.gso, gro: this.bulk.socket.gro, coalesced: { ...this.bulk.gro }, counters: { ...this.bulk.counters }, pmtu: structuredClone(this.bulk.pmtu), answerWait: answerWaitStats() } : null,
      dataplane: this.dataplane ? { ...this.dataplane.stats(), routes: this.routePolicy.decisions } : null,
      stun: { serving: this.stun?.status(this.reflexive) ?? null, using: this.stunUses() },
      routes: { advertised: this.cfg.advertiseRoutes ?? [], inForce: this.routePolicy.advertisedRoutes(), snat: !!this.cfg.snatRoutes, conflicts: this.routePolicy.conflicts },
      pmtu: this.transport.pmtu?.() ?? null,
      pmtuFixed: this.transport.pmtuFixed ?? null,
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

  peerName(id: string): string | undefined {
    return this.mesh.peerName(id);
  }

  /** The data plane's drop counters (forwarder and TUN), when it runs. */
  drops() {
    const dp = this.dataplane;
    return dp ? { forwarder: dp.forwarder.drops, tun: dp.device.drops } : null;
  }

  routes(): RouteStatus[] {
    return routeStatus(this.router.entries(), (id) => this.mesh.peerName(id));
  }

  ipamStatus(): IpamView {
    const connected = new Set(this.mesh.connectedPeers());
    return ipamView(this.ipam.status(), this.id, this.name, (id) => this.mesh.peerName(id), (id) => connected.has(id) || this.router.nextHop(id) !== undefined);
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

  /**
   * `weftnet ipam release`: `sigs` are the operator's signatures, block index -> signature (src/ipam/signing.ts
   * releaseFields); `remove` its signature of the node's removal from the member list (removeFields).
   */
  ipamRelease(target: string, sigs: Map<number, Uint8Array> = new Map(), remove?: Uint8Array): { node: string } {
    const id = /^[0-9a-f]{16}$/.test(target) ? target : this.mesh.resolvePeer(target);
    if (!id) throw new WeftError("ERR_NO_PEER", `no node matches ${JSON.stringify(target)}; give the full node id from \`weftnet status ipam\``);
    if (id === this.id) throw new WeftError("ERR_USAGE", "refusing to release this node's own blocks; stop the agent and remove its ipam.json instead");
    if (this.mesh.isConnected(id)) throw new WeftError("ERR_USAGE", `node ${id} is connected right now; release only nodes that are gone`);
    this.ipam.forceRelease(id, { operator: sigs, ...(remove ? { remove } : {}) });
    return { node: id };
  }

  private requirePods(): Pods {
    if (!this.pods) throw new WeftError("ERR_NO_DATAPLANE", "this agent runs without a data plane (--no-tun); pods need the TUN data plane");
    return this.pods;
  }

  addPod(name: string): Promise<PodInfo> {
    return this.requirePods().add(name);
  }

  delPod(name: string): Promise<{ released: boolean }> {
    return this.requirePods().del(name);
  }

  /** Round trip over the peer's link; `path` is the path that link takes (as in status). */
  async ping(target: string, timeoutMs = 3000): Promise<{ id: string; name: string; rttMs: number; path: PeerPath }> {
    const id = this.mesh.resolvePeer(target);
    if (!id) throw new WeftError("ERR_NO_PEER", `no peer matches ${JSON.stringify(target)} (use a node id, a unique id prefix or a name from \`weftnet status\`)`);
    const hop = this.mesh.isConnected(id) ? undefined : this.router.nextHop(id);
    if (hop !== undefined && hop !== id) {
      // no link of our own: forwarded along the route (agent/ping.ts), timed over the whole path
      const rtt = await this.viaPinger.via(id, hop, timeoutMs);
      return { id, name: this.mesh.peerName(id) ?? id, rttMs: Math.round(rtt * 1000) / 1000, path: `via ${this.mesh.peerName(hop) ?? hop}` };
    }
    const rtt = await this.mesh.ping(id, timeoutMs);
    // The ping went over the direct link to the peer (control channel), whatever the route of pod traffic.
    const p = (await this.mesh.status()).find((x) => x.id === id);
    return { id, name: this.mesh.peerName(id) ?? id, rttMs: Math.round(rtt * 1000) / 1000, path: p ? linkPath(p) : "direct" };
  }

  stop(): Promise<void> {
    this.stopping ??= (async () => {
      if (this.tickTimer) clearInterval(this.tickTimer);
      if (this.sourcesTimer) clearInterval(this.sourcesTimer);
      this.k8s?.stop();
      await this.bulk?.close().catch((err) => this.log.warn("could not close the bulk link", { err }));
      await this.stun?.close().catch((err) => this.log.warn("could not close the STUN responder", { err }));
      await this.mesh.stop();
      this.signal.stop();
      // the last IPAM changes reach the disk (writes are asynchronous, agent/snapshot-writer.ts)
      await this.ipam?.close().catch((err) => this.log.error("could not write the IPAM state", { err }));
      await this.api?.close();
      await this.metrics?.close();
      await this.dataplane?.stop().catch((err) => this.log.error("could not remove the node network", { err }));
      await this.transport.close();
    })();
    return this.stopping;
  }
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
