/**
 * Minimal software TCP segmentation for the bulk link (one inner packet per datagram): split a TUN GSO
 * super-packet (virtio header gso_type TCPV4/TCPV6) into gso_size-payload segments, each a complete
 * packet with a virtio header of gso_type NONE.
 *
 * Per segment: IP and TCP headers copied; IPv4 total length, id (+i) and header checksum rewritten,
 * IPv6 payload length rewritten; TCP sequence number advanced; FIN/PSH only on the last segment, CWR only
 * on the first. The TCP checksum stays partial (virtio NEEDS_CSUM, as the TUN handed it over): the field
 * holds the folded pseudo-header sum for the segment's length and the receiving TUN completes it, exactly
 * like a NIC with checksum offload. A packet that is not a TCP GSO packet is passed through untouched.
 *
 * This is the bulk helper's stop-gap until src/packet/gso*.ts (helper "gso") lands a complete
 * implementation (UDP, IPv6 extension headers, the reverse coalescing); then the bulk link switches.
 */
import { VNET_F_NEEDS_CSUM, VNET_GSO_ECN, VNET_GSO_NONE, VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_HDR_LEN } from "./vnet.js";

/** One's-complement sum of 16-bit big-endian words (not folded). */
export function sum16(b: Uint8Array, start: number, end: number, acc = 0): number {
  let i = start;
  for (; i + 1 < end; i += 2) acc += (b[i]! << 8) | b[i + 1]!;
  if (i < end) acc += b[i]! << 8;
  return acc;
}

export function fold(sum: number): number {
  while (sum > 0xffff) sum = (sum & 0xffff) + Math.floor(sum / 0x10000);
  return sum;
}

/**
 * Segment `pkt` (virtio header + IP). Calls `emit(segment)` for every output packet; each segment is a
 * view of `scratch` valid only during the call (or `pkt` itself when nothing needed splitting).
 * Returns the number of segments, or 0 when the packet is not something we can segment (emit not called).
 */
export function segmentTcp(pkt: Uint8Array, scratch: Uint8Array, emit: (seg: Uint8Array, i: number, n: number) => void): number {
  const gsoType = pkt[1]! & ~VNET_GSO_ECN;
  const gsoSize = pkt[4]! | (pkt[5]! << 8);
  if (gsoType === VNET_GSO_NONE || gsoSize === 0) {
    emit(pkt, 0, 1);
    return 1;
  }
  if (gsoType !== VNET_GSO_TCPV4 && gsoType !== VNET_GSO_TCPV6) return 0;
  const ip = VNET_HDR_LEN;
  const v = pkt[ip]! >> 4;
  let ipHl: number;
  let total: number;
  if (v === 4 && gsoType === VNET_GSO_TCPV4) {
    ipHl = (pkt[ip]! & 15) * 4;
    total = (pkt[ip + 2]! << 8) | pkt[ip + 3]!;
    if (pkt[ip + 9] !== 6) return 0;
  } else if (v === 6 && gsoType === VNET_GSO_TCPV6) {
    ipHl = 40;
    total = 40 + ((pkt[ip + 4]! << 8) | pkt[ip + 5]!);
    if (pkt[ip + 6] !== 6) return 0; // extension headers: not here
  } else return 0;
  if (ipHl < 20 || total > pkt.length - ip) return 0;
  const tcp = ip + ipHl;
  if (tcp + 20 > ip + total) return 0;
  const tcpHl = (pkt[tcp + 12]! >> 4) * 4;
  const hdrs = ipHl + tcpHl;
  if (tcpHl < 20 || hdrs > total) return 0;
  const payload = total - hdrs;
  const n = Math.max(1, Math.ceil(payload / gsoSize));
  if (scratch.length < VNET_HDR_LEN + hdrs + gsoSize) return 0;
  const seq0 = ((pkt[tcp + 4]! << 24) | (pkt[tcp + 5]! << 16) | (pkt[tcp + 6]! << 8) | pkt[tcp + 7]!) >>> 0;
  const flags0 = pkt[tcp + 13]!;
  const id0 = v === 4 ? (pkt[ip + 4]! << 8) | pkt[ip + 5]! : 0;
  // Pseudo-header without the length: addresses + protocol.
  const pseudo = v === 4 ? sum16(pkt, ip + 12, ip + 20) + 6 : sum16(pkt, ip + 8, ip + 40) + 6;
  const hs = VNET_HDR_LEN + hdrs;
  const sIp = VNET_HDR_LEN;
  const sTcp = sIp + ipHl;
  for (let i = 0; i < n; i++) {
    const off = i * gsoSize;
    const len = Math.min(gsoSize, payload - off);
    scratch.set(pkt.subarray(0, hs), 0);
    scratch.set(pkt.subarray(hs + off, hs + off + len), hs);
    // virtio: a plain packet with a partial checksum at the TCP checksum field
    scratch[0] = VNET_F_NEEDS_CSUM;
    scratch[1] = VNET_GSO_NONE;
    scratch[2] = hdrs & 255;
    scratch[3] = hdrs >> 8;
    scratch[4] = scratch[5] = 0;
    scratch[6] = ipHl & 255;
    scratch[7] = ipHl >> 8;
    scratch[8] = 16;
    scratch[9] = 0;
    const tcpLen = tcpHl + len;
    if (v === 4) {
      const tl = ipHl + tcpLen;
      scratch[sIp + 2] = tl >> 8;
      scratch[sIp + 3] = tl & 255;
      const id = (id0 + i) & 0xffff;
      scratch[sIp + 4] = id >> 8;
      scratch[sIp + 5] = id & 255;
      scratch[sIp + 10] = scratch[sIp + 11] = 0;
      const c = ~fold(sum16(scratch, sIp, sIp + ipHl)) & 0xffff;
      scratch[sIp + 10] = c >> 8;
      scratch[sIp + 11] = c & 255;
    } else {
      scratch[sIp + 4] = tcpLen >> 8;
      scratch[sIp + 5] = tcpLen & 255;
    }
    const seq = (seq0 + off) >>> 0;
    scratch[sTcp + 4] = seq >>> 24;
    scratch[sTcp + 5] = (seq >>> 16) & 255;
    scratch[sTcp + 6] = (seq >>> 8) & 255;
    scratch[sTcp + 7] = seq & 255;
    let fl = flags0;
    if (i < n - 1) fl &= ~0x09; // FIN, PSH only on the last
    if (i > 0) fl &= ~0x80; // CWR only on the first
    scratch[sTcp + 13] = fl;
    const ps = fold(pseudo + tcpLen);
    scratch[sTcp + 16] = ps >> 8;
    scratch[sTcp + 17] = ps & 255;
    emit(scratch.subarray(0, hs + len), i, n);
  }
  return n;
}

/** Complete a NEEDS_CSUM packet's checksum in software (tests, and receivers without a TUN). */
export function completeChecksum(pkt: Uint8Array): void {
  if (!(pkt[0]! & VNET_F_NEEDS_CSUM)) return;
  const start = VNET_HDR_LEN + (pkt[6]! | (pkt[7]! << 8));
  const at = start + (pkt[8]! | (pkt[9]! << 8));
  const c = ~fold(sum16(pkt, start, pkt.length)) & 0xffff;
  pkt[at] = c >> 8;
  pkt[at + 1] = c & 255;
  pkt[0] = pkt[0]! & ~VNET_F_NEEDS_CSUM;
}
