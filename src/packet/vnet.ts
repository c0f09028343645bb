/**
 * virtio_net_hdr: the 10-byte header a TUN device opened with IFF_VNET_HDR puts in front of every packet
 * (reads) and expects in front of every packet (writes). Layout (little-endian: agent/os/tun.ts sets
 * TUNSETVNETLE so the bytes are the same on every host, which is what lets a frame carry them verbatim):
 *
 *   offset size field        meaning
 *   0      1    flags        bit0 NEEDS_CSUM (checksum is partial: fill at csum_start+csum_offset)
 *                            bit1 DATA_VALID (checksum already verified), bit2 RSC_INFO
 *   1      1    gso_type     0 NONE, 1 TCPV4, 3 UDP (UFO), 4 TCPV6, 5 UDP_L4 (USO); bit7 ECN
 *   2      2    hdr_len      length of the headers to copy into each segment (a hint; kernel fixes it up)
 *   4      2    gso_size     payload bytes per segment (the MSS) when gso_type != NONE
 *   6      2    csum_start   offset (from the IP header) where checksumming starts
 *   8      2    csum_offset  where, from csum_start, to store the checksum
 *
 * Forwarding a GSO super-packet to another node (what the agent does with the header):
 * - Nothing. Every weftnet TUN is opened with IFF_VNET_HDR (+ TUNSETVNETLE), and a TUN write accepts the
 *   header a TUN read produced: the receiving kernel either delivers the super-packet locally as one skb
 *   (GRO-like) or segments it by gso_size / completes the partial checksum on the way to a pod. So a
 *   frame carries header + IP packet verbatim and nobody recomputes checksums or splits packets in JS.
 *   test/e2e/tun.test.ts proves it against the kernel (TCP through GSO frames, bytes verified).
 * - Because gso_size was chosen from the SENDER's TUN MTU, every node must use the same TUN MTU.
 * - A peer may send garbage: validate with validateVnetPacket before writing to the TUN (the kernel
 *   would reject most bad headers with EINVAL, but we count the drop as `malformed` instead).
 * - A sender without a vnet-capable TUN (e.g. a future browser member) sends VNET_HDR_NONE (all zero:
 *   no GSO, checksum complete), which every TUN accepts.
 * - A receiver that cannot take GSO (no TUN vnet) would have to segment in software: not implemented;
 *   such a node should not advertise routes (see issue 4).
 */
import { IP_DROPS, type PeekDrop } from "./ip.js";

export const VNET_HDR_LEN = 10;

export const VNET_F_NEEDS_CSUM = 1;
export const VNET_F_DATA_VALID = 2;
export const VNET_F_RSC_INFO = 4;
const VNET_F_KNOWN = VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID | VNET_F_RSC_INFO;

export const VNET_GSO_NONE = 0;
export const VNET_GSO_TCPV4 = 1;
export const VNET_GSO_UDP = 3;
export const VNET_GSO_TCPV6 = 4;
export const VNET_GSO_UDP_L4 = 5;
export const VNET_GSO_ECN = 0x80;

/** Largest IP packet a GSO super-packet can be (IPv6: 40 + 65535). With its header: MAX_VNET_PACKET. */
export const MAX_IP_PACKET = 65575;
export const MAX_VNET_PACKET = VNET_HDR_LEN + MAX_IP_PACKET;

export interface VnetHdr {
  flags: number;
  gsoType: number;
  hdrLen: number;
  gsoSize: number;
  csumStart: number;
  csumOffset: number;
}

/** All zero: a plain packet, checksum complete, no GSO. */
export const VNET_HDR_NONE: Readonly<Uint8Array> = new Uint8Array(VNET_HDR_LEN);

function drop(detail: string): PeekDrop {
  return Object.freeze({ ok: false, reason: "malformed", detail });
}

export const VNET_DROPS = {
  short: drop("packet shorter than the 10-byte virtio-net header"),
  flags: drop("virtio-net header has unknown flag bits"),
  gsoType: drop("virtio-net header has an unknown gso_type"),
  gsoSize: drop("virtio-net GSO packet with gso_size 0"),
  gsoFamily: drop("virtio-net gso_type does not match the IP version"),
  hdrLen: drop("virtio-net hdr_len exceeds the packet"),
  csum: drop("virtio-net checksum position exceeds the packet"),
  tooBig: drop("packet exceeds the 64 KiB GSO limit"),
} as const;

export function readVnetHdr(buf: Uint8Array, offset = 0): VnetHdr | PeekDrop {
  if (!(offset >= 0) || buf.length - offset < VNET_HDR_LEN) return VNET_DROPS.short;
  return {
    flags: buf[offset]!,
    gsoType: buf[offset + 1]!,
    hdrLen: u16le(buf, offset + 2),
    gsoSize: u16le(buf, offset + 4),
    csumStart: u16le(buf, offset + 6),
    csumOffset: u16le(buf, offset + 8),
  };
}

/** Write `h` at `offset` (fields are truncated to their widths). */
export function writeVnetHdr(buf: Uint8Array, offset: number, h: VnetHdr): void {
  buf[offset] = h.flags & 0xff;
  buf[offset + 1] = h.gsoType & 0xff;
  w16le(buf, offset + 2, h.hdrLen);
  w16le(buf, offset + 4, h.gsoSize);
  w16le(buf, offset + 6, h.csumStart);
  w16le(buf, offset + 8, h.csumOffset);
}

export function buildVnetHdr(h: VnetHdr): Uint8Array {
  const b = new Uint8Array(VNET_HDR_LEN);
  writeVnetHdr(b, 0, h);
  return b;
}

/** Is this (vnet header + IP) packet a GSO super-packet? Cheap: one byte. */
export function isGso(pkt: Uint8Array): boolean {
  return pkt.length >= VNET_HDR_LEN && (pkt[1]! & ~VNET_GSO_ECN) !== VNET_GSO_NONE;
}

/**
 * Validate a (vnet header + IP packet) as received from a peer before it is written to the TUN:
 * the header's fields must be consistent with each other and with the IP packet behind it.
 * Returns null when it may be written, else a typed drop. Does not allocate.
 */
export function validateVnetPacket(pkt: Uint8Array): PeekDrop | null {
  const ipLen = pkt.length - VNET_HDR_LEN;
  if (ipLen < 0) return VNET_DROPS.short;
  if (ipLen === 0) return IP_DROPS.empty;
  if (ipLen > MAX_IP_PACKET) return VNET_DROPS.tooBig;
  const flags = pkt[0]!;
  if ((flags & ~VNET_F_KNOWN) !== 0) return VNET_DROPS.flags;
  const gso = pkt[1]! & ~VNET_GSO_ECN;
  const version = pkt[VNET_HDR_LEN]! >> 4;
  if (gso !== VNET_GSO_NONE) {
    if (gso === VNET_GSO_TCPV4) {
      if (version !== 4) return VNET_DROPS.gsoFamily;
    } else if (gso === VNET_GSO_TCPV6) {
      if (version !== 6) return VNET_DROPS.gsoFamily;
    } else if (gso !== VNET_GSO_UDP && gso !== VNET_GSO_UDP_L4) {
      return VNET_DROPS.gsoType;
    }
    if (u16le(pkt, 4) === 0) return VNET_DROPS.gsoSize;
  }
  if (u16le(pkt, 2) > ipLen) return VNET_DROPS.hdrLen;
  if ((flags & VNET_F_NEEDS_CSUM) !== 0 && u16le(pkt, 6) + u16le(pkt, 8) + 2 > ipLen) return VNET_DROPS.csum;
  return null;
}

function u16le(b: Uint8Array, o: number): number {
  return b[o]! | (b[o + 1]! << 8);
}

function w16le(b: Uint8Array, o: number, v: number): void {
  b[o] = v & 0xff;
  b[o + 1] = (v >>> 8) & 0xff;
}
