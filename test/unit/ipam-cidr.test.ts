import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  CidrError, blockAt, blockCount, blockIndexOf, containsCidr, containsIp, enumerateBlocks, equalCidr, formatCidr,
  formatIp, lastIp, overlaps, parseCidr, parseIp, usableRange,
} from "../../src/ipam/cidr.js";

describe("ipam cidr", () => {
  it("parses and formats addresses", () => {
    expect(parseIp("10.40.0.1")).toBe(0x0a280001);
    expect(parseIp("255.255.255.255")).toBe(0xffffffff);
    expect(parseIp("0.0.0.0")).toBe(0);
    expect(formatIp(0x0a280001)).toBe("10.40.0.1");
    expect(formatIp(0xffffffff)).toBe("255.255.255.255");
  });
  it("rejects malformed addresses", () => {
    for (const s of ["", "10.40.0", "10.40.0.1.2", "256.0.0.1", "01.2.3.4", " 1.2.3.4", "1.2.3.-4", "a.b.c.d", "1..2.3"]) {
      expect(() => parseIp(s), s).toThrow(CidrError);
    }
    expect(() => formatIp(-1)).toThrow(CidrError);
    expect(() => formatIp(2 ** 32)).toThrow(CidrError);
    expect(() => formatIp(1.5)).toThrow(CidrError);
  });
  it("address round-trips", () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: 0xffffffff }), (n) => parseIp(formatIp(n)) === n), { numRuns: 500 });
  });
  it("parses CIDRs and rejects host bits / bad prefixes", () => {
    expect(parseCidr("10.40.0.0/16")).toEqual({ base: 0x0a280000, prefix: 16 });
    expect(parseCidr("0.0.0.0/0")).toEqual({ base: 0, prefix: 0 });
    expect(parseCidr("10.40.1.7/32")).toEqual({ base: 0x0a280107, prefix: 32 });
    for (const s of ["10.40.0.1/16", "10.40.0.0", "10.40.0.0/33", "10.40.0.0/", "10.40.0.0/016", "10.40.0.0/1a", "10.40.0.0/16/1"]) {
      expect(() => parseCidr(s), s).toThrow(CidrError);
    }
    expect(formatCidr(parseCidr("10.40.0.0/16"))).toBe("10.40.0.0/16");
  });
  it("CIDR round-trips for every aligned prefix", () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffffffff }), fc.integer({ min: 0, max: 32 }), (n, p) => {
        const size = 2 ** (32 - p);
        const base = n - (n % size);
        const c = { base, prefix: p };
        expect(parseCidr(formatCidr(c))).toEqual(c);
        expect(containsIp(c, n)).toBe(true);
        expect(lastIp(c) - base + 1).toBe(size);
      }),
      { numRuns: 500 },
    );
  });
  it("contains / overlaps", () => {
    const r = parseCidr("10.40.0.0/16");
    expect(containsIp(r, parseIp("10.40.255.255"))).toBe(true);
    expect(containsIp(r, parseIp("10.41.0.0"))).toBe(false);
    expect(containsIp(r, parseIp("10.39.255.255"))).toBe(false);
    expect(containsCidr(r, parseCidr("10.40.3.0/24"))).toBe(true);
    expect(containsCidr(r, parseCidr("10.0.0.0/8"))).toBe(false);
    expect(overlaps(r, parseCidr("10.0.0.0/8"))).toBe(true);
    expect(overlaps(r, parseCidr("10.41.0.0/16"))).toBe(false);
    expect(equalCidr(r, parseCidr("10.40.0.0/16"))).toBe(true);
  });
  it("enumerates aligned blocks", () => {
    const r = parseCidr("10.40.0.0/16");
    expect(blockCount(r, 26)).toBe(1024);
    const blocks = enumerateBlocks(r, 26);
    expect(blocks).toHaveLength(1024);
    expect(formatCidr(blocks[0]!)).toBe("10.40.0.0/26");
    expect(formatCidr(blocks[1]!)).toBe("10.40.0.64/26");
    expect(formatCidr(blocks[1023]!)).toBe("10.40.255.192/26");
    for (const b of blocks) expect(b.base % 64).toBe(0);
    expect(blockIndexOf(r, 26, parseIp("10.40.0.65"))).toBe(1);
    expect(blockIndexOf(r, 26, parseIp("10.41.0.0"))).toBe(-1);
    expect(() => blockCount(r, 15)).toThrow(CidrError);
    expect(() => blockCount(r, 33)).toThrow(CidrError);
    expect(() => blockAt(r, 26, 1024)).toThrow(CidrError);
  });
  it("blocks partition the range (property)", () => {
    fc.assert(
      fc.property(fc.integer({ min: 8, max: 30 }), fc.integer({ min: 0, max: 8 }), fc.integer({ min: 0, max: 0xffffffff }), (rp, extra, seed) => {
        const bp = Math.min(32, rp + extra);
        const size = 2 ** (32 - rp);
        const r = { base: seed - (seed % size), prefix: rp };
        const n = blockCount(r, bp);
        const ip = r.base + (seed % size);
        const i = blockIndexOf(r, bp, ip);
        expect(i).toBeGreaterThanOrEqual(0);
        expect(i).toBeLessThan(n);
        expect(containsIp(blockAt(r, bp, i), ip)).toBe(true);
        expect(containsCidr(r, blockAt(r, bp, n - 1))).toBe(true);
      }),
      { numRuns: 300 },
    );
  });
  it("usable range skips network and broadcast", () => {
    expect(usableRange(parseCidr("10.40.0.64/26")).map(formatIp)).toEqual(["10.40.0.66", "10.40.0.126"]); // .65 is the node's gateway
    expect(usableRange(parseCidr("10.40.0.64/31")).map(formatIp)).toEqual(["10.40.0.64", "10.40.0.65"]);
  });
});
