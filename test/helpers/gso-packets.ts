/**
 * TCP GSO super-packets as a TUN hands them over: a virtio-net header (NEEDS_CSUM, gso_type TCPV4 or
 * TCPV6, gso_size = mss, csum at the TCP header) and one TCP segment of `payload` bytes from port 40000
 * to 5201 (ACK, window 65535): 10.40.0.1 -> 10.40.1.1, or fd00::1 -> fd00::2. `payload` is the bytes, or
 * a length (zero-filled). For the bulk link's tests and bench:bulk.
 */
import { VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_HDR_LEN, writeVnetHdr } from "../../src/packet/vnet.js";

function superPacket(v6: boolean, payload: Uint8Array | number, mss: number, seq: number): Uint8Array {
  const len = typeof payload === "number" ? payload : payload.length;
  const ipHdr = v6 ? 40 : 20;
  const p = new Uint8Array(VNET_HDR_LEN + ipHdr + 20 + len);
  const dv = new DataView(p.buffer);
  writeVnetHdr(p, 0, { flags: VNET_F_NEEDS_CSUM, gsoType: v6 ? VNET_GSO_TCPV6 : VNET_GSO_TCPV4, hdrLen: ipHdr + 20, gsoSize: mss, csumStart: ipHdr, csumOffset: 16 });
  const ip = VNET_HDR_LEN;
  if (v6) {
    p[ip] = 0x60;
    dv.setUint16(ip + 4, 20 + len);
    p[ip + 6] = 6;
    p[ip + 7] = 64;
    p.set([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], ip + 8);
    p.set([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], ip + 24);
  } else {
    p[ip] = 0x45;
    dv.setUint16(ip + 2, 40 + len);
    p[ip + 6] = 0x40; // DF
    p[ip + 8] = 64;
    p[ip + 9] = 6;
    dv.setUint32(ip + 12, 0x0a280001);
    dv.setUint32(ip + 16, 0x0a280101);
  }
  const t = ip + ipHdr;
  dv.setUint16(t, 40000);
  dv.setUint16(t + 2, 5201);
  dv.setUint32(t + 4, seq >>> 0);
  dv.setUint32(t + 8, 1);
  p[t + 12] = 5 << 4;
  p[t + 13] = 0x10; // ACK
  dv.setUint16(t + 14, 65535);
  if (typeof payload !== "number") p.set(payload, t + 20);
  return p;
}

/** An IPv4 TCP GSO super-packet (virtio TCPV4). */
export const tcpGso = (payload: Uint8Array | number, mss: number, seq: number): Uint8Array => superPacket(false, payload, mss, seq);
/** An IPv6 TCP GSO super-packet (virtio TCPV6). */
export const tcpGso6 = (payload: Uint8Array | number, mss: number, seq: number): Uint8Array => superPacket(true, payload, mss, seq);
