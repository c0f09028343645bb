import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  DEFAULT_TTL,
  FRAME_HEADER_LEN,
  FrameEncoder,
  MAX_SINGLE_PACKET_FRAME,
  decodeFrame,
  decrementTtl,
  encodeFrames,
  frameDst,
  frameDstIs,
  nodeIdFromBytes,
  nodeIdToBytes,
  peekFrameHeader,
} from "../../src/packet/frame.js";
import { VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, VNET_HDR_LEN, writeVnetHdr } from "../../src/packet/vnet.js";
import { ipv4Packet, ipv6Packet } from "./packet-fixtures.js";

const nodeId = fc.stringMatching(/^[0-9a-f]{16}$/);

/** A valid vnet-header + IP packet: plain, or a TCPv4 GSO super-packet up to 64 KB. */
const vnetPacket = fc.oneof(
  fc.tuple(fc.integer({ min: 0, max: 1400 }), fc.boolean()).map(([n, v6]) => {
    const ip = v6 ? ipv6Packet(7n, 9n, new Uint8Array(n).fill(n & 0xff)) : ipv4Packet(7, 9, new Uint8Array(n).fill(n & 0xff));
    const p = new Uint8Array(VNET_HDR_LEN + ip.length);
    p.set(ip, VNET_HDR_LEN);
    return p;
  }),
  fc.integer({ min: 1500, max: 65535 - 20 }).map((n) => {
    const ip = ipv4Packet(7, 9, new Uint8Array(n).fill(0xab), 6);
    const p = new Uint8Array(VNET_HDR_LEN + ip.length);
    writeVnetHdr(p, 0, { flags: VNET_F_NEEDS_CSUM, gsoType: VNET_GSO_TCPV4, hdrLen: 52, gsoSize: 1448, csumStart: 20, csumOffset: 16 });
    p.set(ip, VNET_HDR_LEN);
    return p;
  }),
);

describe("node ids", () => {
  it("round-trip through 8 bytes", () => {
    fc.assert(fc.property(nodeId, (id) => { expect(nodeIdFromBytes(nodeIdToBytes(id))).toBe(id); }));
    expect(() => nodeIdToBytes("ABCDEF0123456789")).toThrow(/16 lowercase hex/);
    expect(() => nodeIdToBytes("abc")).toThrow();
  });

  it("reads the right id through its cache: ids sharing a cache slot, in any order, at any offset", () => {
    // the cache is direct-mapped by the last byte: ids that differ in any other byte share a slot
    fc.assert(
      fc.property(fc.array(fc.tuple(nodeId, fc.integer({ min: 0, max: 5 })), { minLength: 1, maxLength: 40 }), fc.stringMatching(/^[0-9a-f]{2}$/), (ids, last) => {
        for (const [raw, off] of ids) {
          const id = raw.slice(0, 14) + last;
          const buf = new Uint8Array(off + 8 + 3).fill(0xee);
          buf.set(nodeIdToBytes(id), off);
          expect(nodeIdFromBytes(buf, off)).toBe(id);
          expect(nodeIdFromBytes(buf, off)).toBe(id); // the cached copy
        }
      }),
    );
  });
});

describe("frame codec", () => {
  it("round-trips coalesced batches within the max message size", () => {
    fc.assert(
      fc.property(nodeId, nodeId, fc.array(vnetPacket, { minLength: 1, maxLength: 12 }), fc.integer({ min: 1, max: 255 }), fc.integer({ min: 0, max: 3 }), (s, d, pkts, ttl, sizeSel) => {
        const maxMessageSize = [MAX_SINGLE_PACKET_FRAME, 200_000, 4096, 1500][sizeSel]!;
        const enc = new FrameEncoder({ maxMessageSize, slabSize: 256 * 1024 });
        const { frames, dropped } = encodeFrames(nodeIdToBytes(s), nodeIdToBytes(d), pkts, { ttl, encoder: enc });
        const out: Uint8Array[] = [];
        for (const f of frames) {
          expect(f.length).toBeLessThanOrEqual(maxMessageSize);
          const r = decodeFrame(f, { maxMessageSize });
          if (!r.ok) throw new Error(r.detail);
          expect(r).toMatchObject({ version: 1, flags: 0, ttl, src: s, dst: d });
          expect(r.packets.length).toBeGreaterThan(0);
          out.push(...r.packets);
        }
        // every packet arrives, in order, except the ones the encoder said were too big
        const expected = pkts.filter((_, i) => !dropped.some((x) => x.packet === i));
        expect(dropped.every((x) => x.reason === "too-big" && FRAME_HEADER_LEN + 4 + pkts[x.packet]!.length > maxMessageSize)).toBe(true);
        expect(out.map((p) => Buffer.from(p).toString("base64"))).toEqual(expected.map((p) => Buffer.from(p).toString("base64")));
        // coalescing is greedy: no two consecutive frames could have been merged
        for (let i = 1; i < frames.length; i++) {
          const firstOfNext = decodeFrame(frames[i]!);
          if (firstOfNext.ok) expect(frames[i - 1]!.length + 4 + firstOfNext.packets[0]!.length).toBeGreaterThan(maxMessageSize);
        }
      }),
      { numRuns: 300 },
    );
  });

  it("frames handed out stay intact while the encoder keeps going (slab is never overwritten)", () => {
    const enc = new FrameEncoder({ maxMessageSize: 2000, slabSize: 4096 });
    const src = nodeIdToBytes("0000000000000001");
    const dst = nodeIdToBytes("0000000000000002");
    const kept: { f: Uint8Array; copy: Uint8Array }[] = [];
    for (let i = 0; i < 50; i++) {
      enc.begin(src, dst);
      const p = new Uint8Array(VNET_HDR_LEN + 100);
      p.set(ipv4Packet(i, i, new Uint8Array(80).fill(i)), VNET_HDR_LEN);
      expect(enc.add(p)).toBe("ok");
      const f = enc.finish()!;
      kept.push({ f, copy: f.slice() });
    }
    for (const k of kept) expect(k.f).toEqual(k.copy);
    enc.begin(src, dst);
    expect(enc.finish()).toBeUndefined();
  });

  it("decoding garbage never throws and returns a typed drop", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), (b) => {
        const r = decodeFrame(b);
        if (!r.ok) expect(["malformed", "bad-version", "ttl-expired", "too-big"]).toContain(r.reason);
      }),
      { numRuns: 5000 },
    );
  });

  it("mutated valid frames never throw, and decode only to well-formed packets", () => {
    fc.assert(
      fc.property(nodeId, nodeId, fc.array(vnetPacket, { minLength: 1, maxLength: 3 }), fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 6 }), fc.nat(), (s, d, pkts, muts, cut) => {
        const { frames } = encodeFrames(nodeIdToBytes(s), nodeIdToBytes(d), pkts.filter((p) => p.length < 2000), { maxMessageSize: 1 << 20 });
        for (const f0 of frames) {
          const f = f0.slice(0, f0.length - (cut % 3 === 0 ? cut % 40 : 0));
          for (const [at, v] of muts) f[at % f.length] = v;
          const r = decodeFrame(f);
          if (r.ok) {
            let total = FRAME_HEADER_LEN;
            for (const p of r.packets) total += 4 + p.length;
            expect(total).toBe(f.length);
          }
        }
      }),
      { numRuns: 500 },
    );
  });

  it("names structural errors", () => {
    const ip = ipv4Packet(1, 2, new Uint8Array(10));
    const p = new Uint8Array(VNET_HDR_LEN + ip.length);
    p.set(ip, VNET_HDR_LEN);
    const { frames } = encodeFrames(nodeIdToBytes("00000000000000aa"), nodeIdToBytes("00000000000000bb"), [p, p]);
    const f = frames[0]!;
    expect(decodeFrame(f)).toMatchObject({ ok: true, ttl: DEFAULT_TTL });
    expect(decodeFrame(f.subarray(0, f.length - 1))).toMatchObject({ ok: false, reason: "malformed" });
    const v2 = f.slice();
    v2[0] = 0x20;
    expect(decodeFrame(v2)).toMatchObject({ ok: false, reason: "bad-version" });
    const flags = f.slice();
    flags[0] = 0x1f; // unknown flags are ignored
    expect(decodeFrame(flags)).toMatchObject({ ok: true, flags: 0xf });
    expect(decodeFrame(f, { maxMessageSize: f.length - 1 })).toMatchObject({ ok: false, reason: "too-big" });
    const longer = new Uint8Array(f.length + 3);
    longer.set(f);
    expect(decodeFrame(longer)).toMatchObject({ ok: false, detail: "frame ends inside a record length" });
    const zeroLen = new Uint8Array(f.length + 4);
    zeroLen.set(f);
    expect(decodeFrame(zeroLen)).toMatchObject({ ok: false, detail: "frame record length out of range" });
    const badLen = f.slice();
    badLen[FRAME_HEADER_LEN + 3] = 200; // first record claims more IP bytes than its header says
    expect(decodeFrame(badLen)).toMatchObject({ ok: false, reason: "malformed" });
  });

  it("transit: header peek, destination compare and ttl decrement in place", () => {
    const ip = ipv4Packet(1, 2, new Uint8Array(10));
    const p = new Uint8Array(VNET_HDR_LEN + ip.length);
    p.set(ip, VNET_HDR_LEN);
    const { frames } = encodeFrames(nodeIdToBytes("0123456789abcdef"), nodeIdToBytes("fedcba9876543210"), [p], { ttl: 3 });
    const f = frames[0]!;
    const payload = f.slice(FRAME_HEADER_LEN);
    expect(peekFrameHeader(f)).toMatchObject({ ok: true, ttl: 3, src: "0123456789abcdef", dst: "fedcba9876543210" });
    expect(frameDst(f)).toBe("fedcba9876543210");
    expect(frameDstIs(f, nodeIdToBytes("fedcba9876543210"))).toBe(true);
    expect(frameDstIs(f, nodeIdToBytes("0123456789abcdef"))).toBe(false);
    expect(decrementTtl(f)).toBe(2);
    expect(decrementTtl(f)).toBe(1);
    expect(decrementTtl(f)).toMatchObject({ ok: false, reason: "ttl-expired" });
    expect(f.subarray(FRAME_HEADER_LEN)).toEqual(payload);
    expect(decodeFrame(f)).toMatchObject({ ok: true, ttl: 1 });
    f[1] = 0;
    expect(decodeFrame(f)).toMatchObject({ ok: false, reason: "ttl-expired" });
  });

  it("encoder rejects what cannot be framed", () => {
    const enc = new FrameEncoder({ maxMessageSize: 100 });
    enc.begin(nodeIdToBytes("0000000000000001"), nodeIdToBytes("0000000000000002"));
    expect(enc.add(new Uint8Array(5))).toBe("malformed");
    expect(enc.add(new Uint8Array(200))).toBe("too-big");
    expect(() => new FrameEncoder({ maxMessageSize: 10 })).toThrow();
    expect(() => enc.begin(new Uint8Array(8), new Uint8Array(8), 0)).toThrow(/ttl/);
  });
});
