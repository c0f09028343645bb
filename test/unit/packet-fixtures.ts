/** Packet builders shared by the packet unit tests (and the TUN e2e test). */
/** A minimal well-formed IPv4 header + payload. */
export function ipv4Packet(src: number, dst: number, payload: Uint8Array, proto = 17, ttl = 64): Uint8Array {
  const p = new Uint8Array(20 + payload.length);
  const dv = new DataView(p.buffer);
  p[0] = 0x45;
  dv.setUint16(2, p.length);
  p[8] = ttl;
  p[9] = proto;
  dv.setUint32(12, src >>> 0);
  dv.setUint32(16, dst >>> 0);
  p.set(payload, 20);
  return p;
}

export function ipv6Packet(src: bigint, dst: bigint, payload: Uint8Array, next = 17): Uint8Array {
  const p = new Uint8Array(40 + payload.length);
  const dv = new DataView(p.buffer);
  p[0] = 0x60;
  dv.setUint16(4, payload.length);
  p[6] = next;
  p[7] = 64;
  for (let i = 0; i < 16; i++) {
    p[8 + i] = Number((src >> BigInt((15 - i) * 8)) & 0xffn);
    p[24 + i] = Number((dst >> BigInt((15 - i) * 8)) & 0xffn);
  }
  p.set(payload, 40);
  return p;
}
