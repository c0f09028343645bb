/**
 * The node's data plane: TUN device + node network (bridge, routes) + the forwarder + pods.
 *
 *   pod (veth) -> bridge weft-br0 -> kernel route "cluster range -> weft0" -> TUN read batch
 *     -> Forwarder: LPM over gossiped prefixes -> owner node -> next hop (router) -> packets channel
 *   packets channel -> Forwarder: ours? -> TUN write -> kernel -> bridge -> pod
 *                                 transit? -> next hop (header only, TTL spent)
 *
 * OS state is declarative (NodeNetwork.apply) and re-applied whenever this node's pod blocks change;
 * stop() removes what was added. Pods are network namespaces attached to the bridge (agent/os/pod.ts),
 * addressed from this node's IPAM blocks by pod id, the same path the CNI plugin uses.
 */
import { join } from "node:path";
import { WeftError } from "../src/errors.js";
import type { Logger } from "../src/log.js";
import { Forwarder } from "../src/packet/forwarder.js";
import { ByteArena } from "../src/packet/gso.js";
import { coalesce, type GroStats } from "../src/packet/gro.js";
import { SEGMENT_MODES, type SegmentMode } from "../src/packet/gso-policy.js";
import type { Agent } from "./agent.js";
import type { PodAddress } from "./ipam.js";
import { DEFAULT_BRIDGE, DEFAULT_MTU, NodeNetwork, desiredNetwork } from "./os/netconf.js";
import { addPod, delPod, listPods, podVethName, type PodResult } from "./os/pod.js";
import { DEFAULT_TUN_NAME, openTun, type TunDevice } from "./os/tun.js";
import { AdvertiseGateway, decideRoutes, type RouteDecision } from "./os/advertise.js";
import { PrefixTable } from "../src/packet/prefix-table.js";
import { FrameSealer } from "../src/packet/seal.js";
import { containsIp, overlaps, parseCidr, parseIp, type Cidr } from "../src/ipam/cidr.js";
import { networkInterfaces } from "node:os";

/** IPv4 networks of this host's interfaces (except loopback and the overlay's own). */
function localNetworks(): Cidr[] {
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

/** Received packets collected before a coalesce + TUN write is forced (see DataPlane.toTun). */
const RX_BATCH = 1024;

/** WEFTNET_SEGMENT=auto|always|off (benchmarks and debugging; default auto, see src/packet/gso-policy.ts). */
function segmentModeFromEnv(): SegmentMode {
  const v = process.env.WEFTNET_SEGMENT;
  return v && (SEGMENT_MODES as readonly string[]).includes(v) ? (v as SegmentMode) : "auto";
}

export interface DataPlaneOptions {
  iface?: string;
  bridge?: string;
  mtu?: number;
  /** Software segmentation towards lossy links (default: WEFTNET_SEGMENT, else auto). */
  segment?: SegmentMode;
  logger: Logger;
}

export interface PodInfo extends PodAddress {
  name: string;
  hostVeth: string;
  netns: string;
}

export class DataPlane {
  readonly forwarder: Forwarder;
  private applying: Promise<unknown> = Promise.resolve();
  private stopped = false;
  readonly iface: string;
  readonly bridge: string;
  readonly mtu: number;

  private constructor(
    private readonly agent: Agent,
    readonly tun: TunDevice,
    readonly net: NodeNetwork,
    private readonly log: Logger,
    opts: DataPlaneOptions,
  ) {
    this.iface = tun.name;
    this.bridge = opts.bridge ?? DEFAULT_BRIDGE;
    this.mtu = opts.mtu ?? DEFAULT_MTU;
    const mesh = agent.mesh;
    this.gateway = new AdvertiseGateway({ logger: log });
    // Cryptokey routing: who may use which address (IPAM blocks, accepted and own routes), and end-to-end
    // sealing of frames through transit nodes with keys from the nodes' signed topology records.
    this.sealer = new FrameSealer({ identity: mesh.identity, publicKeyOf: (n) => agent.router.topo.get(n)?.pub, now: () => Date.now() });
    this.forwarder = new Forwarder({
      sources: this.sources,
      sealer: this.sealer,
      selfId: agent.id,
      routes: agent.router.owners,
      nextHop: (n) => agent.router.nextHop(n),
      // The bulk UDP link where it is up (agent/transport/bulk.ts), else the mesh link (WebRTC/relay).
      send: (peer, frame) => agent.bulk?.send(peer, frame) ?? mesh.sendPacket(peer, frame),
      queued: (peer) => mesh.queued(peer),
      sendBorrows: true, // TransportLink.send copies or transmits before returning
      deliver: (pkts) => this.toTun(pkts),
      vnetHdr: tun.vnetHdr,
      // The bulk link segments by itself (one inner packet per datagram); WebRTC links report their budget.
      linkBudget: (peer) => (agent.bulk?.isUp(peer) ? undefined : mesh.link(peer)?.packetBudget),
      segment: opts.segment ?? segmentModeFromEnv(),
      now: () => performance.now(),
    });
  }

  // ---- receive side: userspace GRO before the TUN write (src/packet/gro.ts) ----------------------------
  private readonly rx: Uint8Array[] = [];
  private readonly rxOut: Uint8Array[] = [];
  private readonly rxArena = new ByteArena();
  private rxScheduled = false;
  readonly gro: GroStats = { merged: 0, built: 0 };

  /**
   * Packets for the TUN, from every message received in this turn of the event loop: collected, then
   * coalesced (segments of one TCP flow back into a GSO super-packet) and written as one batch from
   * setImmediate, i.e. after the I/O callbacks that delivered them. Messages hand over fresh buffers
   * (the packets stay valid); RX_BATCH bounds what waits.
   */
  private toTun(pkts: Uint8Array[]): void {
    const rx = this.rx;
    for (let i = 0; i < pkts.length; i++) rx.push(pkts[i]!);
    if (rx.length >= RX_BATCH) this.flushRx();
    else if (!this.rxScheduled) {
      this.rxScheduled = true;
      setImmediate(this.flushRxCb);
    }
  }

  private readonly flushRxCb = () => {
    this.rxScheduled = false;
    this.flushRx();
  };

  private flushRx(): void {
    const rx = this.rx;
    if (rx.length === 0) return;
    if (this.tun.vnetHdr) {
      coalesce(rx, this.rxArena, this.rxOut, this.gro);
      this.tun.writeBatch(this.rxOut);
      this.rxOut.length = 0;
      this.rxArena.reset();
    } else {
      this.tun.writeBatch(rx);
    }
    rx.length = 0;
  }

  static async start(agent: Agent, opts: DataPlaneOptions): Promise<DataPlane> {
    // reuseSlab: the forwarder copies every packet into a frame inside onBatch.
    const tun = openTun({ name: opts.iface ?? DEFAULT_TUN_NAME, reuseSlab: true });
    const net = new NodeNetwork({ tunName: tun.name, bridge: opts.bridge ?? DEFAULT_BRIDGE, mtu: opts.mtu ?? DEFAULT_MTU, logger: opts.logger, stateFile: join(agent.cfg.stateDir, "netconf.json") });
    const dp = new DataPlane(agent, tun, net, opts.logger, opts);
    try {
      await dp.reconcile();
    } catch (e) {
      await tun.close().catch(() => {});
      await net.teardown().catch(() => {});
      throw e;
    }
    const fw = dp.forwarder;
    tun.start(
      (batch) => {
        fw.fromTun(batch);
        if (fw.shouldPause()) tun.pause();
      },
      (err) => opts.logger.error("TUN read loop stopped", { err }),
    );
    agent.mesh.onPacket((from, data) => fw.fromPeer(from, data));
    agent.bulk?.onFrame((from, data) => fw.fromPeer(from, data));
    agent.mesh.onDrain((peer, ch) => {
      if (ch !== "packets") return;
      fw.drained(peer);
      if (tun.paused && !fw.shouldPause()) tun.resume();
    });
    agent.mesh.onPeerDown((peer) => {
      fw.linkDown(peer);
      if (tun.paused && !fw.shouldPause()) tun.resume();
    });
    agent.ipam.onBlocksChanged(() => void dp.reconcile().catch((err) => opts.logger.error("could not apply the node network", { err })));
    // Routes advertised by other nodes (and our own advertisements) change with the gossip.
    agent.router.onChange(() => {
      const key = JSON.stringify([dp.remoteRoutes(), agent.advertisedRoutes()]);
      if (key === dp.routesKey) return;
      dp.routesKey = key;
      void dp.reconcile().catch((err) => opts.logger.error("could not apply the node network", { err }));
    });
    agent.ipam.onRevoked((r) => void dp.revoked(r.podId));
    dp.refreshSources();
    agent.router.onChange(() => dp.refreshSources());
    agent.ipam.onBlocksChanged(() => dp.refreshSources());
    // Remote IPAM ownership changes without a local event: look again every 250 ms (a new block of another
    // node is refused as a source until then; the key comparison keeps an unchanged table cheap).
    let ticks = 0;
    dp.sourcesTimer = setInterval(() => {
      dp.refreshSources();
      if (dp.sourcesKey !== dp.ownersKey) {
        dp.ownersKey = dp.sourcesKey;
        agent.router.refreshOwners(); // forwarding follows IPAM ownership and accepted routes
      }
      if (++ticks % 4 !== 0) return; // peers' addresses: once a second
      void agent.mesh.status().then((ps) => {
        dp.peerAddrs = ps.flatMap((p) => (p.selected ? [p.selected.remoteAddress.replace(/:\d+$/, "")] : []));
      }, () => {});
    }, 250);
    dp.sourcesTimer.unref?.();
    return dp;
  }

  /** Apply the desired OS state (serialised; a second identical apply changes nothing). */
  reconcile(): Promise<void> {
    const run = async () => {
      if (this.stopped) return;
      const range = this.agent.ipam.status().range;
      const extraRoutes = this.remoteRoutes().map((cidr) => ({ cidr, dev: this.iface }));
      const ipam = this.agent.ipam;
      const { changes } = await this.net.apply(desiredNetwork({ clusterRanges: [range], ownedBlocks: ipam.localBlocks(), activeBlocks: ipam.activeBlocks(), extraRoutes }));
      if (changes.length) this.log.info("node network updated", { changes });
      const own = this.agent.advertisedRoutes();
      if (own.length || this.gatewayActive) {
        await this.gateway.apply({ tun: this.iface, clusterRanges: [range], routes: own, snat: !!this.agent.cfg.snatRoutes });
        this.gatewayActive = own.length > 0;
      }
    };
    const p = this.applying.then(run, run);
    this.applying = p.catch(() => {});
    return p;
  }

  routesKey = "";
  /** address -> node allowed to use it (forwarder `sources`), rebuilt by refreshSources() */
  readonly sources = new PrefixTable<string>();
  private readonly sealer: FrameSealer;
  private sourcesKey = "";
  private ownersKey = "";
  private sourcesTimer: NodeJS.Timeout | undefined;
  /** the last decision on every route other nodes advertise (status: installed or why not) */
  routeDecisions: RouteDecision[] = [];
  /** peers' underlay addresses (selected ICE pairs), never routed into the overlay */
  private peerAddrs: string[] = [];

  /** Rebuild the cryptokey routing table from the IPAM table and the route decisions (cheap when unchanged). */
  refreshSources(): void {
    const entries: [string, string][] = [];
    for (const b of this.agent.ipam.status().blocks) if (b.owner) entries.push([b.cidr, b.owner]);
    for (const r of this.agent.advertisedRoutes()) entries.push([r, this.agent.id]);
    this.remoteRoutes();
    for (const d of this.routeDecisions) if (d.accepted) entries.push([d.cidr, d.node]);
    const key = JSON.stringify(entries);
    if (key === this.sourcesKey) return;
    this.sourcesKey = key;
    // An exact prefix can appear once: the first (IPAM, then ours, then accepted) wins.
    const seen = new Set<string>();
    this.sources.replaceAll(entries.filter(([c]) => !seen.has(c) && !!seen.add(c)));
  }

  private gatewayActive = false;
  private readonly gateway: AdvertiseGateway;

  /**
   * Prefixes other nodes advertise outside the cluster range, to route into the TUN. A prefix that
   * overlaps one of this host's own networks, or holds the signaling server, is skipped: those are
   * reachable directly, and routing them into the overlay would carry the overlay's own packets.
   */
  remoteRoutes(): string[] {
    const offers = [];
    for (const rec of this.agent.router.records()) {
      if (rec.node === this.agent.id) continue;
      for (const cidr of rec.prefixes) offers.push({ node: rec.node, cidr });
    }
    const iceHosts = this.agent.iceServers().flatMap((s) => (Array.isArray(s.urls) ? s.urls : [s.urls])).map((u) => /^(?:stuns?|turns?):\[?([^\]?/]+?)\]?(?::\d+)?(?:\?.*)?$/.exec(u)?.[1] ?? "");
    this.routeDecisions = decideRoutes({
      offers,
      accept: this.agent.cfg.acceptRoutes,
      clusterRange: this.agent.ipam.status().range,
      localNetworks: localNetworks(),
      protectedHosts: [this.agent.signal.host, ...iceHosts, ...this.peerAddrs],
      own: this.agent.advertisedRoutes(),
    });
    return [...new Set(this.routeDecisions.filter((d) => d.accepted).map((d) => d.cidr))].sort();
  }

  /** `weftnet pod add NAME`: a netns with a veth on the bridge and an address from this node's blocks. */
  async addPod(name: string): Promise<PodInfo> {
    if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/.test(name)) throw new WeftError("ERR_USAGE", `pod name ${JSON.stringify(name)} must be 1-64 chars of letters, digits, '.', '_' or '-'`);
    const podId = `pod/${name}`;
    const addr = await this.agent.allocate(podId);
    await this.reconcile(); // the block now has a pod: give it its gateway on the bridge
    let res: PodResult;
    try {
      res = await addPod({ netns: { name }, podId, ip: addr.ip, prefixLen: addr.prefixLen, gateway: addr.gateway, bridge: this.bridge, mtu: this.mtu, logger: this.log });
    } catch (e) {
      this.agent.release(podId);
      await this.reconcile().catch(() => {});
      throw e;
    }
    return { ...addr, name, hostVeth: res.hostVeth, netns: name };
  }

  async delPod(name: string): Promise<{ released: boolean }> {
    const podId = `pod/${name}`;
    await delPod({ netns: { name }, podId, hostVeth: podVethName(podId), deleteNetns: true, logger: this.log });
    const released = this.agent.release(podId);
    await this.reconcile();
    return { released };
  }

  private async revoked(podId: string): Promise<void> {
    if (!podId.startsWith("pod/")) return;
    const name = podId.slice(4);
    await delPod({ netns: { name }, podId, hostVeth: podVethName(podId), deleteNetns: false, logger: this.log }).catch((err) => this.log.warn("could not detach revoked pod", { pod: name, err }));
  }

  async pods(): Promise<unknown[]> {
    return listPods();
  }

  stats() {
    const f = this.forwarder;
    return {
      iface: this.iface,
      bridge: this.bridge,
      mtu: this.mtu,
      paused: this.tun.paused,
      tun: this.tun.stats,
      forwarder: { ...f.stats, perPeer: Object.fromEntries(f.stats.perPeer) },
      segmentation: { mode: f.segmenter.mode, ...f.segmenter.stats },
      gro: { ...this.gro },
      /** every route other nodes advertise: installed, or why not (--accept-routes, reserved, underlay, conflict) */
      routes: this.routeDecisions,
      drops: { ...f.drops.snapshot(), ...Object.fromEntries(Object.entries(this.tun.drops.snapshot()).map(([k, v]) => [`tun-${k}`, v])) },
    };
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.sourcesTimer) clearInterval(this.sourcesTimer);
    await this.applying;
    await this.tun.close();
    if (this.gatewayActive) await this.gateway.teardown().catch((err) => this.log.warn("could not remove the advertised-route rules", { err }));
    await this.net.teardown();
  }
}
