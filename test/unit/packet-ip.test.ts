import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { ipv4Packet, ipv6Packet } from "./packet-fixtures.js";
import { formatCidr, formatIPv4, formatIPv6, ipv4Dst, parseCidr, parseIPv4, parseIPv6, peekIp } from "../../src/packet/ip.js";

const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u128 = fc.bigInt({ min: 0n, max: (1n << 128n) - 1n });

describe("peekIp", () => {
  it("never throws on random bytes and always returns a header or a typed drop", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 120 }), fc.nat(130), (b, off) => {
        const r = peekIp(b, off);
        if (r.ok) {
          expect(r.totalLength).toBeLessThanOrEqual(b.length - off);
          expect(r.totalLength).toBeGreaterThanOrEqual(r.headerLength);
        } else {
          expect(r.reason).toBe("malformed");
          expect(typeof r.detail).toBe("string");
        }
        const d = ipv4Dst(b, off);
        if (r.ok && r.version === 4) expect(d).toBe(r.dst);
        else expect(d).toBe(-1);
      }),
      { numRuns: 5000 },
    );
  });

  it("reads IPv4 src/dst/length/protocol", () => {
    fc.assert(
      fc.property(u32, u32, fc.uint8Array({ maxLength: 64 }), fc.integer({ min: 0, max: 255 }), (s, d, pl, proto) => {
        const p = ipv4Packet(s, d, pl, proto);
        const r = peekIp(p);
        expect(r).toMatchObject({ ok: true, version: 4, src: s, dst: d, totalLength: p.length, headerLength: 20, protocol: proto, ttl: 64 });
      }),
    );
  });

  it("reads IPv6 src/dst/length behind an offset", () => {
    fc.assert(
      fc.property(u128, u128, fc.uint8Array({ maxLength: 64 }), (s, d, pl) => {
        const p = ipv6Packet(s, d, pl);
        const framed = new Uint8Array(10 + p.length);
        framed.set(p, 10);
        expect(peekIp(framed, 10)).toMatchObject({ ok: true, version: 6, src: s, dst: d, totalLength: p.length, protocol: 17 });
      }),
    );
  });

  it("names what is wrong", () => {
    const good = ipv4Packet(1, 2, new Uint8Array(8));
    expect(peekIp(new Uint8Array(0))).toMatchObject({ ok: false, reason: "malformed" });
    expect(peekIp(good.subarray(0, 19))).toMatchObject({ detail: "IPv4 header shorter than 20 bytes" });
    expect(peekIp(good.subarray(0, 27))).toMatchObject({ detail: "IPv4 total length exceeds the bytes available" });
    const badIhl = good.slice();
    badIhl[0] = 0x44;
    expect(peekIp(badIhl)).toMatchObject({ detail: "IPv4 IHL below 5" });
    const v5 = good.slice();
    v5[0] = 0x55;
    expect(peekIp(v5)).toMatchObject({ detail: "IP version is neither 4 nor 6" });
    expect(peekIp(ipv6Packet(1n, 2n, new Uint8Array(4)).subarray(0, 43))).toMatchObject({ ok: false });
    // trailing padding is fine
    const padded = new Uint8Array(good.length + 6);
    padded.set(good);
    expect(peekIp(padded)).toMatchObject({ ok: true, totalLength: good.length });
  });
});

describe("address text", () => {
  it("IPv4 round-trips and rejects junk", () => {
    fc.assert(fc.property(u32, (n) => { expect(parseIPv4(formatIPv4(n))).toBe(n); }));
    for (const bad of ["", "1.2.3", "1.2.3.256", "01.2.3.4", "1.2.3.4.5", " 1.2.3.4", "a.b.c.d"]) expect(parseIPv4(bad)).toBeUndefined();
  });

  it("IPv6 round-trips, compresses, accepts an IPv4 tail", () => {
    fc.assert(fc.property(u128, (n) => { expect(parseIPv6(formatIPv6(n))).toBe(n); }));
    expect(formatIPv6(parseIPv6("fd00:0:0:0:0:0:0:1")!)).toBe("fd00::1");
    expect(parseIPv6("::ffff:10.0.0.1")).toBe(0xffff0a000001n);
    expect(formatIPv6(0n)).toBe("::");
    for (const bad of ["", ":::", "1::2::3", "12345::", "g::1", "1:2:3:4:5:6:7:8:9"]) expect(parseIPv6(bad)).toBeUndefined();
  });

  it("CIDRs mask host bits", () => {
    expect(formatCidr(parseCidr("10.40.1.5/16")!)).toBe("10.40.0.0/16");
    expect(formatCidr(parseCidr("0.0.0.0/0")!)).toBe("0.0.0.0/0");
    expect(formatCidr(parseCidr("fd00:1:2::7/48")!)).toBe("fd00:1:2::/48");
    for (const bad of ["10.0.0.0", "10.0.0.0/33", "10.0.0.0/-1", "fd00::/129", "x/8"]) expect(parseCidr(bad)).toBeUndefined();
  });
});
