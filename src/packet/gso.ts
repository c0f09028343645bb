/**
 * Software GSO: split the TUN's virtio-net super-packets (src/packet/vnet.ts) into packets of at most
 * `maxIp` bytes of IP, each with its own virtio header, so that one lost datagram on a link costs one inner
 * packet instead of a ~64 KB super-packet (issue 11). Pure and batch-oriented: no I/O, no timers, output
 * written into a caller-owned ByteArena (reset once the batch has been sent), so the hot path allocates
 * nothing in steady state. Reused by the UDP bulk link (src/bulk) and by the WebRTC path (forwarder).
 *
 * What is split (everything else passes through untouched, as the same subarray):
 *   - TCP, IPv4 or IPv6 (extension headers hop-by-hop / routing / destination options walked), GSO
 *     (gso_type TCPV4/TCPV6, ECN bit allowed) or a plain TCP packet larger than maxIp whose flags are only
 *     ACK/PSH/FIN/CWR/ECE (never SYN, RST or URG: their sequence semantics do not survive a split).
 *     Segment payload = min(gso_size, maxIp - headers): TCP does not care where segment boundaries are, so
 *     we may cut finer than the sender's MSS to fit the link.
 *   - UDP with gso_type UDP_L4 (USO): one datagram per gso_size bytes (datagram boundaries are fixed, so
 *     maxIp is not applied to UDP; a datagram larger than maxIp stays one packet).
 * Per segment, as the kernel's tcp_gso_segment / udp4_ufo_fragment do: IPv4 total length, id (+1 per
 * segment), header checksum; IPv6 payload length; TCP sequence number (+ bytes before it), FIN and PSH
 * only on the last segment, CWR only on the first; UDP length.
 *
 * Checksums (`csum`):
 *   "partial" (default): the L4 checksum field holds the folded pseudo-header sum and the virtio header says
 *     NEEDS_CSUM (csum_start = IP header length, csum_offset = 16 TCP / 6 UDP). The receiving TUN (every
 *     weftnet TUN is vnet) or its NIC completes it: no per-byte work in JS. DTLS / the bulk link's AEAD
 *     protect the bytes in between.
 *   "full": a complete checksum and an all-zero virtio header (for receivers without vnet).
 * A GSO super-packet's existing checksum field is never trusted: it is recomputed from the headers.
 *
 * Drops (typed, `malformed`): GSO types we cannot split (UFO, gso_type 3), GSO on something that is not
 * TCP/UDP of the right family, fragments, headers that run past the packet, IP lengths that disagree with
 * the bytes, gso_size 0; `too-big`: maxIp too small for the headers.
 *
 * API (see /work/wt/NOTES.md for the bulk link):
 *   const arena = new ByteArena()
 *   const out: Uint8Array[] = []
 *   segmentBatch(batch, { maxIp: 1332 }, arena, out, (pkt, drop) => count(drop.reason))
 *   ...send every `out` packet (vnet header + IP) ...; arena.reset(); out.length = 0
 */
import type { PeekDrop } from "./ip.js";
import { VNET_F_NEEDS_CSUM, VNET_GSO_ECN, VNET_GSO_NONE, VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_GSO_UDP_L4, VNET_HDR_LEN } from "./vnet.js";

export const PROTO_TCP = 6;
export const PROTO_UDP = 17;
export const TCP_FIN = 0x01;
export const TCP_SYN = 0x02;
export const TCP_RST = 0x04;
export const TCP_PSH = 0x08;
export const TCP_ACK = 0x10;
export const TCP_URG = 0x20;
export const TCP_ECE = 0x40;
export const TCP_CWR = 0x80;
/** Smallest maxIp accepted: the IPv6 minimum MTU. */
export const MIN_SEGMENT_IP = 576;

function drop(reason: "malformed" | "too-big", detail: string): PeekDrop {
  return Object.freeze({ ok: false, reason, detail });
}

export const GSO_DROPS = {
  ufo: drop("malformed", "GSO type UDP (UFO) cannot be segmented"),
  gsoType: drop("malformed", "GSO packet is not TCP or UDP of its gso_type's family"),
  gsoSize: drop("malformed", "GSO packet with gso_size 0"),
  headers: drop("malformed", "IP or L4 header runs past the packet"),
  length: drop("malformed", "IP length disagrees with the packet's bytes"),
  fragment: drop("malformed", "GSO on an IP fragment"),
  maxIp: drop("too-big", "link MTU too small for the packet's headers"),
} as const;

// ---- arena -----------------------------------------------------------------------------------------

/**
 * Bump allocator over reusable chunks: alloc() hands out subarrays that stay valid until reset(); reset()
 * makes every chunk available again (the caller is done with what it handed out). Steady state: no allocation.
 */
export class ByteArena {
  private readonly chunks: Uint8Array[] = [];
  private idx = 0;
  private pos = 0;
  constructor(private readonly chunkSize = 1 << 20) {}

  alloc(n: number): Uint8Array {
    let c = this.chunks[this.idx];
    if (c && this.pos + n > c.length) {
      this.idx++;
      this.pos = 0;
      c = this.chunks[this.idx];
    }
    if (!c || n > c.length) {
      c = newBuf(Math.max(this.chunkSize, n));
      this.chunks.splice(this.idx, 0, c);
      this.pos = 0;
    }
    const out = c.subarray(this.pos, this.pos + n);
    this.pos = (this.pos + n + 7) & ~7;
    return out;
  }

  reset(): void {
    this.idx = 0;
    this.pos = 0;
  }

  /** Bytes held (all chunks). */
  get capacity(): number {
    let n = 0;
    for (const c of this.chunks) n += c.length;
    return n;
  }
}

function newBuf(n: number): Uint8Array {
  const B = (globalThis as { Buffer?: { allocUnsafeSlow(n: number): Uint8Array } }).Buffer;
  return B ? B.allocUnsafeSlow(n) : new Uint8Array(n);
}

// ---- checksums -------------------------------------------------------------------------------------

/** Ones'-complement sum of big-endian 16-bit words of b[start, end) (an odd last byte is padded), unfolded. */
export function sum16(b: Uint8Array, start: number, end: number, acc = 0): number {
  let s = acc;
  let i = start;
  const even = end - ((end - start) & 1);
  for (; i < even; i += 2) s += (b[i]! << 8) | b[i + 1]!;
  if (i < end) s += b[i]! << 8;
  return s;
}

/** Fold a sum to 16 bits (not complemented). */
export function fold16(s: number): number {
  while (s > 0xffff) s = (s & 0xffff) + Math.floor(s / 0x10000);
  return s;
}

/**
 * Unfolded pseudo-header sum for an L4 segment of `l4Len` bytes: IPv4 (src, dst, proto, len) or IPv6
 * (src, dst, len, next header). `ip`: offset of the IP header in `b`.
 */
export function pseudoSum(b: Uint8Array, ip: number, proto: number, l4Len: number): number {
  if (b[ip]! >> 4 === 4) return sum16(b, ip + 12, ip + 20, proto + l4Len);
  return sum16(b, ip + 8, ip + 40, proto + (l4Len >>> 16) + (l4Len & 0xffff));
}

/** Recompute the IPv4 header checksum in place. */
export function fixIpv4Checksum(b: Uint8Array, ip: number): void {
  const ihl = (b[ip]! & 0x0f) * 4;
  b[ip + 10] = 0;
  b[ip + 11] = 0;
  const c = ~fold16(sum16(b, ip, ip + ihl)) & 0xffff;
  b[ip + 10] = c >> 8;
  b[ip + 11] = c & 0xff;
}

// ---- parsing ---------------------------------------------------------------------------------------

/** Where the L4 header starts and what it is; -1 fields when the packet is not TCP/UDP we can handle. */
export interface L4Info {
  /** IP header length incl. IPv6 extension headers (offset of L4 from the IP header). */
  ipHdr: number;
  proto: number;
  /** L4 header length (TCP data offset, 8 for UDP). */
  l4Hdr: number;
  /** IP packet length (bytes after the virtio header). */
  ipLen: number;
}

/**
 * Parse (vnet header + IP) down to the TCP/UDP header. Returns null for packets that are fine but not
 * TCP/UDP (or IPv4/IPv6 fragments, or unknown IPv6 extension headers), a drop for inconsistent ones.
 * `out` is filled and returned (no allocation).
 */
export function parseL4(pkt: Uint8Array, out: L4Info): L4Info | PeekDrop | null {
  const ip = VNET_HDR_LEN;
  const ipLen = pkt.length - ip;
  if (ipLen < 1) return GSO_DROPS.headers;
  const v = pkt[ip]! >> 4;
  let hdr: number;
  let proto: number;
  if (v === 4) {
    if (ipLen < 20) return GSO_DROPS.headers;
    hdr = (pkt[ip]! & 0x0f) * 4;
    if (hdr < 20 || hdr > ipLen) return GSO_DROPS.headers;
    if (((pkt[ip + 2]! << 8) | pkt[ip + 3]!) !== ipLen) return GSO_DROPS.length;
    if ((pkt[ip + 6]! & 0x3f) !== 0 || pkt[ip + 7]! !== 0) return null; // MF or fragment offset
    proto = pkt[ip + 9]!;
  } else if (v === 6) {
    if (ipLen < 40) return GSO_DROPS.headers;
    if (((pkt[ip + 4]! << 8) | pkt[ip + 5]!) + 40 !== ipLen) return GSO_DROPS.length;
    hdr = 40;
    proto = pkt[ip + 6]!;
    // hop-by-hop (0), routing (43), destination options (60): (len + 1) * 8 bytes each
    while (proto === 0 || proto === 43 || proto === 60) {
      if (hdr + 8 > ipLen) return GSO_DROPS.headers;
      const next = pkt[ip + hdr]!;
      hdr += (pkt[ip + hdr + 1]! + 1) * 8;
      proto = next;
    }
    if (hdr > ipLen) return GSO_DROPS.headers;
  } else {
    return GSO_DROPS.headers;
  }
  let l4: number;
  if (proto === PROTO_TCP) {
    if (hdr + 20 > ipLen) return GSO_DROPS.headers;
    l4 = (pkt[ip + hdr + 12]! >> 4) * 4;
    if (l4 < 20 || hdr + l4 > ipLen) return GSO_DROPS.headers;
  } else if (proto === PROTO_UDP) {
    if (hdr + 8 > ipLen) return GSO_DROPS.headers;
    l4 = 8;
  } else {
    return null;
  }
  out.ipHdr = hdr;
  out.proto = proto;
  out.l4Hdr = l4;
  out.ipLen = ipLen;
  return out;
}

// ---- segmentation ----------------------------------------------------------------------------------

export interface SegmentOptions {
  /** Largest IP packet (bytes after the virtio header) a TCP segment may be. >= MIN_SEGMENT_IP. */
  maxIp: number;
  /** "partial" (default): NEEDS_CSUM + pseudo-header sum; "full": complete checksum, zero virtio header. */
  csum?: "partial" | "full";
}

const scratch: L4Info = { ipHdr: 0, proto: 0, l4Hdr: 0, ipLen: 0 };

/** Would segment() split this packet (cheap check, no parsing beyond two bytes for non-GSO)? */
export function needsSegmentation(pkt: Uint8Array, maxIp: number): boolean {
  return (pkt.length >= VNET_HDR_LEN && (pkt[1]! & ~VNET_GSO_ECN) !== VNET_GSO_NONE) || pkt.length - VNET_HDR_LEN > maxIp;
}

/**
 * Segment one packet into `out` (appended). Packets that need no split are appended as they are (same
 * subarray, no copy). Returns null, or the typed drop (nothing appended).
 */
export function segment(pkt: Uint8Array, opts: SegmentOptions, arena: ByteArena, out: Uint8Array[]): PeekDrop | null {
  const gso = pkt.length >= VNET_HDR_LEN ? pkt[1]! & ~VNET_GSO_ECN : VNET_GSO_NONE;
  const ipLen = pkt.length - VNET_HDR_LEN;
  if (gso === VNET_GSO_NONE && ipLen <= opts.maxIp) {
    out.push(pkt);
    return null;
  }
  const l = parseL4(pkt, scratch);
  if (l === null) {
    if (gso !== VNET_GSO_NONE) return gso === 3 ? GSO_DROPS.ufo : GSO_DROPS.fragment;
    out.push(pkt); // oversize but not TCP: stays one packet (the link splits the message)
    return null;
  }
  if (!("ipHdr" in l)) return l;
  const v = pkt[VNET_HDR_LEN]! >> 4;
  const full = opts.csum === "full";
  if (gso === VNET_GSO_NONE) {
    if (l.proto !== PROTO_TCP) {
      out.push(pkt);
      return null;
    }
    const flags = pkt[VNET_HDR_LEN + l.ipHdr + 13]!;
    if ((flags & (TCP_SYN | TCP_RST | TCP_URG)) !== 0) {
      out.push(pkt);
      return null;
    }
    const payload = ipLen - l.ipHdr - l.l4Hdr;
    const hdrs = l.ipHdr + l.l4Hdr;
    if (opts.maxIp - hdrs <= 0) return GSO_DROPS.maxIp;
    return split(pkt, l, PROTO_TCP, payload, opts.maxIp - hdrs, full, arena, out);
  }
  if (gso === 3) return GSO_DROPS.ufo;
  const gsoSize = pkt[4]! | (pkt[5]! << 8);
  if (gsoSize === 0) return GSO_DROPS.gsoSize;
  if (gso === VNET_GSO_TCPV4 || gso === VNET_GSO_TCPV6) {
    if (l.proto !== PROTO_TCP || (gso === VNET_GSO_TCPV4) !== (v === 4)) return GSO_DROPS.gsoType;
    const hdrs = l.ipHdr + l.l4Hdr;
    const seg = Math.min(gsoSize, opts.maxIp - hdrs);
    if (seg <= 0) return GSO_DROPS.maxIp;
    return split(pkt, l, PROTO_TCP, ipLen - hdrs, seg, full, arena, out);
  }
  if (gso === VNET_GSO_UDP_L4) {
    if (l.proto !== PROTO_UDP) return GSO_DROPS.gsoType;
    return split(pkt, l, PROTO_UDP, ipLen - l.ipHdr - 8, gsoSize, full, arena, out);
  }
  return GSO_DROPS.gsoType;
}

/** segment() over a batch; dropped packets are reported to onDrop (and not appended). Returns packets appended. */
export function segmentBatch(
  pkts: readonly Uint8Array[],
  opts: SegmentOptions,
  arena: ByteArena,
  out: Uint8Array[],
  onDrop?: (pkt: Uint8Array, drop: PeekDrop) => void,
): number {
  const before = out.length;
  for (let i = 0; i < pkts.length; i++) {
    const d = segment(pkts[i]!, opts, arena, out);
    if (d) onDrop?.(pkts[i]!, d);
  }
  return out.length - before;
}

/** Write the per-segment IP fields: length, id (+i), checksum (v4) or payload length (v6). */
function fixIp(b: Uint8Array, segIpLen: number, i: number): void {
  const ip = VNET_HDR_LEN;
  if (b[ip]! >> 4 === 4) {
    b[ip + 2] = segIpLen >> 8;
    b[ip + 3] = segIpLen & 0xff;
    const id = (((b[ip + 4]! << 8) | b[ip + 5]!) + i) & 0xffff;
    b[ip + 4] = id >> 8;
    b[ip + 5] = id & 0xff;
    fixIpv4Checksum(b, ip);
  } else {
    const pl = segIpLen - 40;
    b[ip + 4] = pl >> 8;
    b[ip + 5] = pl & 0xff;
  }
}

/** Finish the L4 checksum of a segment and write its virtio header. `csumOff`: 16 TCP, 6 UDP. */
function finishL4(b: Uint8Array, ipHdr: number, proto: number, csumOff: number, full: boolean): void {
  const ip = VNET_HDR_LEN;
  const l4 = ip + ipHdr;
  const l4Len = b.length - l4;
  b[l4 + csumOff] = 0;
  b[l4 + csumOff + 1] = 0;
  const ps = pseudoSum(b, ip, proto, l4Len);
  let c: number;
  if (full) {
    c = ~fold16(sum16(b, l4, b.length, ps)) & 0xffff;
    if (c === 0 && proto === PROTO_UDP) c = 0xffff;
    b.fill(0, 0, VNET_HDR_LEN);
  } else {
    c = fold16(ps);
    b[0] = VNET_F_NEEDS_CSUM;
    b[1] = VNET_GSO_NONE;
    b[2] = 0;
    b[3] = 0;
    b[4] = 0;
    b[5] = 0;
    b[6] = ipHdr & 0xff;
    b[7] = ipHdr >> 8;
    b[8] = csumOff;
    b[9] = 0;
  }
  b[l4 + csumOff] = c >> 8;
  b[l4 + csumOff + 1] = c & 0xff;
}

/**
 * Cut the payload behind the IP + L4 headers into `seg`-byte pieces, each a whole packet: the headers copied,
 * the IP fields per segment (fixIp), the L4 fields per segment (TCP: sequence number, FIN/PSH only on the
 * last, CWR only on the first; UDP: length), the checksum finished (finishL4).
 */
function split(pkt: Uint8Array, l: L4Info, proto: number, payload: number, seg: number, full: boolean, arena: ByteArena, out: Uint8Array[]): null {
  const tcp = proto === PROTO_TCP;
  const ip = VNET_HDR_LEN;
  const hdrs = l.ipHdr + (tcp ? l.l4Hdr : 8);
  const head = ip + hdrs;
  const t = ip + l.ipHdr;
  const seq0 = tcp ? ((pkt[t + 4]! << 24) | (pkt[t + 5]! << 16) | (pkt[t + 6]! << 8) | pkt[t + 7]!) >>> 0 : 0;
  const flags0 = tcp ? pkt[t + 13]! : 0;
  const n = Math.max(1, Math.ceil(payload / seg));
  for (let i = 0; i < n; i++) {
    const off = i * seg;
    const len = Math.min(seg, payload - off);
    const b = arena.alloc(head + len);
    b.set(pkt.subarray(0, head), 0);
    b.set(pkt.subarray(head + off, head + off + len), head);
    fixIp(b, hdrs + len, i);
    if (tcp) {
      const seq = (seq0 + off) >>> 0;
      b[t + 4] = seq >>> 24;
      b[t + 5] = (seq >>> 16) & 0xff;
      b[t + 6] = (seq >>> 8) & 0xff;
      b[t + 7] = seq & 0xff;
      let f = flags0;
      if (i !== n - 1) f &= ~(TCP_FIN | TCP_PSH);
      if (i !== 0) f &= ~TCP_CWR;
      b[t + 13] = f;
    } else {
      const ul = 8 + len;
      b[t + 4] = ul >> 8;
      b[t + 5] = ul & 0xff;
    }
    finishL4(b, l.ipHdr, proto, tcp ? 16 : 6, full);
    out.push(b);
  }
  return null;
}
