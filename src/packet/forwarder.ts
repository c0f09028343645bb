/**
 * The data path, sans-I/O: packets from the TUN go out as frames to a next hop; frames from peers are
 * either delivered to the TUN (we are the destination) or forwarded (transit, header-only, TTL spent).
 *
 *   TUN batch ──peek dst IP──▶ route table (prefix → owner node) ──▶ nextHop(owner) ──▶ coalesce per
 *   owner into frames (src=self, dst=owner) ──▶ send(nextHop, frame)            [flush at batch end]
 *
 *   frame from peer ──peek header──▶ dst == self ? decode + deliver(packets) : ttl-1, send(nextHop(dst))
 *
 * Every packet or frame that goes nowhere is counted under a typed DropReason.
 *
 * Backpressure, one policy (the only one: the driver has no timer of its own). `send` returns a typed
 * SendResult (src/mesh/transport.ts):
 *   ok       sent
 *   full     the link's queue is full: the peer is *saturated* until `drained(peer)`; the refused frame and
 *            any later ones for that peer wait in a per-peer hold buffer (`holdBytes`, default 1 MiB, copied:
 *            frames are borrowed) that `drained` flushes in order. Only what does not fit there is dropped
 *            (`queue-full`).
 *   too-big  a counted drop (`too-big`); the peer is NOT saturated (no drain would ever come for it)
 *   closed   a counted drop (`no-link`)
 * Watermarks: after each TUN batch, a peer whose queue (`queued(peer)`) is at or above `highWater` (default
 * QUEUE_HIGH) is *above high water* until its next `drained(peer)` (links report the fall back to their
 * low-water mark). `shouldPause()` tells the driver to stop reading the TUN while every peer the last
 * batch went to is saturated or above high water: the packets then wait in the kernel's TUN queue, whose
 * tail drop is what TCP backs off from, instead of filling the link's queue until whole 64 KB GSO frames
 * are refused. `drained(peer)` and `linkDown(peer)` are the driver's cues to check `shouldPause()` again.
 */
import { DropCounters } from "./drop.js";
import { FrameEncoder, decodeFrame, decrementTtl, nodeIdToBytes, peekFrameHeader, DEFAULT_MAX_MESSAGE_SIZE } from "./frame.js";
import { peekIp, type IpHeader } from "./ip.js";
import { FLAG_SEALED, SEAL_OVERHEAD, type FrameSealer } from "./seal.js";
import type { SendResult } from "../mesh/transport.js";
import type { PrefixTable } from "./prefix-table.js";
import { VNET_HDR_LEN } from "./vnet.js";
import { LinkSegmenter, type SegmentMode } from "./gso-policy.js";

export interface ForwarderPorts {
  selfId: string;
  /** prefix -> node that owns/advertises it */
  routes: PrefixTable<string>;
  /** next hop towards a node (itself when directly connected), undefined when unreachable */
  nextHop(node: string): string | undefined;
  /** queue a frame on the peer's data link (see the header for what each result does) */
  send(peer: string, frame: Uint8Array): SendResult;
  /** bytes queued on the peer's data link (the high-water check); absent: no watermark pause */
  queued?(peer: string): number;
  /** queued(peer) at or above this pauses the TUN (see the header). Default QUEUE_HIGH. */
  highWater?: number;
  /**
   * send() is done with the frame when it returns (it copied or transmitted the bytes, as TransportLink
   * promises): frames are then built in one reused buffer instead of fresh slabs. Default false.
   */
  sendBorrows?: boolean;
  /** write packets (vnet header + IP) to the local TUN */
  deliver(packets: Uint8Array[]): void;
  /** packets carry a virtio-net header (TUN opened with IFF_VNET_HDR) */
  vnetHdr?: boolean;
  maxMessageSize?: number;
  /** Bytes of frames held per saturated peer until it drains (0: drop at once). Default HOLD_BYTES. */
  holdBytes?: number;
  /**
   * Bytes of one message that fit one SCTP packet on the link to `peer` (undefined: the link does not lose
   * messages, or it is unknown). With it, GSO super-packets are segmented to fit (gso-policy.ts).
   */
  linkBudget?(peer: string): number | undefined;
  /**
   * The largest frame sealed end to end that the link to `peer` carries whole (the bulk link: one datagram
   * of its confirmed path MTU, BulkService.sealedBudget); undefined: no such limit (the mesh link, sized by
   * linkBudget). Sealed frames for such a hop are always segmented and packed to fit, whatever the
   * segmentation mode, so every frame of a flow through a transit takes the same link.
   */
  sealedBudget?(peer: string): number | undefined;
  /** Software segmentation towards lossy links: "auto" (default), "always", "off" (gso-policy.ts). */
  segment?: SegmentMode;
  /** Clock (ms) for the segmentation policy; default 0 (then "auto" never expires). */
  now?(): number;
  /**
   * Cryptokey routing (WireGuard's allowed IPs): address -> the node allowed to use it (every node's IPAM
   * blocks, our advertised routes, routes we accepted from others; ours included). When set, a packet read
   * from the TUN must have a source of ours, and a packet from a peer a source of its frame's source node
   * and a destination of ours; anything else is dropped (`spoofed-source`, `foreign-destination`).
   */
  sources?: PrefixTable<string>;
  /**
   * End-to-end sealing of frames sent through a transit node (seal.ts). When set, frames whose next hop is
   * not their destination are sealed for it, and a frame whose source node is not the link peer is
   * accepted (delivered or forwarded) only sealed, and delivered only when it opens (`spoofed-node`,
   * `bad-seal`, `replayed`). Without it the source node of such frames is unchecked.
   */
  sealer?: FrameSealer;
}

/** Default per-peer hold buffer: a few read batches' worth (see the header). */
export const HOLD_BYTES = 1 << 20;
/** Default high-water mark of a peer's data-link queue (see the header). */
export const QUEUE_HIGH = 128 * 1024;

/** Frames refused by a saturated link, in order, copied into one buffer that is reset when emptied. */
class HoldQueue {
  private buf: Uint8Array | undefined;
  private used = 0;
  private readonly frames: { off: number; len: number; packets: number; owner: string | undefined }[] = [];
  private head = 0;
  constructor(private readonly cap: number) {}
  get empty(): boolean {
    return this.head === this.frames.length;
  }
  push(frame: Uint8Array, packets: number, owner: string | undefined): boolean {
    if (this.used + frame.length > this.cap) return false;
    this.buf ??= new Uint8Array(this.cap);
    this.buf.set(frame, this.used);
    this.frames.push({ off: this.used, len: frame.length, packets, owner });
    this.used += frame.length;
    return true;
  }
  peek(): { frame: Uint8Array; packets: number; owner: string | undefined } | undefined {
    const f = this.frames[this.head];
    return f && { frame: this.buf!.subarray(f.off, f.off + f.len), packets: f.packets, owner: f.owner };
  }
  shift(): void {
    if (++this.head === this.frames.length) this.clear();
  }
  /** Drop everything; returns [frames, packets] dropped. */
  clear(): [number, number] {
    let packets = 0;
    for (let i = this.head; i < this.frames.length; i++) packets += this.frames[i]!.packets;
    const n = this.frames.length - this.head;
    this.frames.length = 0;
    this.head = 0;
    this.used = 0;
    return [n, packets];
  }
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

/** fromTun's targets when a batch sent nothing (shared, never changed) */
const NO_TARGETS: ReadonlySet<string> = new Set<string>();

export class Forwarder {
  readonly drops = new DropCounters();
  readonly stats: ForwarderStats = { txPackets: 0, txFrames: 0, txBytes: 0, rxFrames: 0, rxPackets: 0, rxBytes: 0, fwdFrames: 0, fwdBytes: 0, perPeer: new Map() };
  private readonly enc: FrameEncoder;
  /** Software segmentation of GSO super-packets towards lossy links (issue 11). */
  readonly segmenter: LinkSegmenter;
  private readonly selfBytes: Uint8Array;
  private readonly idBytes = new Map<string, Uint8Array>();
  private readonly saturated = new Set<string>();
  /** peers whose queue was at or above high water after a batch, until their next drain */
  private readonly aboveHigh = new Set<string>();
  private readonly highWater: number;
  private lastTargets: ReadonlySet<string> = NO_TARGETS;
  private readonly groups = new Map<string, Uint8Array[]>();
  private readonly held = new Map<string, HoldQueue>();
  private readonly holdBytes: number;
  private readonly hdrOff: number;
  /** per-frame decode limits, built once (fromPeer runs per message) */
  private readonly decodeOpts: { maxMessageSize: number };

  constructor(private readonly p: ForwarderPorts) {
    this.enc = new FrameEncoder({ maxMessageSize: p.maxMessageSize ?? DEFAULT_MAX_MESSAGE_SIZE, reuse: p.sendBorrows === true });
    this.selfBytes = nodeIdToBytes(p.selfId);
    this.hdrOff = p.vnetHdr === false ? 0 : VNET_HDR_LEN;
    this.holdBytes = Math.max(0, p.holdBytes ?? HOLD_BYTES);
    this.highWater = p.highWater ?? QUEUE_HIGH;
    this.decodeOpts = { maxMessageSize: Math.max(p.maxMessageSize ?? 0, DEFAULT_MAX_MESSAGE_SIZE) + SEAL_OVERHEAD };
    this.segmenter = new LinkSegmenter({ mode: p.segment ?? "auto" });
  }

  /** A batch read from the TUN. */
  fromTun(batch: readonly Uint8Array[]): void {
    // Nearly every batch goes to one node: its packets collect in a reused array, and the map (whose clear()
    // is a runtime call) is only used from a second destination on.
    let first: string | undefined;
    const firstPkts = this.firstPkts;
    firstPkts.length = 0;
    let groups: Map<string, Uint8Array[]> | undefined;
    for (const pkt of batch) {
      const ip = peekIp(pkt, this.hdrOff);
      if (!ip.ok) {
        this.drops.drop(ip.reason);
        continue;
      }
      // Only our own addresses (blocks, advertised routes) may leave through the mesh.
      if (this.p.sources && srcOwner(this.p.sources, ip) !== this.p.selfId) {
        this.drops.drop("spoofed-source");
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
      if (first === undefined || owner === first) {
        first = owner;
        firstPkts.push(pkt);
        continue;
      }
      if (!groups) {
        groups = this.groups;
        if (groups.size) groups.clear();
      }
      let g = groups.get(owner);
      if (!g) groups.set(owner, (g = []));
      g.push(pkt);
    }
    if (first === undefined) {
      this.lastTargets = NO_TARGETS;
      return;
    }
    const targets: string[] = [];
    const hop = this.p.nextHop(first);
    if (hop === undefined) this.drops.drop("no-link", firstPkts.length);
    else {
      targets.push(hop);
      this.encodeAndSend(first, hop, firstPkts);
    }
    if (groups) {
      for (const [owner, pkts] of groups) {
        const h = this.p.nextHop(owner);
        if (h === undefined) {
          this.drops.drop("no-link", pkts.length);
          continue;
        }
        if (!targets.includes(h)) targets.push(h);
        this.encodeAndSend(owner, h, pkts);
      }
      groups.clear();
    }
    firstPkts.length = 0;
    // The same single next hop as last time (the steady state): keep the set instead of building one.
    const last = this.lastTargets;
    if (!(targets.length === 1 && last.size === 1 && last.has(targets[0]!))) this.lastTargets = new Set(targets);
    const queued = this.p.queued;
    if (queued) for (const t of targets) if (queued(t) >= this.highWater) this.aboveHigh.add(t);
  }
  private readonly firstPkts: Uint8Array[] = [];

  private encodeAndSend(owner: string, hop: string, batch: Uint8Array[]): void {
    const enc = this.enc;
    const dst = this.bytesOf(owner);
    const sealFor = hop !== owner && this.p.sealer ? this.p.sealer : undefined;
    // A sealed frame is SEAL_OVERHEAD longer: leave room for it in the link's per-message budget. A link
    // that carries sealed frames only whole and small (the bulk link) gets them sized to fit, always.
    const hard = sealFor ? this.p.sealedBudget?.(hop) : undefined;
    const budget = hard ?? this.p.linkBudget?.(hop);
    const plan = this.segmenter.plan(hop, batch, budget !== undefined && sealFor ? budget - SEAL_OVERHEAD : budget, this.p.now?.() ?? 0, (d) => this.drops.drop(d.reason), hard !== undefined);
    const pkts = plan.packets;
    const limit = plan.frameLimit;
    enc.begin(this.selfBytes, dst, undefined, limit);
    let inFrame = 0;
    for (const pkt of pkts) {
      let r = enc.add(pkt);
      if (r === "full") {
        this.send1(sealFor, hop, owner, enc.finish()!, inFrame);
        enc.begin(this.selfBytes, dst, undefined, limit);
        inFrame = 0;
        r = enc.add(pkt);
      }
      if (r === "ok") inFrame++;
      else this.drops.drop(r === "too-big" ? "too-big" : "malformed");
    }
    const last = enc.finish();
    if (last) this.send1(sealFor, hop, owner, last, inFrame);
    this.segmenter.release(); // every segment is in a sent or held (copied) frame now
  }

  /** Transmit one frame; sealed for its destination when it goes through a transit node. */
  private send1(sealFor: FrameSealer | undefined, hop: string, owner: string, frame: Uint8Array, packets: number): void {
    if (!sealFor) return this.transmit(hop, owner, frame, packets);
    const sealed = sealFor.seal(owner, frame);
    if (!sealed) return this.drops.drop("no-key", packets);
    this.transmit(hop, owner, sealed, packets);
  }

  /**
   * Send a frame towards `hop`, or hold it behind frames already waiting for that peer. `owner`: the
   * destination node for per-peer stats (undefined for transit frames, counted as forwarded).
   */
  private transmit(hop: string, owner: string | undefined, frame: Uint8Array, packets: number): void {
    const q = this.held.get(hop);
    if (q && !q.empty) {
      this.hold(q, owner, frame, packets);
      return;
    }
    const r = this.p.send(hop, frame);
    if (r === "ok") {
      this.sent(owner, frame.length, packets);
      return;
    }
    if (r === "full") {
      this.saturated.add(hop);
      let hq = q;
      if (!hq && this.holdBytes > 0) this.held.set(hop, (hq = new HoldQueue(this.holdBytes)));
      if (hq) this.hold(hq, owner, frame, packets);
      else this.drops.drop("queue-full", packets);
      return;
    }
    this.drops.drop(r === "too-big" ? "too-big" : "no-link", packets);
  }

  /** Queue behind the peer's held frames (the peer is saturated while any wait). */
  private hold(q: HoldQueue, owner: string | undefined, frame: Uint8Array, packets: number): void {
    if (!q.push(frame, packets, owner)) this.drops.drop("queue-full", packets);
  }

  private sent(owner: string | undefined, bytes: number, packets: number): void {
    if (owner === undefined) {
      this.stats.fwdFrames++;
      this.stats.fwdBytes += bytes;
      return;
    }
    this.stats.txFrames++;
    this.stats.txPackets += packets;
    this.stats.txBytes += bytes;
    const pp = this.peer(owner);
    pp.txBytes += bytes;
    pp.txPackets += packets;
  }

  /** A message from a peer's packets channel. */
  fromPeer(from: string, msg: Uint8Array): void {
    const h = peekFrameHeader(msg, this.decodeOpts);
    if (!h.ok) {
      this.drops.drop(h.reason);
      return;
    }
    const sealed = (h.flags & FLAG_SEALED) !== 0;
    // A frame names its source node; only the link peer may send unsealed frames (the link authenticated
    // it). A frame from further away must be sealed by its source (a transit can neither forge nor read it).
    if (h.src !== from && !sealed && this.p.sealer) {
      this.drops.drop("spoofed-node");
      return;
    }
    if (h.dst === this.p.selfId) {
      let plain = msg;
      if (sealed) {
        if (!this.p.sealer) {
          this.drops.drop("bad-seal");
          return;
        }
        const o = this.p.sealer.open(h.src, msg);
        if (!o.ok) {
          this.drops.drop(o.reason);
          return;
        }
        plain = o.frame;
      }
      const f = decodeFrame(plain);
      if (!f.ok) {
        this.drops.drop(f.reason);
        return;
      }
      const pkts = this.p.sources ? this.checkInner(h.src, f.packets) : f.packets;
      this.stats.rxFrames++;
      this.stats.rxPackets += f.packets.length;
      this.stats.rxBytes += msg.length;
      const pp = this.peer(h.src);
      pp.rxBytes += msg.length;
      pp.rxPackets += f.packets.length;
      if (pkts.length) this.p.deliver(pkts);
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
    this.transmit(hop, undefined, msg, 1);
  }

  /** Packets of a frame from `src` whose inner source is src's and inner destination ours; the rest is dropped. */
  private checkInner(src: string, pkts: Uint8Array[]): Uint8Array[] {
    const t = this.p.sources!;
    let out: Uint8Array[] | undefined;
    for (let i = 0; i < pkts.length; i++) {
      const ip = peekIp(pkts[i]!, VNET_HDR_LEN); // decodeFrame validated it
      const bad = !ip.ok ? "malformed" : srcOwner(t, ip) !== src ? "spoofed-source" : t.lookupHeader(ip) !== this.p.selfId ? "foreign-destination" : undefined;
      if (bad) {
        this.drops.drop(bad);
        out ??= pkts.slice(0, i);
      } else out?.push(pkts[i]!);
    }
    return out ?? pkts;
  }

  /** Next hops the last TUN batch was sent to. */
  get targets(): ReadonlySet<string> {
    return this.lastTargets;
  }

  /** The peer's link can take more: send what waits for it, in order, until it is full again. */
  drained(peer: string): void {
    this.aboveHigh.delete(peer);
    const q = this.held.get(peer);
    while (q && !q.empty) {
      const f = q.peek()!;
      const r = this.p.send(peer, f.frame);
      if (r === "full") return; // still saturated; the next drain continues
      if (r === "closed") {
        this.linkDown(peer);
        return;
      }
      if (r === "ok") this.sent(f.owner, f.frame.length, f.packets);
      else this.drops.drop("too-big", f.packets); // the link changed under the held frame (a smaller max message size)
      q.shift();
    }
    this.saturated.delete(peer);
  }

  /** The link to `peer` is gone: what waited for it is dropped (`no-link`). */
  linkDown(peer: string): void {
    const q = this.held.get(peer);
    if (q) {
      const [, packets] = q.clear();
      if (packets) this.drops.drop("no-link", packets);
    }
    this.saturated.delete(peer);
    this.aboveHigh.delete(peer);
  }

  /** Frames waiting for `peer` to drain (tests, status). */
  heldFor(peer: string): boolean {
    return !(this.held.get(peer)?.empty ?? true);
  }

  /** Stop reading the TUN: every peer the last batch went to is saturated or above high water. */
  shouldPause(): boolean {
    if (this.lastTargets.size === 0) return false;
    for (const t of this.lastTargets) if (!this.saturated.has(t) && !this.aboveHigh.has(t)) return false;
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

function srcOwner(t: PrefixTable<string>, ip: IpHeader): string | undefined {
  return ip.version === 4 ? t.lookup4(ip.src) : t.lookup6(ip.src);
}
