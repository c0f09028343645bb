import { randomBytes } from "node:crypto";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  STUN_MAGIC_COOKIE,
  crc32,
  encodeBindingRequest,
  encodeBindingSuccess,
  formatIp,
  parseBindingRequest,
  parseBindingSuccess,
  parseIp,
} from "../../src/wire/stun.js";

const tid = () => new Uint8Array(randomBytes(12));

describe("STUN codec", () => {
  it("parses a Binding request with and without FINGERPRINT", () => {
    const t = tid();
    for (const fingerprint of [false, true]) {
      const r = parseBindingRequest(encodeBindingRequest(t, { fingerprint }));
      expect(r.ok).toBe(true);
      if (r.ok) expect(Buffer.from(r.value.transactionId).equals(Buffer.from(t))).toBe(true);
    }
  });

  it("round-trips XOR-MAPPED-ADDRESS for IPv4 and IPv6", () => {
    const cases = [
      { family: "IPv4" as const, address: "203.0.113.7", port: 54321 },
      { family: "IPv4" as const, address: "0.0.0.0", port: 0 },
      { family: "IPv6" as const, address: "2001:db8::1", port: 3478 },
      { family: "IPv6" as const, address: "fe80::1:2:3:4", port: 65535 },
    ];
    for (const c of cases) {
      const t = tid();
      const r = parseBindingSuccess(encodeBindingSuccess(t, c));
      expect(r.ok).toBe(true);
      if (r.ok) {
        expect(r.value.mapped).toEqual(c);
        expect(Buffer.from(r.value.transactionId).equals(Buffer.from(t))).toBe(true);
      }
    }
  });

  it("answers IPv4-mapped IPv6 senders as IPv4", () => {
    const r = parseBindingSuccess(encodeBindingSuccess(tid(), { family: "IPv6", address: "::ffff:192.0.2.1", port: 9 }));
    expect(r.ok && r.value.mapped).toEqual({ family: "IPv4", address: "192.0.2.1", port: 9 });
  });

  it("matches the RFC 5769 IPv4 response test vector's XOR-MAPPED-ADDRESS", () => {
    // RFC 5769 2.2: mapped address 192.0.2.1:32853, xor'ed value in the attribute: 0xa147 e112a643
    const t = Uint8Array.from(Buffer.from("b7e7a701bc34d686fa87dfae", "hex"));
    const msg = encodeBindingSuccess(t, { family: "IPv4", address: "192.0.2.1", port: 32853 }, { fingerprint: false });
    expect(Buffer.from(msg.subarray(20)).toString("hex")).toBe("002000080001a147e112a643");
  });

  it("computes CRC-32 like zlib", () => {
    expect(crc32(new TextEncoder().encode("123456789"))).toBe(0xcbf43926);
  });

  it("rejects what is not a well-formed Binding request, with a reason", () => {
    const good = encodeBindingRequest(tid(), { fingerprint: true });
    const noCookie = good.slice();
    noCookie[4] = 0;
    const wrongType = encodeBindingRequest(tid());
    wrongType[1] = 0x11; // Binding indication
    const badFp = good.slice();
    badFp[badFp.length - 1]! ^= 1;
    const rfc3489 = good.slice(0, 20);
    new DataView(rfc3489.buffer).setUint32(4, 0x01020304);
    const cases: [Uint8Array, string][] = [
      [new Uint8Array(0), "too-short"],
      [good.subarray(0, 19), "too-short"],
      [new Uint8Array(4000), "too-long"],
      [Uint8Array.from([0x80, ...good.subarray(1)]), "not-stun"],
      [noCookie, "no-magic-cookie"],
      [rfc3489, "no-magic-cookie"],
      [good.subarray(0, good.length - 4), "bad-length"],
      [wrongType, "wrong-type"],
      [badFp, "bad-fingerprint"],
      [encodeBindingSuccess(tid(), { family: "IPv4", address: "1.2.3.4", port: 1 }), "wrong-type"],
    ];
    for (const [buf, reason] of cases) {
      const r = parseBindingRequest(buf);
      expect(r).toMatchObject({ ok: false, reason });
    }
  });

  it("parses and formats IP literals", () => {
    for (const s of ["1.2.3.4", "::", "::1", "2001:db8::", "2001:db8:0:1:1:1:1:1", "fe80::1"]) {
      expect(formatIp(parseIp(s)!)).toBe(s);
    }
    expect(formatIp(parseIp("2001:0db8:0000:0000:0000:0000:0000:0001")!)).toBe("2001:db8::1");
    for (const s of ["1.2.3", "256.1.1.1", "1::2::3", "12345::", "x", "", "1:2:3:4:5:6:7:8:9"]) expect(parseIp(s)).toBeUndefined();
  });

  it("fuzz: random bytes never throw and are rarely accepted", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 2000 }), (buf) => {
        const a = parseBindingRequest(buf);
        const b = parseBindingSuccess(buf);
        if (!a.ok) expect(typeof a.reason).toBe("string");
        if (!b.ok) expect(typeof b.reason).toBe("string");
      }),
      { numRuns: 5000 },
    );
  });

  it("fuzz: random bodies behind a valid header never throw", () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0x3fff }), fc.uint8Array({ maxLength: 200 }), (type, body) => {
        const len = body.length - (body.length % 4);
        const buf = new Uint8Array(20 + len);
        const dv = new DataView(buf.buffer);
        dv.setUint16(0, type);
        dv.setUint16(2, len);
        dv.setUint32(4, STUN_MAGIC_COOKIE);
        buf.set(body.subarray(0, len), 20);
        parseBindingRequest(buf);
        parseBindingSuccess(buf);
      }),
      { numRuns: 5000 },
    );
  });

  it("fuzz: every encoded response round-trips", () => {
    const ipv4 = fc.tuple(fc.nat(255), fc.nat(255), fc.nat(255), fc.nat(255)).map((p) => p.join("."));
    const ipv6 = fc.uint8Array({ minLength: 16, maxLength: 16 }).map((b) => formatIp(b)).filter((s) => !s.startsWith("::ffff:") || s.includes(":", 7));
    fc.assert(
      fc.property(fc.oneof(ipv4.map((a) => ["IPv4", a] as const), ipv6.map((a) => ["IPv6", a] as const)), fc.nat(65535), fc.uint8Array({ minLength: 12, maxLength: 12 }), ([family, address], port, t) => {
        const r = parseBindingSuccess(encodeBindingSuccess(t, { family, address, port }));
        expect(r.ok).toBe(true);
        if (r.ok) expect(formatIp(parseIp(r.value.mapped.address)!)).toBe(formatIp(parseIp(address)!));
        if (r.ok) expect(r.value.mapped.port).toBe(port);
      }),
    );
  });
});
