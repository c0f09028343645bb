/**
 * Userspace GRO: coalesce received TCP segments of one flow back into a GSO super-packet (virtio header
 * NEEDS_CSUM + gso_type TCPV4/TCPV6 + gso_size) before the TUN write, so the receiving kernel handles one
 * large packet instead of ~45 small ones (the kernel re-segments it by gso_size on the way to a pod, or
 * delivers it whole). The counterpart of gso.ts; pure, batch-oriented, output in a caller-owned ByteArena.
 *
 * A segment joins the flow's open super-packet only when everything the kernel's tcp_gro_receive would
 * compare is equal, and the result is what the kernel itself would build:
 *   - same 4-tuple (addresses, ports), same ACK number, same TCP header length and options bytes,
 *     IPv4: same TOS, TTL, DF and no options-carrying difference (whole header compared except length, id,
 *     checksum); IPv6: same version/traffic class/flow label, next header, hop limit (fixed header only:
 *     packets with extension headers pass through);
 *   - sequence number == the open packet's next expected one (in order, no gap, no overlap);
 *   - flags only ACK (+ PSH on the segment that closes the packet); SYN/FIN/RST/URG/ECE/CWR pass through
 *     alone and close the flow's open packet (so nothing of the flow is reordered around them);
 *   - payload > 0 and <= the first segment's (the gso_size); a shorter one is the last that can join;
 *     the super-packet stays within 65535 bytes of IP (IPv4 total length / IPv6 payload length).
 * A packet of the flow that cannot join closes the open super-packet; later segments start a new one. A
 * "super-packet" of one segment is written as it came (same subarray). Packets of other protocols, and
 * GSO packets (segmentation off on the sender), pass through untouched. Order: every output sits where its
 * first segment was; only packets of different flows can change order (harmless), never within a flow.
 *
 * Checksums: a coalesced packet carries the pseudo-header sum with NEEDS_CSUM (the kernel completes or
 * offloads it, as for any TUN GSO write). The segments' own checksums are not verified here: they arrived
 * inside DTLS (WebRTC) or an AEAD (bulk link), which already rejects altered bytes.
 *
 *   const out: Uint8Array[] = []
 *   coalesce(received, arena, out)   // then tun.writeBatch(out); arena.reset(); out.length = 0
 */
import { ByteArena, fixIpv4Checksum, fold16, pseudoSum, PROTO_TCP, TCP_ACK, TCP_PSH } from "./gso.js";
import { VNET_F_NEEDS_CSUM, VNET_GSO_NONE, VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_HDR_LEN } from "./vnet.js";

/** Largest IPv4 total length / IPv6 payload length. */
const MAX_LEN_FIELD = 65535;
/** Most segments in one super-packet (the kernel GRO merges at most 64 too). */
export const GRO_MAX_SEGMENTS = 64;

interface Item {
  /** Position in `out` that this super-packet will take. */
  slot: number;
  segs: Uint8Array[];
  /** IP header length, TCP header length. */
  ipHdr: number;
  tcpHdr: number;
  gsoSize: number;
  /** Payload bytes so far. */
  payload: number;
  nextSeq: number;
  /** Closed: a short segment or PSH ended it. */
  closed: boolean;
  hash: number;
}

export interface GroStats {
  /** Segments that were merged into a super-packet (of 2 or more). */
  merged: number;
  /** Super-packets built. */
  built: number;
}

/**
 * Coalesce `pkts` (vnet header + IP each) into `out` (appended). The segment list is scanned once; flows
 * are matched by a 32-bit hash of the 4-tuple then by bytes. Returns counts.
 */
export function coalesce(pkts: readonly Uint8Array[], arena: ByteArena, out: Uint8Array[], stats?: GroStats): void {
  const base = out.length;
  const items: Item[] = [];
  /** hash -> open item (at most one open item per hash: collisions just coalesce less). */
  const open = new Map<number, Item>();
  for (let i = 0; i < pkts.length; i++) {
    const p = pkts[i]!;
    const c = candidate(p);
    if (c < 0) {
      if (c === NOT_TCP) out.push(p);
      else {
        // TCP that cannot be coalesced: close its flow's open item so the flow stays in order.
        const h = flowHash(p, c === TCP_ALONE_V4 ? 4 : 6);
        open.delete(h);
        out.push(p);
      }
      continue;
    }
    const ipHdr = c;
    const t = VNET_HDR_LEN + ipHdr;
    const tcpHdr = (p[t + 12]! >> 4) * 4;
    const payload = p.length - VNET_HDR_LEN - ipHdr - tcpHdr;
    const seq = ((p[t + 4]! << 24) | (p[t + 5]! << 16) | (p[t + 6]! << 8) | p[t + 7]!) >>> 0;
    const h = flowHash(p, p[VNET_HDR_LEN]! >> 4);
    const it = open.get(h);
    if (it && !it.closed && canJoin(it, p, ipHdr, tcpHdr, payload, seq)) {
      it.segs.push(p);
      it.payload += payload;
      it.nextSeq = (it.nextSeq + payload) >>> 0;
      if (payload < it.gsoSize || (p[t + 13]! & TCP_PSH) !== 0 || it.segs.length >= GRO_MAX_SEGMENTS) it.closed = true;
      continue;
    }
    const n: Item = { slot: out.length, segs: [p], ipHdr, tcpHdr, gsoSize: payload, payload, nextSeq: (seq + payload) >>> 0, closed: (p[t + 13]! & TCP_PSH) !== 0, hash: h };
    items.push(n);
    open.set(h, n);
    out.push(p);
  }
  for (const it of items) {
    if (it.segs.length < 2) continue;
    out[it.slot] = build(it, arena);
    if (stats) {
      stats.built++;
      stats.merged += it.segs.length;
    }
  }
  void base;
}

const NOT_TCP = -1;
const TCP_ALONE_V4 = -2;
const TCP_ALONE_V6 = -3;

/**
 * >= 0: a coalescable TCP segment; the value is its IP header length. NOT_TCP: anything else that is not
 * TCP (or not parseable: pass through). TCP_ALONE_*: TCP that must travel alone.
 */
function candidate(p: Uint8Array): number {
  const ip = VNET_HDR_LEN;
  const ipLen = p.length - ip;
  if (ipLen < 40) return NOT_TCP;
  if (p[1] !== VNET_GSO_NONE) return NOT_TCP; // already a GSO packet; flags 0/NEEDS_CSUM only
  if ((p[0]! & ~(VNET_F_NEEDS_CSUM | 2)) !== 0) return NOT_TCP;
  const v = p[ip]! >> 4;
  let ipHdr: number;
  if (v === 4) {
    if (p[ip + 9] !== PROTO_TCP) return NOT_TCP;
    ipHdr = (p[ip]! & 0x0f) * 4;
    if (ipHdr !== 20) return ipHdr < 20 ? NOT_TCP : TCP_ALONE_V4; // options: keep alone
    if (((p[ip + 2]! << 8) | p[ip + 3]!) !== ipLen) return NOT_TCP;
    if ((p[ip + 6]! & 0x3f) !== 0 || p[ip + 7] !== 0) return NOT_TCP; // fragment
  } else if (v === 6) {
    if (p[ip + 6] !== PROTO_TCP) return NOT_TCP; // extension headers: pass through
    ipHdr = 40;
    if (((p[ip + 4]! << 8) | p[ip + 5]!) + 40 !== ipLen) return NOT_TCP;
  } else {
    return NOT_TCP;
  }
  const t = ip + ipHdr;
  const tcpHdr = (p[t + 12]! >> 4) * 4;
  if (tcpHdr < 20 || ipHdr + tcpHdr > ipLen) return NOT_TCP;
  const alone = v === 4 ? TCP_ALONE_V4 : TCP_ALONE_V6;
  const flags = p[t + 13]!;
  if ((flags & ~(TCP_ACK | TCP_PSH)) !== 0 || (flags & TCP_ACK) === 0) return alone;
  if (ipHdr + tcpHdr === ipLen) return alone; // no payload (pure ACK)
  return ipHdr;
}

/** FNV-1a over the addresses and ports (IPv4 12..20 + ports; IPv6 8..40 + ports). */
function flowHash(p: Uint8Array, v: number): number {
  const ip = VNET_HDR_LEN;
  let h = 0x811c9dc5;
  const a0 = v === 4 ? ip + 12 : ip + 8;
  const a1 = v === 4 ? ip + 20 : ip + 40;
  for (let i = a0; i < a1; i++) h = Math.imul(h ^ p[i]!, 0x01000193);
  const t = ip + (v === 4 ? (p[ip]! & 0x0f) * 4 : 40);
  for (let i = t; i < t + 4 && i < p.length; i++) h = Math.imul(h ^ p[i]!, 0x01000193);
  return h >>> 0;
}

function canJoin(it: Item, p: Uint8Array, ipHdr: number, tcpHdr: number, payload: number, seq: number): boolean {
  if (ipHdr !== it.ipHdr || tcpHdr !== it.tcpHdr) return false;
  if (seq !== it.nextSeq || payload > it.gsoSize) return false;
  if (it.payload + payload + tcpHdr + (ipHdr === 20 ? 20 : 0) > MAX_LEN_FIELD) return false;
  const f = it.segs[0]!;
  const ip = VNET_HDR_LEN;
  if (f[ip]! >> 4 !== p[ip]! >> 4) return false;
  if (ipHdr === 20) {
    // version/IHL, TOS; flags/DF (byte 6); TTL, protocol; addresses
    if (f[ip + 1] !== p[ip + 1] || f[ip + 6] !== p[ip + 6] || f[ip + 8] !== p[ip + 8] || f[ip + 9] !== p[ip + 9]) return false;
    for (let i = ip + 12; i < ip + 20; i++) if (f[i] !== p[i]) return false;
  } else {
    for (let i = ip; i < ip + 4; i++) if (f[i] !== p[i]) return false;
    if (f[ip + 6] !== p[ip + 6] || f[ip + 7] !== p[ip + 7]) return false;
    for (let i = ip + 8; i < ip + 40; i++) if (f[i] !== p[i]) return false;
  }
  const t = ip + ipHdr;
  // ports
  for (let i = t; i < t + 4; i++) if (f[i] !== p[i]) return false;
  // ack number
  for (let i = t + 8; i < t + 12; i++) if (f[i] !== p[i]) return false;
  // options
  for (let i = t + 20; i < t + tcpHdr; i++) if (f[i] !== p[i]) return false;
  return true;
}

/** The super-packet: first segment's headers, all payloads, lengths and checksums fixed, GSO virtio header. */
function build(it: Item, arena: ByteArena): Uint8Array {
  const f = it.segs[0]!;
  const ip = VNET_HDR_LEN;
  const hdrs = it.ipHdr + it.tcpHdr;
  const head = ip + hdrs;
  const b = arena.alloc(head + it.payload);
  b.set(f.subarray(0, head), 0);
  let o = head;
  for (const s of it.segs) {
    b.set(s.subarray(head), o);
    o += s.length - head;
  }
  const v = f[ip]! >> 4;
  const ipLen = hdrs + it.payload;
  if (v === 4) {
    b[ip + 2] = ipLen >> 8;
    b[ip + 3] = ipLen & 0xff;
    fixIpv4Checksum(b, ip);
  } else {
    const pl = ipLen - 40;
    b[ip + 4] = pl >> 8;
    b[ip + 5] = pl & 0xff;
  }
  const t = ip + it.ipHdr;
  // PSH from the last segment (the others had none).
  const last = it.segs[it.segs.length - 1]!;
  b[t + 13] = (b[t + 13]! & ~TCP_PSH) | (last[t + 13]! & TCP_PSH);
  const tcpLen = it.tcpHdr + it.payload;
  b[t + 16] = 0;
  b[t + 17] = 0;
  const c = fold16(pseudoSum(b, ip, PROTO_TCP, tcpLen));
  b[t + 16] = c >> 8;
  b[t + 17] = c & 0xff;
  b[0] = VNET_F_NEEDS_CSUM;
  b[1] = v === 4 ? VNET_GSO_TCPV4 : VNET_GSO_TCPV6;
  b[2] = hdrs & 0xff;
  b[3] = hdrs >> 8;
  b[4] = it.gsoSize & 0xff;
  b[5] = it.gsoSize >> 8;
  b[6] = it.ipHdr & 0xff;
  b[7] = it.ipHdr >> 8;
  b[8] = 16;
  b[9] = 0;
  return b;
}
