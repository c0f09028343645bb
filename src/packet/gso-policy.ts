/**
 * When to segment, per next hop (issue 11 item 1): the forwarder asks `plan(hop, packets, budget, now)`
 * for every group of TUN packets it is about to frame, and gets back the packets to frame and the largest
 * frame to build. Sans-I/O: time comes in as `now` (ms).
 *
 * Why: a GSO super-packet sent as one unordered, maxRetransmits-0 SCTP message dies with any one of its
 * ~45 chunks. Segmented to the link's one-SCTP-packet budget (gso.ts), a lost datagram costs one inner
 * packet. On a clean path the super-packet is cheaper (one message instead of ~45, and the library's
 * per-message cost is what caps the WebRTC links), so in "auto" segmentation turns on for a hop when loss
 * shows and off again after `holdMs` without any.
 *
 * How loss shows, without a protocol change: the inner TCP retransmits. A TCP data packet leaving towards
 * a hop whose sequence range starts before the highest sequence already sent on that flow is a
 * retransmission (RFC 793 arithmetic mod 2^32). We keep the highest sequence end per flow (4-tuple hash,
 * bounded table) and, per hop and per WINDOW_MS, the TCP payload bytes sent and the share of them that were
 * retransmitted. Pure ACKs and non-TCP carry no signal.
 *   - off -> on: a window with at least MIN_WINDOW_BYTES of TCP data of which >= ON_SHARE was retransmitted.
 *     Unsegmented, one lost datagram loses a ~45-datagram message, so the share is 1 - (1 - p)^45 for a
 *     datagram loss rate p: 10% is p ~ 0.25%. The bench (docs/loss.md) has unsegmented ahead at 0.1% loss
 *     (331 vs 181 Mbit/s) and far behind at 1% (18 vs 165), so the switch sits between them.
 *   - on stays on while windows show >= KEEP_SHARE retransmitted (segmented, the share is p itself), and
 *     turns off `holdMs` after the last such window (hysteresis: on at ~0.25%, off below 0.15%).
 * Our own queue-full drops also cause retransmissions; segmenting then costs only throughput we lose anyway.
 *
 * Modes: "auto" (default), "always" (every hop with a budget), "off" (never: the pre-issue-11 behaviour).
 * Hops without a budget (relay links over TCP, fakes) are never segmented.
 */
import type { PeekDrop } from "./ip.js";
import { ByteArena, PROTO_TCP, segment } from "./gso.js";
import { VNET_HDR_LEN } from "./vnet.js";

export type SegmentMode = "auto" | "always" | "off";
export const SEGMENT_MODES: readonly SegmentMode[] = ["auto", "always", "off"];

/** Frame + record + virtio header bytes around one IP packet in a data-channel message (frame.ts). */
export const FRAME_OVERHEAD_PER_PACKET = 18 + 4 + VNET_HDR_LEN;
/** auto: how long a hop stays segmented after the last retransmission seen. */
export const DEFAULT_HOLD_MS = 10_000;
/** Flows tracked for retransmission detection (the table is cleared when it grows past this). */
const MAX_FLOWS = 4096;
export const WINDOW_MS = 1000;
export const MIN_WINDOW_BYTES = 256 * 1024;
export const ON_SHARE = 0.1;
export const KEEP_SHARE = 0.0015;

interface HopState {
  windowStart: number;
  bytes: number;
  retx: number;
  /** Last window that asked for segmentation (-Infinity: never). */
  lossAt: number;
}

export interface SegmenterStats {
  /** Packets that went through segmentation (GSO super-packets and oversize TCP). */
  segmented: number;
  /** Packets produced by segmentation. */
  segments: number;
  /** TCP retransmissions seen leaving (auto's loss signal). */
  retransmits: number;
  /** Times a hop switched to segmented (auto). */
  activations: number;
}

export interface Plan {
  packets: Uint8Array[];
  /** Largest frame to build for these packets (undefined: the encoder's default). */
  frameLimit: number | undefined;
}

export class LinkSegmenter {
  readonly mode: SegmentMode;
  private readonly holdMs: number;
  private readonly arena = new ByteArena();
  private readonly out: Uint8Array[] = [];
  /** flow hash -> highest sequence end sent */
  private readonly flows = new Map<number, number>();
  private readonly hops = new Map<string, HopState>();
  /** noteRetransmits' output: TCP payload bytes and retransmitted bytes of the batch */
  private tcpBytes = 0;
  private retxBytes = 0;
  readonly stats: SegmenterStats = { segmented: 0, segments: 0, retransmits: 0, activations: 0 };

  constructor(opts: { mode?: SegmentMode; holdMs?: number } = {}) {
    this.mode = opts.mode ?? "auto";
    this.holdMs = opts.holdMs ?? DEFAULT_HOLD_MS;
  }

  /** Is `hop` segmented at `now`? */
  active(hop: string, now: number): boolean {
    if (this.mode === "always") return true;
    if (this.mode === "off") return false;
    const h = this.hops.get(hop);
    return h !== undefined && now - h.lossAt < this.holdMs;
  }

  /** Count the batch into the hop's window; at the window's end decide (see the header). */
  private observe(hop: string, pkts: Uint8Array[], now: number): void {
    let h = this.hops.get(hop);
    if (!h) this.hops.set(hop, (h = { windowStart: now, bytes: 0, retx: 0, lossAt: -Infinity }));
    this.noteRetransmits(pkts);
    h.bytes += this.tcpBytes;
    h.retx += this.retxBytes;
    if (now - h.windowStart < WINDOW_MS) return;
    const on = now - h.lossAt < this.holdMs;
    const share = h.bytes > 0 ? h.retx / h.bytes : 0;
    if (on ? share >= KEEP_SHARE && h.retx > 0 : share >= ON_SHARE && h.bytes >= MIN_WINDOW_BYTES) {
      if (!on) this.stats.activations++;
      h.lossAt = now;
    }
    h.windowStart = now;
    h.bytes = 0;
    h.retx = 0;
  }

  /**
   * Packets for `hop` (vnet header + IP each), as they should be framed. `budget`: the bytes of one message
   * that fit one SCTP packet on the hop's link (undefined: no segmentation). The returned array and the
   * segments in it are valid until the next plan() or release(). onDrop: packets segmentation rejected.
   * `force`: segment to the budget whatever the mode and the loss seen: the link cannot carry a larger
   * message at all (a frame sealed end to end on the bulk link travels whole in one datagram).
   */
  plan(hop: string, pkts: Uint8Array[], budget: number | undefined, now: number, onDrop?: (d: PeekDrop) => void, force = false): Plan {
    if (budget === undefined || (this.mode === "off" && !force)) return { packets: pkts, frameLimit: undefined };
    if (this.mode === "auto" && !force) {
      this.observe(hop, pkts, now);
      if (!this.active(hop, now)) return { packets: pkts, frameLimit: undefined };
    }
    const maxIp = budget - FRAME_OVERHEAD_PER_PACKET;
    const out = this.out;
    out.length = 0;
    for (let i = 0; i < pkts.length; i++) {
      const p = pkts[i]!;
      const gso = p.length >= VNET_HDR_LEN && p[1] !== 0;
      if (!gso && p.length - VNET_HDR_LEN <= maxIp) {
        out.push(p);
        continue;
      }
      const before = out.length;
      const d = segment(p, { maxIp }, this.arena, out);
      if (d) onDrop?.(d);
      else if (out.length - before > 1 || out[before] !== p) {
        this.stats.segmented++;
        this.stats.segments += out.length - before;
      }
    }
    return { packets: out, frameLimit: budget };
  }

  /** The caller has sent everything plan() returned: segment memory is reused from here on. */
  release(): void {
    this.arena.reset();
    this.out.length = 0;
  }

  /** Record each TCP data packet's sequence end per flow; sets tcpBytes and retxBytes for the batch. */
  private noteRetransmits(pkts: Uint8Array[]): void {
    let bytes = 0;
    let retx = 0;
    for (let i = 0; i < pkts.length; i++) {
      const p = pkts[i]!;
      const ip = VNET_HDR_LEN;
      if (p.length < ip + 40) continue;
      const v = p[ip]! >> 4;
      let t: number;
      let payload: number;
      if (v === 4) {
        if (p[ip + 9] !== PROTO_TCP) continue;
        t = ip + (p[ip]! & 0x0f) * 4;
      } else if (v === 6) {
        if (p[ip + 6] !== PROTO_TCP) continue;
        t = ip + 40;
      } else continue;
      if (t + 20 > p.length) continue;
      payload = p.length - t - (p[t + 12]! >> 4) * 4;
      if (payload <= 0) continue;
      bytes += payload;
      // flow hash: addresses + ports
      let h = 0x811c9dc5;
      const a0 = v === 4 ? ip + 12 : ip + 8;
      for (let k = a0; k < ip + (v === 4 ? 20 : 40); k++) h = Math.imul(h ^ p[k]!, 0x01000193);
      for (let k = t; k < t + 4; k++) h = Math.imul(h ^ p[k]!, 0x01000193);
      const seq = ((p[t + 4]! << 24) | (p[t + 5]! << 16) | (p[t + 6]! << 8) | p[t + 7]!) >>> 0;
      const end = (seq + payload) >>> 0;
      const hi = this.flows.get(h);
      if (hi === undefined) {
        if (this.flows.size >= MAX_FLOWS) this.flows.clear();
        this.flows.set(h, end);
        continue;
      }
      if (((seq - hi) | 0) < 0) {
        this.stats.retransmits++;
        retx += payload;
      }
      if (((end - hi) | 0) > 0) this.flows.set(h, end);
    }
    this.tcpBytes = bytes;
    this.retxBytes = retx;
  }
}
