import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { completeChecksum, fold, segmentTcp, sum16 } from "../../src/packet/tso.js";
import { VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_HDR_LEN } from "../../src/packet/vnet.js";

/** A TCP GSO super-packet as a TUN hands it over: partial checksum (pseudo header) in the TCP field. */
function gsoPacket(v6: boolean, payload: Uint8Array, mss: number, seq: number, flags: number, id: number): Uint8Array {
  const ipHl = v6 ? 40 : 20;
  const tcpHl = 20;
  const total = ipHl + tcpHl + payload.length;
  const p = new Uint8Array(VNET_HDR_LEN + total);
  const dv = new DataView(p.buffer);
  p[0] = VNET_F_NEEDS_CSUM;
  p[1] = v6 ? VNET_GSO_TCPV6 : VNET_GSO_TCPV4;
  dv.setUint16(2, ipHl + tcpHl, true);
  dv.setUint16(4, mss, true);
  dv.setUint16(6, ipHl, true);
  dv.setUint16(8, 16, true);
  const ip = VNET_HDR_LEN;
  if (v6) {
    p[ip] = 0x60;
    dv.setUint16(ip + 4, tcpHl + payload.length);
    p[ip + 6] = 6;
    p[ip + 7] = 64;
    for (let i = 0; i < 32; i++) p[ip + 8 + i] = (i * 37 + 11) & 255;
  } else {
    p[ip] = 0x45;
    dv.setUint16(ip + 2, total);
    dv.setUint16(ip + 4, id);
    p[ip + 8] = 64;
    p[ip + 9] = 6;
    dv.setUint32(ip + 12, 0x0a280001);
    dv.setUint32(ip + 16, 0x0a280102);
  }
  const t = ip + ipHl;
  dv.setUint16(t, 40000);
  dv.setUint16(t + 2, 5201);
  dv.setUint32(t + 4, seq >>> 0);
  dv.setUint32(t + 8, 12345);
  p[t + 12] = 5 << 4;
  p[t + 13] = flags;
  dv.setUint16(t + 14, 65535);
  p.set(payload, t + tcpHl);
  return p;
}

/** Reference: the full TCP checksum of a plain packet computed from scratch. */
function tcpChecksumOk(seg: Uint8Array, v6: boolean): boolean {
  const ip = VNET_HDR_LEN;
  const ipHl = v6 ? 40 : (seg[ip]! & 15) * 4;
  const tcpLen = seg.length - ip - ipHl;
  let s = v6 ? sum16(seg, ip + 8, ip + 40) : sum16(seg, ip + 12, ip + 20);
  s += 6 + tcpLen;
  s = sum16(seg, ip + ipHl, seg.length, s);
  return fold(s) === 0xffff;
}

describe("software TCP segmentation (bulk stop-gap)", () => {
  it("splits GSO packets into MSS segments whose bytes, sequence numbers and checksums are right", () => {
    fc.assert(
      fc.property(fc.boolean(), fc.uint8Array({ minLength: 1, maxLength: 20_000 }), fc.integer({ min: 100, max: 1460 }), fc.nat(), fc.integer({ min: 0, max: 255 }), fc.integer({ min: 0, max: 65535 }), (v6, payload, mss, seq, flags, id) => {
        const pkt = gsoPacket(v6, payload, mss, seq, flags, id);
        const scratch = new Uint8Array(70_000);
        const segs: Uint8Array[] = [];
        const n = segmentTcp(pkt, scratch, (s) => segs.push(Uint8Array.from(s)));
        expect(n).toBe(Math.ceil(payload.length / mss));
        const ipHl = v6 ? 40 : 20;
        const hs = VNET_HDR_LEN + ipHl + 20;
        const joined = new Uint8Array(payload.length);
        let off = 0;
        segs.forEach((s, i) => {
          expect(s[1]).toBe(0); // gso NONE
          const dv = new DataView(s.buffer);
          const ip = VNET_HDR_LEN;
          if (v6) expect(dv.getUint16(ip + 4)).toBe(s.length - ip - 40);
          else {
            expect(dv.getUint16(ip + 2)).toBe(s.length - ip);
            expect(fold(sum16(s, ip, ip + 20))).toBe(0xffff);
            expect(dv.getUint16(ip + 4)).toBe((id + i) & 0xffff);
          }
          const t = ip + ipHl;
          expect(dv.getUint32(t + 4)).toBe((seq + off) >>> 0);
          const fl = s[t + 13]!;
          if (i < n - 1) expect(fl & 0x09).toBe(0);
          else expect(fl & 0x09).toBe(flags & 0x09);
          if (i > 0) expect(fl & 0x80).toBe(0);
          joined.set(s.subarray(hs), off);
          off += s.length - hs;
          completeChecksum(s);
          expect(tcpChecksumOk(s, v6)).toBe(true);
        });
        expect(off).toBe(payload.length);
        expect(Buffer.from(joined).equals(Buffer.from(payload))).toBe(true);
      }),
      { numRuns: 200 },
    );
  });

  it("passes plain packets through and refuses what it cannot segment", () => {
    const plain = new Uint8Array(VNET_HDR_LEN + 40);
    plain[VNET_HDR_LEN] = 0x45;
    const seen: Uint8Array[] = [];
    expect(segmentTcp(plain, new Uint8Array(100), (s) => seen.push(s))).toBe(1);
    expect(seen[0]).toBe(plain);
    const udp = gsoPacket(false, new Uint8Array(3000), 1000, 0, 0, 0);
    udp[1] = 5; // UDP_L4
    expect(segmentTcp(udp, new Uint8Array(5000), () => {})).toBe(0);
  });
});
