/**
 * The node's data plane, built only from ports (as wireguard-go's NewDevice(tun, bind, logger)):
 *
 *   device    PacketDevice: the TUN (agent/os/tun.ts; src/testing/memory-device.ts MemoryDevice in tests)
 *   network   NodeNetworkPort: converges the OS to a desired state (agent/os/node-network.ts: netconf +
 *             gateway rules; RecordingNetwork in tests)
 *   mesh      MeshPacketPort: send a frame to a peer (the bulk link where it is up, else the mesh link),
 *             its queue and budget, frames / drains / lost peers from the links
 *   routes    RoutePort: prefix -> owner node, node -> next hop (src/mesh/router.ts Router)
 *   sources   the cryptokey routing table, address -> node allowed to use it (agent/route-policy.ts keeps it)
 *   sealer    end-to-end sealing of frames through transit nodes (src/packet/seal.ts)
 *   desired() the desired OS state now: src/desired-network.ts desiredNodeNetwork(...) over the agent's inputs
 *
 *   pod (veth) -> bridge weft-br0 -> kernel route "cluster range -> weft0" -> TUN read batch
 *     -> Forwarder: source check (sources) -> LPM over gossiped prefixes -> owner node -> next hop -> mesh port
 *   frame from a peer -> Forwarder: source check -> ours? -> TUN write -> kernel -> bridge -> pod
 *                                   transit? -> next hop (header only, TTL spent; sealed end to end)
 *
 * Receive side: packets for the TUN from every message of one event-loop turn are coalesced (userspace
 * GRO, src/packet/gro.ts) and written as one batch. Send side: the Forwarder segments GSO super-packets
 * towards lossy WebRTC links (src/packet/gso-policy.ts; the bulk link segments by itself).
 *
 * Backpressure is the Forwarder's one policy (src/packet/forwarder.ts): after each batch the TUN is paused
 * when shouldPause(); a drain or a lost peer is the only cue to resume.
 *
 * OS state: reconcile() is the one trigger. A call while a run is queued (not started yet) shares that run;
 * runs are serialised, each computes desired() when it starts and skips the apply when that equals what was
 * last applied, so the triggers of one change (IPAM blocks, gossiped routes, a pod allocated or released)
 * apply it once. A failed apply is tried again by the next call. stop() tears down what was added.
 * The DataPlane itself does no I/O: everything goes through its ports.
 */
import type { DesiredNodeNetwork, NodeNetworkPort } from "../src/desired-network.js";
import type { Logger } from "../src/log.js";
import type { ChannelName, SendResult } from "../src/mesh/transport.js";
import type { PacketDevice } from "../src/packet/device.js";
import { Forwarder } from "../src/packet/forwarder.js";
import { ByteArena } from "../src/packet/gso.js";
import { coalesce, type GroStats } from "../src/packet/gro.js";
import { SEGMENT_MODES, type SegmentMode } from "../src/packet/gso-policy.js";
import type { PrefixTable } from "../src/packet/prefix-table.js";
import type { FrameSealer } from "../src/packet/seal.js";

/** Received packets collected before a coalesce + TUN write is forced (see DataPlane.toTun). */
const RX_BATCH = 1024;

/** WEFTNET_SEGMENT=auto|always|off (benchmarks and debugging; default auto, see src/packet/gso-policy.ts). */
export function segmentModeFromEnv(): SegmentMode {
  const v = process.env.WEFTNET_SEGMENT;
  return v && (SEGMENT_MODES as readonly string[]).includes(v) ? (v as SegmentMode) : "auto";
}

/** The packet side of the links to other nodes. */
export interface MeshPacketPort {
  /** Send one frame to a peer (TransportLink.send semantics: copies or transmits before returning). */
  sendPacket(peer: string, frame: Uint8Array): SendResult;
  /** bytes waiting on the peer's link (the Forwarder's high-water mark) */
  queued(peer: string): number;
  /** bytes one message to the peer should carry at most (segmentation); undefined: no budget */
  linkBudget(peer: string): number | undefined;
  /** bytes of the largest frame sealed end to end the peer's link carries whole (the bulk link); undefined: none */
  sealedBudget?(peer: string): number | undefined;
  /** frames from peers, whichever link carried them */
  onPacket(h: (from: string, data: Uint8Array) => void): void;
  /** a link can take more again (after "full") */
  onDrain(h: (peer: string, channel: ChannelName) => void): void;
  onPeerDown(h: (peer: string) => void): void;
}

/** Read side of the routing tables. */
export interface RoutePort {
  /** prefix -> node that owns/advertises it */
  readonly owners: PrefixTable<string>;
  nextHop(node: string): string | undefined;
}

export interface DataPlaneDeps {
  selfId: string;
  device: PacketDevice;
  network: NodeNetworkPort;
  mesh: MeshPacketPort;
  routes: RoutePort;
  /** address -> node allowed to use it as a source (anti-spoofing); unset: no source checks */
  sources?: PrefixTable<string>;
  /** end-to-end sealing through transit nodes; unset: transit frames are neither sealed nor accepted unsealed */
  sealer?: FrameSealer;
  desired(): DesiredNodeNetwork;
  logger: Logger;
  /** shown in stats (the pod bridge and MTU the network port was built with) */
  bridge: string;
  mtu: number;
  /** software segmentation towards lossy links (default auto) */
  segment?: SegmentMode;
  /** monotonic clock, ms (segmentation's loss detection) */
  now?: () => number;
}

export class DataPlane {
  readonly forwarder: Forwarder;
  readonly device: PacketDevice;
  private applying: Promise<unknown> = Promise.resolve();
  private queuedRun: Promise<void> | undefined;
  /** JSON of the last desired state applied successfully */
  private appliedKey: string | undefined;
  private stopped = false;
  private readonly log: Logger;

  constructor(private readonly d: DataPlaneDeps) {
    const dev = (this.device = d.device);
    this.log = d.logger;
    const mesh = d.mesh;
    const fw = (this.forwarder = new Forwarder({
      ...(d.sources ? { sources: d.sources } : {}),
      ...(d.sealer ? { sealer: d.sealer } : {}),
      selfId: d.selfId,
      routes: d.routes.owners,
      nextHop: (n) => d.routes.nextHop(n),
      send: (peer, frame) => mesh.sendPacket(peer, frame),
      queued: (peer) => mesh.queued(peer),
      sendBorrows: true, // TransportLink.send copies or transmits before returning
      deliver: (pkts) => this.toTun(pkts),
      vnetHdr: dev.vnetHdr,
      linkBudget: (peer) => mesh.linkBudget(peer),
      ...(mesh.sealedBudget ? { sealedBudget: (peer: string) => mesh.sealedBudget!(peer) } : {}),
      segment: d.segment ?? "auto",
      ...(d.now ? { now: d.now } : {}),
    }));
    mesh.onPacket((from, data) => fw.fromPeer(from, data));
    mesh.onDrain((peer, ch) => {
      if (ch !== "packets") return;
      fw.drained(peer);
      this.resumeIfClear();
    });
    mesh.onPeerDown((peer) => {
      fw.linkDown(peer);
      this.resumeIfClear();
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
    // What the kernel answered during the write (an ICMP reply, a TCP ACK: made in the write's own softirq)
    // is on the TUN now: forward it in this turn instead of the next loop iteration (~50 us cold, traced).
    this.device.readNow?.();
  };

  private flushRx(): void {
    const rx = this.rx;
    if (rx.length === 0) return;
    const dev = this.device;
    if (dev.vnetHdr) {
      coalesce(rx, this.rxArena, this.rxOut, this.gro);
      dev.writeBatch(this.rxOut);
      this.rxOut.length = 0;
      this.rxArena.reset();
    } else {
      dev.writeBatch(rx);
    }
    rx.length = 0;
  }

  /** Apply the node network once, then start reading the device. */
  async start(): Promise<void> {
    await this.reconcile();
    const fw = this.forwarder;
    const dev = this.device;
    dev.start(
      (batch) => {
        fw.fromTun(batch);
        if (fw.shouldPause()) dev.pause();
      },
      (err) => this.log.error("TUN read loop stopped", { err }),
    );
  }

  private resumeIfClear(): void {
    if (this.device.paused && !this.forwarder.shouldPause()) this.device.resume();
  }

  /** The one reconcile trigger (see the header): resolves once the OS matches desired() as of this call. */
  reconcile(): Promise<void> {
    if (this.queuedRun) return this.queuedRun;
    const run = async () => {
      this.queuedRun = undefined;
      if (this.stopped) return;
      const want = this.d.desired();
      const key = JSON.stringify(want);
      if (key === this.appliedKey) return;
      this.appliedKey = undefined; // until this apply succeeds
      const changes = await this.d.network.apply(want);
      this.appliedKey = key;
      if (changes.length) this.log.info("node network updated", { changes });
    };
    const p = this.applying.then(run, run);
    this.queuedRun = p;
    this.applying = p.catch(() => {});
    return p;
  }

  stats() {
    const f = this.forwarder;
    const dev = this.device;
    return {
      iface: dev.name,
      bridge: this.d.bridge,
      mtu: this.d.mtu,
      paused: dev.paused,
      tun: dev.stats,
      forwarder: { ...f.stats, perPeer: Object.fromEntries(f.stats.perPeer) },
      segmentation: { mode: f.segmenter.mode, ...f.segmenter.stats },
      gro: { ...this.gro },
      drops: { ...f.drops.snapshot(), ...Object.fromEntries(Object.entries(dev.drops.snapshot()).map(([k, v]) => [`tun-${k}`, v])) },
    };
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.applying;
    await this.device.close();
    await this.d.network.teardown();
  }
}
