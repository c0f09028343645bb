/**
 * The data path, sans-I/O: packets from the TUN go out as frames to a next hop; frames from peers are
 * either delivered to the TUN (we are the destination) or forwarded (transit, header-only, TTL spent).
 *
 *   TUN batch ──peek dst IP──▶ route table (prefix → owner node) ──▶ nextHop(owner) ──▶ coalesce per
 *   owner into frames (src=self, dst=owner) ──▶ send(nextHop, frame)            [flush at batch end]
 *
 *   frame from peer ──peek header──▶ dst == self ? decode + deliver(packets) : ttl-1, send(nextHop(dst))
 *
 * Every packet or frame that goes nowhere is counted under a typed DropReason. Backpressure: `send`
 * returns false when the link's queue is full; the frame is dropped (`queue-full`) and the peer is marked
 * saturated until `drained(peer)`. `shouldPause()` tells the driver to stop reading the TUN while every
 * peer it sent to in the last batch is saturated (the kernel queue then drops and TCP backs off).
 */
import { DropCounters } from "./drop.js";
import { FrameEncoder, decodeFrame, decrementTtl, nodeIdToBytes, peekFrameHeader, DEFAULT_MAX_MESSAGE_SIZE } from "./frame.js";
import { peekIp } from "./ip.js";
import type { RouteTable } from "./route.js";
import { VNET_HDR_LEN } from "./vnet.js";

export interface ForwarderPorts {
  selfId: string;
  /** prefix -> node that owns/advertises it */
  routes: RouteTable<string>;
  /** next hop towards a node (itself when directly connected), undefined when unreachable */
  nextHop(node: string): string | undefined;
  /** queue a frame on the peer's packets channel; false when there is no link or its queue is full */
  send(peer: string, frame: Uint8Array): "ok" | "no-link" | "queue-full";
  /** write packets (vnet header + IP) to the local TUN */
  deliver(packets: Uint8Array[]): void;
  /** packets carry a virtio-net header (TUN opened with IFF_VNET_HDR) */
  vnetHdr?: boolean;
  maxMessageSize?: number;
}

export interface ForwarderStats {
  txPackets: number;
  txFrames: number;
  txBytes: number;
  rxFrames: number;
  rxPackets: number;
  rxBytes: number;
  fwdFrames: number;
  fwdBytes: number;
  perPeer: Map<string, { txBytes: number; txPackets: number; rxBytes: number; rxPackets: number }>;
}

export class Forwarder {
  readonly drops = new DropCounters();
  readonly stats: ForwarderStats = { txPackets: 0, txFrames: 0, txBytes: 0, rxFrames: 0, rxPackets: 0, rxBytes: 0, fwdFrames: 0, fwdBytes: 0, perPeer: new Map() };
  private readonly enc: FrameEncoder;
  private readonly selfBytes: Uint8Array;
  private readonly idBytes = new Map<string, Uint8Array>();
  private readonly saturated = new Set<string>();
  private lastTargets = new Set<string>();
  private readonly groups = new Map<string, Uint8Array[]>();
  private readonly hdrOff: number;
  /** per-frame decode limits, built once (fromPeer runs per message) */
  private readonly decodeOpts: { maxMessageSize: number };

  constructor(private readonly p: ForwarderPorts) {
    this.enc = new FrameEncoder({ maxMessageSize: p.maxMessageSize ?? DEFAULT_MAX_MESSAGE_SIZE });
    this.selfBytes = nodeIdToBytes(p.selfId);
    this.hdrOff = p.vnetHdr === false ? 0 : VNET_HDR_LEN;
    this.decodeOpts = { maxMessageSize: Math.max(p.maxMessageSize ?? 0, DEFAULT_MAX_MESSAGE_SIZE) };
  }

  /** A batch read from the TUN. */
  fromTun(batch: readonly Uint8Array[]): void {
    const groups = this.groups;
    groups.clear();
    for (const pkt of batch) {
      const ip = peekIp(pkt, this.hdrOff);
      if (!ip.ok) {
        this.drops.drop(ip.reason);
        continue;
      }
      const owner = this.p.routes.lookupHeader(ip);
      if (owner === undefined) {
        this.drops.drop("no-route");
        continue;
      }
      if (owner === this.p.selfId) {
        // A local block routed into the TUN (the bridge route is missing or the pod is gone).
        this.drops.drop("not-for-us");
        continue;
      }
      let g = groups.get(owner);
      if (!g) groups.set(owner, (g = []));
      g.push(pkt);
    }
    const targets = new Set<string>();
    for (const [owner, pkts] of groups) {
      const hop = this.p.nextHop(owner);
      if (hop === undefined) {
        this.drops.drop("no-link", pkts.length);
        continue;
      }
      targets.add(hop);
      this.encodeAndSend(owner, hop, pkts);
    }
    this.lastTargets = targets;
  }

  private encodeAndSend(owner: string, hop: string, pkts: Uint8Array[]): void {
    const enc = this.enc;
    const dst = this.bytesOf(owner);
    enc.begin(this.selfBytes, dst);
    let inFrame = 0;
    for (const pkt of pkts) {
      let r = enc.add(pkt);
      if (r === "full") {
        this.sendFrame(hop, owner, enc.finish()!, inFrame);
        enc.begin(this.selfBytes, dst);
        inFrame = 0;
        r = enc.add(pkt);
      }
      if (r === "ok") inFrame++;
      else this.drops.drop(r === "too-big" ? "too-big" : "malformed");
    }
    const last = enc.finish();
    if (last) this.sendFrame(hop, owner, last, inFrame);
  }

  private sendFrame(hop: string, owner: string, frame: Uint8Array, packets: number): void {
    const r = this.p.send(hop, frame);
    if (r !== "ok") {
      this.drops.drop(r, packets);
      if (r === "queue-full") this.saturated.add(hop);
      return;
    }
    this.stats.txFrames++;
    this.stats.txPackets += packets;
    this.stats.txBytes += frame.length;
    const pp = this.peer(owner);
    pp.txBytes += frame.length;
    pp.txPackets += packets;
  }

  /** A message from a peer's packets channel. */
  fromPeer(from: string, msg: Uint8Array): void {
    const h = peekFrameHeader(msg, this.decodeOpts);
    if (!h.ok) {
      this.drops.drop(h.reason);
      return;
    }
    if (h.dst === this.p.selfId) {
      const f = decodeFrame(msg);
      if (!f.ok) {
        this.drops.drop(f.reason);
        return;
      }
      this.stats.rxFrames++;
      this.stats.rxPackets += f.packets.length;
      this.stats.rxBytes += msg.length;
      const pp = this.peer(h.src);
      pp.rxBytes += msg.length;
      pp.rxPackets += f.packets.length;
      this.p.deliver(f.packets);
      return;
    }
    // Transit: forward by header only, never back to where it came from.
    const hop = this.p.nextHop(h.dst);
    if (hop === undefined || hop === from) {
      this.drops.drop("no-link");
      return;
    }
    const ttl = decrementTtl(msg);
    if (typeof ttl !== "number") {
      this.drops.drop(ttl.reason);
      return;
    }
    const r = this.p.send(hop, msg);
    if (r !== "ok") {
      this.drops.drop(r);
      if (r === "queue-full") this.saturated.add(hop);
      return;
    }
    this.stats.fwdFrames++;
    this.stats.fwdBytes += msg.length;
  }

  /** Next hops the last TUN batch was sent to. */
  get targets(): ReadonlySet<string> {
    return this.lastTargets;
  }

  drained(peer: string): void {
    this.saturated.delete(peer);
  }

  linkDown(peer: string): void {
    this.saturated.delete(peer);
  }

  /** Stop reading the TUN: every peer the last batch went to is saturated. */
  shouldPause(): boolean {
    if (this.lastTargets.size === 0) return false;
    for (const t of this.lastTargets) if (!this.saturated.has(t)) return false;
    return true;
  }

  private bytesOf(id: string): Uint8Array {
    let b = this.idBytes.get(id);
    if (!b) {
      b = nodeIdToBytes(id);
      this.idBytes.set(id, b);
    }
    return b;
  }

  private peer(id: string) {
    let s = this.stats.perPeer.get(id);
    if (!s) this.stats.perPeer.set(id, (s = { txBytes: 0, txPackets: 0, rxBytes: 0, rxPackets: 0 }));
    return s;
  }
}
