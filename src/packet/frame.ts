/**
 * The data-channel frame: what one message on a link's `packets` channel carries. One frame = one or more
 * pod IP packets (each with its virtio-net header) travelling from one node to another, possibly through
 * transit nodes that read only the fixed header.
 *
 * Layout (all multi-byte integers big-endian; sizes in bytes):
 *
 *   offset size  field
 *   0      1     version (high nibble, FRAME_VERSION = 1) | flags (low nibble; none defined yet: senders
 *                write 0, receivers ignore them. A change that alters the layout bumps the version.)
 *                Version 15 (first byte 0xF0) is taken: the links' path MTU probes (agent/transport/
 *                link-base.ts), which a link consumes itself and never hands to the forwarder.
 *   1      1     ttl: hops left. The sender writes DEFAULT_TTL (8). A transit node calls decrementTtl(),
 *                which drops the frame (`ttl-expired`) when ttl <= 1 and otherwise decrements the byte in
 *                place, so forwarding never re-encodes the payload. The destination ignores it.
 *   2      8     source node id: the 16 lowercase hex chars of the node id as 8 raw bytes
 *   10     8     destination node id, same form
 *   18     ...   one or more packet records, back to back, filling the message exactly:
 *                  +0  4    length L (u32): VNET_HDR_LEN + 1 <= L <= MAX_VNET_PACKET (65585)
 *                  +4  L    virtio_net_hdr (10 bytes, little-endian as in vnet.ts) + the IP packet
 *
 * Why a u32 length: a GSO super-packet is up to 65535 bytes of IPv4 (65575 of IPv6) plus the 10-byte
 * virtio header, which overflows a u16; a u32 costs 2 bytes per record more than a u24 and keeps the
 * layout obvious. The 18-byte header + 4 bytes per record is ~0.03% of a 64 KB GSO frame.
 *
 * Coalescing: FrameEncoder packs packets for one (source, destination) pair into frames no larger than
 * the link's max message size; the agent flushes at the end of every TUN read batch (never on a timer).
 * Frames are written into a slab that is reused until full and never overwritten, so a returned frame
 * (a subarray of the slab) stays valid for as long as the caller holds it: it can be queued by a
 * transport without copying. A 1 MiB slab holds ~16 GSO frames or ~700 MTU-sized packets.
 * With `reuse` (the agent's data plane: transport links copy or transmit inside send(), see TransportLink)
 * every frame is written into the same buffer instead: at 40 MB/s a fresh 1 MiB slab every 25 ms made V8
 * run a full mark-compact several times a second (external backing stores count towards its heap limit).
 *
 * Decoding validates everything (a peer may send garbage) and returns a typed drop instead of throwing:
 * structure (lengths fill the message exactly), each virtio header (validateVnetPacket) and each IP header
 * (peekIp; total length must equal the record's IP bytes). One bad record rejects the whole frame: it came
 * from a broken or hostile peer, and record boundaries after a bad length cannot be trusted.
 */
import { ProtocolError } from "../errors.js";
import type { DropReason } from "./drop.js";
import { peekIp, type PeekDrop } from "./ip.js";
import { MAX_VNET_PACKET, VNET_HDR_LEN, validateVnetPacket } from "./vnet.js";

export const FRAME_VERSION = 1;
export const FRAME_HEADER_LEN = 18;
export const RECORD_HEADER_LEN = 4;
export const DEFAULT_TTL = 8;
/** Smallest record: a virtio header and one byte (the decoder then demands a valid IP header). */
export const MIN_RECORD_LEN = VNET_HDR_LEN + 1;
/** A frame carrying one maximal GSO packet. A link whose max message size is below this cannot carry GSO. */
export const MAX_SINGLE_PACKET_FRAME = FRAME_HEADER_LEN + RECORD_HEADER_LEN + MAX_VNET_PACKET;
/** Default coalescing limit: one maximal GSO packet, or many small packets up to the same size. */
export const DEFAULT_MAX_MESSAGE_SIZE = MAX_SINGLE_PACKET_FRAME;

const OFF_VF = 0;
const OFF_TTL = 1;
const OFF_SRC = 2;
const OFF_DST = 10;

export interface FrameHeader {
  readonly ok: true;
  readonly version: number;
  readonly flags: number;
  readonly ttl: number;
  readonly src: string;
  readonly dst: string;
}

export interface Frame extends FrameHeader {
  /** vnet header + IP packet each; subarrays of the message (no copies). */
  readonly packets: Uint8Array[];
}

export type FrameResult = Frame | PeekDrop;
export type FrameHeaderResult = FrameHeader | PeekDrop;

function drop(reason: DropReason, detail: string): PeekDrop {
  return Object.freeze({ ok: false, reason, detail });
}

export const FRAME_DROPS = {
  short: drop("malformed", "frame shorter than its header and one record"),
  tooBig: drop("too-big", "frame exceeds the max message size"),
  version: drop("bad-version", "frame version is not supported"),
  ttl: drop("ttl-expired", "frame ttl ran out"),
  recordHeader: drop("malformed", "frame ends inside a record length"),
  recordLen: drop("malformed", "frame record length out of range"),
  recordTrunc: drop("malformed", "frame record runs past the end of the message"),
  ipLen: drop("malformed", "IP total length does not match the record length"),
} as const;

// ---- node ids ------------------------------------------------------------------------------------

const NODE_ID_RE = /^[0-9a-f]{16}$/;
const HEX: string[] = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));

export function isNodeId(id: string): boolean {
  return NODE_ID_RE.test(id);
}

/** "0123456789abcdef" -> 8 bytes. Throws ProtocolError(ERR_INVALID) for anything but 16 lowercase hex chars. */
export function nodeIdToBytes(id: string): Uint8Array {
  if (!NODE_ID_RE.test(id)) throw new ProtocolError("ERR_INVALID", `node id must be 16 lowercase hex chars, got ${JSON.stringify(id)}`);
  const out = new Uint8Array(8);
  for (let i = 0; i < 8; i++) out[i] = parseInt(id.slice(i * 2, i * 2 + 2), 16);
  return out;
}

/** the two hex digits of each byte value, as char codes */
const HEX_HI = Uint8Array.from({ length: 256 }, (_, i) => HEX[i]!.charCodeAt(0));
const HEX_LO = Uint8Array.from({ length: 256 }, (_, i) => HEX[i]!.charCodeAt(1));
/**
 * Node ids read from frames, direct-mapped by their last byte: every frame names two of a handful of nodes,
 * so the hot path returns the same flat string each time instead of building one (eight concatenations,
 * a cons string that each comparison then has to flatten: ~5% of a packet's CPU on the receive path).
 */
const ID_CACHE_SIZE = 64;
const idCacheBytes = new Uint8Array(ID_CACHE_SIZE * 8);
const idCacheStr: (string | undefined)[] = new Array<string | undefined>(ID_CACHE_SIZE).fill(undefined);

export function nodeIdFromBytes(b: Uint8Array, offset = 0): string {
  const slot = b[offset + 7]! & (ID_CACHE_SIZE - 1);
  const c = slot * 8;
  const hit = idCacheStr[slot];
  if (
    hit !== undefined &&
    idCacheBytes[c] === b[offset] && idCacheBytes[c + 1] === b[offset + 1] && idCacheBytes[c + 2] === b[offset + 2] && idCacheBytes[c + 3] === b[offset + 3] &&
    idCacheBytes[c + 4] === b[offset + 4] && idCacheBytes[c + 5] === b[offset + 5] && idCacheBytes[c + 6] === b[offset + 6] && idCacheBytes[c + 7] === b[offset + 7]
  )
    return hit;
  const b0 = b[offset]!, b1 = b[offset + 1]!, b2 = b[offset + 2]!, b3 = b[offset + 3]!;
  const b4 = b[offset + 4]!, b5 = b[offset + 5]!, b6 = b[offset + 6]!, b7 = b[offset + 7]!;
  const id = String.fromCharCode(
    HEX_HI[b0]!, HEX_LO[b0]!, HEX_HI[b1]!, HEX_LO[b1]!, HEX_HI[b2]!, HEX_LO[b2]!, HEX_HI[b3]!, HEX_LO[b3]!,
    HEX_HI[b4]!, HEX_LO[b4]!, HEX_HI[b5]!, HEX_LO[b5]!, HEX_HI[b6]!, HEX_LO[b6]!, HEX_HI[b7]!, HEX_LO[b7]!,
  );
  idCacheBytes[c] = b0;
  idCacheBytes[c + 1] = b1;
  idCacheBytes[c + 2] = b2;
  idCacheBytes[c + 3] = b3;
  idCacheBytes[c + 4] = b4;
  idCacheBytes[c + 5] = b5;
  idCacheBytes[c + 6] = b6;
  idCacheBytes[c + 7] = b7;
  idCacheStr[slot] = id;
  return id;
}

// ---- encoding ------------------------------------------------------------------------------------

export type AddResult = "ok" | "full" | "too-big" | "malformed";

export interface FrameEncoderOptions {
  /** Largest message the link accepts (SCTP max-message-size). Default DEFAULT_MAX_MESSAGE_SIZE. */
  maxMessageSize?: number;
  /** Slab size; at least maxMessageSize. Default 1 MiB. */
  slabSize?: number;
  /**
   * The caller is done with a frame before the next begin() (its transport copies or transmits the bytes
   * inside send()): every frame is written at the start of one buffer that is reused, so the hot path
   * allocates nothing. Default false: frames stay valid for as long as they are held (see the header).
   */
  reuse?: boolean;
}

/**
 * Builds frames for one (source, destination) at a time into a reusable slab.
 *
 *   enc.begin(src, dst)
 *   for (const p of batch) {
 *     let r = enc.add(p)
 *     if (r === "full") { send(enc.finish()!); enc.begin(src, dst); r = enc.add(p) }
 *     if (r !== "ok") count drop r (too-big / malformed)
 *   }
 *   const last = enc.finish(); if (last) send(last)
 */
export class FrameEncoder {
  readonly maxMessageSize: number;
  private readonly slabSize: number;
  private slab: Uint8Array;
  private start = 0;
  private pos = 0;
  private open = false;
  private count = 0;
  private limit: number;
  private readonly reuse: boolean;

  constructor(opts: FrameEncoderOptions = {}) {
    const max = opts.maxMessageSize ?? DEFAULT_MAX_MESSAGE_SIZE;
    if (!Number.isInteger(max) || max < FRAME_HEADER_LEN + RECORD_HEADER_LEN + MIN_RECORD_LEN) {
      throw new ProtocolError("ERR_INVALID", `maxMessageSize ${max} cannot hold a single packet`);
    }
    this.maxMessageSize = max;
    this.limit = max;
    this.reuse = opts.reuse === true;
    this.slabSize = this.reuse ? max : Math.max(opts.slabSize ?? 1 << 20, max);
    this.slab = allocSlab(this.slabSize);
  }

  /**
   * Start a frame. src/dst: 8-byte node ids (nodeIdToBytes, computed once per peer, not per packet).
   * limit: a smaller max size for this frame only (e.g. one SCTP packet of a lossy link, gso-policy.ts).
   */
  begin(src: Uint8Array, dst: Uint8Array, ttl = DEFAULT_TTL, limit?: number): void {
    if (src.length !== 8 || dst.length !== 8) throw new ProtocolError("ERR_INVALID", "node ids must be 8 bytes");
    if (!Number.isInteger(ttl) || ttl < 1 || ttl > 255) throw new ProtocolError("ERR_INVALID", `ttl ${ttl} out of range 1..255`);
    if (this.reuse) this.pos = 0; // the previous frame has been consumed
    else if (this.slab.length - this.pos < this.maxMessageSize) {
      this.slab = allocSlab(this.slabSize); // the old slab lives on in frames already handed out
      this.pos = 0;
    }
    const s = this.slab;
    const o = this.pos;
    this.start = o;
    s[o + OFF_VF] = FRAME_VERSION << 4;
    s[o + OFF_TTL] = ttl;
    s.set(src, o + OFF_SRC);
    s.set(dst, o + OFF_DST);
    this.pos = o + FRAME_HEADER_LEN;
    this.limit = limit !== undefined && limit < this.maxMessageSize ? limit : this.maxMessageSize;
    this.open = true;
    this.count = 0;
  }

  /** Append one packet (vnet header + IP). "full": finish this frame, begin another, add again. */
  add(pkt: Uint8Array): AddResult {
    if (!this.open) throw new ProtocolError("ERR_INVALID", "FrameEncoder.add before begin");
    const n = pkt.length;
    if (n < MIN_RECORD_LEN) return "malformed";
    if (n > MAX_VNET_PACKET || FRAME_HEADER_LEN + RECORD_HEADER_LEN + n > this.maxMessageSize) return "too-big";
    // The per-frame limit is a packing target: a packet larger than it travels alone in its frame.
    if (this.pos - this.start + RECORD_HEADER_LEN + n > this.limit && this.count > 0) return "full";
    const s = this.slab;
    const o = this.pos;
    s[o] = n >>> 24;
    s[o + 1] = (n >>> 16) & 0xff;
    s[o + 2] = (n >>> 8) & 0xff;
    s[o + 3] = n & 0xff;
    s.set(pkt, o + RECORD_HEADER_LEN);
    this.pos = o + RECORD_HEADER_LEN + n;
    this.count++;
    return "ok";
  }

  /** Packets in the open frame. */
  get packets(): number {
    return this.count;
  }

  /** Bytes in the open frame so far (header included). */
  get size(): number {
    return this.open ? this.pos - this.start : 0;
  }

  /** Close the frame: its bytes, or undefined when it holds no packet (nothing to send). */
  finish(): Uint8Array | undefined {
    if (!this.open) return undefined;
    this.open = false;
    if (this.count === 0) {
      this.pos = this.start;
      return undefined;
    }
    const out = this.slab.subarray(this.start, this.pos);
    this.pos = (this.pos + 7) & ~7;
    return out;
  }
}

/** Convenience (tests, cold paths): coalesce `packets` into as few frames as fit. */
export function encodeFrames(
  src: Uint8Array,
  dst: Uint8Array,
  packets: readonly Uint8Array[],
  opts: FrameEncoderOptions & { ttl?: number; encoder?: FrameEncoder } = {},
): { frames: Uint8Array[]; dropped: { packet: number; reason: "too-big" | "malformed" }[] } {
  const enc = opts.encoder ?? new FrameEncoder(opts);
  const frames: Uint8Array[] = [];
  const dropped: { packet: number; reason: "too-big" | "malformed" }[] = [];
  enc.begin(src, dst, opts.ttl);
  for (let i = 0; i < packets.length; i++) {
    const p = packets[i]!;
    let r = enc.add(p);
    if (r === "full") {
      frames.push(enc.finish()!);
      enc.begin(src, dst, opts.ttl);
      r = enc.add(p);
    }
    if (r === "too-big" || r === "malformed") dropped.push({ packet: i, reason: r });
  }
  const last = enc.finish();
  if (last) frames.push(last);
  return { frames, dropped };
}

/**
 * Uninitialised memory when Node's Buffer is there (no 1 MiB zero-fill per slab); only bytes we wrote are
 * ever exposed (frames are subarrays of written ranges).
 */
export function allocSlab(n: number): Uint8Array {
  const B = (globalThis as { Buffer?: { allocUnsafeSlow(n: number): Uint8Array } }).Buffer;
  return B ? B.allocUnsafeSlow(n) : new Uint8Array(n);
}

// ---- decoding ------------------------------------------------------------------------------------

export interface DecodeOptions {
  /** Reject messages larger than this (default: no limit beyond the structure). */
  maxMessageSize?: number;
}

/** Header only (transit nodes): version, ttl, source and destination. Never throws. */
export function peekFrameHeader(msg: Uint8Array, opts: DecodeOptions = {}): FrameHeaderResult {
  if (msg.length < FRAME_HEADER_LEN + RECORD_HEADER_LEN + MIN_RECORD_LEN) return FRAME_DROPS.short;
  if (opts.maxMessageSize !== undefined && msg.length > opts.maxMessageSize) return FRAME_DROPS.tooBig;
  const vf = msg[OFF_VF]!;
  if (vf >> 4 !== FRAME_VERSION) return FRAME_DROPS.version;
  const ttl = msg[OFF_TTL]!;
  if (ttl === 0) return FRAME_DROPS.ttl;
  return { ok: true, version: vf >> 4, flags: vf & 0x0f, ttl, src: nodeIdFromBytes(msg, OFF_SRC), dst: nodeIdFromBytes(msg, OFF_DST) };
}

/** Full decode (destination node): header + every record validated. Never throws. */
export function decodeFrame(msg: Uint8Array, opts: DecodeOptions = {}): FrameResult {
  const h = peekFrameHeader(msg, opts);
  if (!h.ok) return h;
  const packets: Uint8Array[] = [];
  let o = FRAME_HEADER_LEN;
  const end = msg.length;
  while (o < end) {
    if (end - o < RECORD_HEADER_LEN) return FRAME_DROPS.recordHeader;
    const n = ((msg[o]! << 24) | (msg[o + 1]! << 16) | (msg[o + 2]! << 8) | msg[o + 3]!) >>> 0;
    if (n < MIN_RECORD_LEN || n > MAX_VNET_PACKET) return FRAME_DROPS.recordLen;
    o += RECORD_HEADER_LEN;
    if (n > end - o) return FRAME_DROPS.recordTrunc;
    const pkt = msg.subarray(o, o + n);
    const bad = validateVnetPacket(pkt);
    if (bad) return bad;
    const ip = peekIp(pkt, VNET_HDR_LEN);
    if (!ip.ok) return ip;
    if (ip.totalLength !== n - VNET_HDR_LEN) return FRAME_DROPS.ipLen;
    packets.push(pkt);
    o += n;
  }
  // An explicit literal, not `{ ...h, packets }`: the spread built a new hidden class per call here, and every
  // reader of the result then missed its inline caches (~10% of a received packet's CPU).
  return { ok: true, version: h.version, flags: h.flags, ttl: h.ttl, src: h.src, dst: h.dst, packets };
}

/** The destination node id without decoding anything else ("" when too short). */
export function frameDst(msg: Uint8Array): string {
  return msg.length < FRAME_HEADER_LEN ? "" : nodeIdFromBytes(msg, OFF_DST);
}

/** Compare the destination with an 8-byte id without allocating. */
export function frameDstIs(msg: Uint8Array, id: Uint8Array): boolean {
  if (msg.length < FRAME_HEADER_LEN || id.length !== 8) return false;
  for (let i = 0; i < 8; i++) if (msg[OFF_DST + i] !== id[i]) return false;
  return true;
}

/**
 * Transit: spend one hop in place (the payload is not touched). Returns the ttl left, or the
 * `ttl-expired` drop when the frame must not be forwarded (ttl <= 1), or `malformed` when too short.
 */
export function decrementTtl(msg: Uint8Array): number | PeekDrop {
  if (msg.length < FRAME_HEADER_LEN) return FRAME_DROPS.short;
  const ttl = msg[OFF_TTL]!;
  if (ttl <= 1) return FRAME_DROPS.ttl;
  msg[OFF_TTL] = ttl - 1;
  return ttl - 1;
}
