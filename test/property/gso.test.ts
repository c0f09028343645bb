/**
 * Software GSO (src/packet/gso.ts) and userspace GRO (src/packet/gro.ts) against a slow reference model,
 * with random packets: IPv4 (with options) and IPv6 (with extension headers), TCP options, odd sizes and
 * segment sizes, random flags. What goes in comes out, byte for byte; every checksum is valid once
 * completed the way the kernel completes a NEEDS_CSUM packet.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { ByteArena, segment, segmentBatch, GSO_DROPS, TCP_ACK, TCP_CWR, TCP_FIN, TCP_PSH, TCP_ECE } from "../../src/packet/gso.js";
import { coalesce } from "../../src/packet/gro.js";
import { peekIp } from "../../src/packet/ip.js";
import { validateVnetPacket, VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_GSO_UDP_L4, VNET_HDR_LEN } from "../../src/packet/vnet.js";
import { decodeFrame, encodeFrames } from "../../src/packet/frame.js";

// ---- slow reference model ----------------------------------------------------------------------------

/** Naive ones'-complement checksum over a list of byte arrays treated as one stream. */
function naiveSum(parts: number[][]): number {
  const bytes = parts.flat();
  let s = 0;
  for (let i = 0; i < bytes.length; i += 2) s += (bytes[i]! << 8) + (bytes[i + 1] ?? 0);
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return s;
}

function ipHeaderLen(p: Uint8Array): { ipHdr: number; proto: number } {
  const ip = p.subarray(VNET_HDR_LEN);
  if (ip[0]! >> 4 === 4) return { ipHdr: (ip[0]! & 15) * 4, proto: ip[9]! };
  let hdr = 40;
  let nh = ip[6]!;
  while (nh === 0 || nh === 43 || nh === 60) {
    const next = ip[hdr]!;
    hdr += (ip[hdr + 1]! + 1) * 8;
    nh = next;
  }
  return { ipHdr: hdr, proto: nh };
}

function pseudo(ip: Uint8Array, proto: number, len: number): number[] {
  if (ip[0]! >> 4 === 4) return [...ip.subarray(12, 20), 0, proto, len >> 8, len & 255];
  return [...ip.subarray(8, 40), (len >>> 24) & 255, (len >>> 16) & 255, (len >>> 8) & 255, len & 255, 0, 0, 0, proto];
}

/** Complete a NEEDS_CSUM packet as the kernel does; returns a copy. */
function complete(p: Uint8Array): Uint8Array {
  const c = Uint8Array.from(p);
  if (c[0]! & 1) {
    const start = VNET_HDR_LEN + (c[6]! | (c[7]! << 8));
    const off = start + (c[8]! | (c[9]! << 8));
    const s = ~naiveSum([[...c.subarray(start)]]) & 0xffff;
    c[off] = s >> 8;
    c[off + 1] = s & 255;
  }
  return c;
}

/** L4 checksum valid (after completion) and, for IPv4, the header checksum valid. */
function checksumsValid(p: Uint8Array): boolean {
  const c = complete(p);
  const ip = c.subarray(VNET_HDR_LEN);
  const { ipHdr, proto } = ipHeaderLen(c);
  if (ip[0]! >> 4 === 4 && naiveSum([[...ip.subarray(0, ipHdr)]]) !== 0xffff) return false;
  const l4 = ip.subarray(ipHdr);
  return naiveSum([pseudo(ip, proto, l4.length), [...l4]]) === 0xffff;
}

interface Seg {
  flow: string;
  seq: number;
  flags: number;
  payload: number[];
}

/** The reference segmentation: what the kernel would put on the wire for a GSO super-packet (or any packet). */
function refSegments(p: Uint8Array, maxIp = Infinity): Seg[] {
  const ip = p.subarray(VNET_HDR_LEN);
  const { ipHdr } = ipHeaderLen(p);
  const t = ip.subarray(ipHdr);
  const thl = (t[12]! >> 4) * 4;
  const payload = [...t.subarray(thl)];
  const gso = p[1]! & 0x7f;
  const gsoSize = gso ? p[4]! | (p[5]! << 8) : payload.length;
  const seg = Math.max(1, Math.min(gsoSize, maxIp - ipHdr - thl));
  const seq0 = new DataView(t.buffer, t.byteOffset).getUint32(4);
  const flow = flowOf(p);
  const out: Seg[] = [];
  const n = Math.max(1, Math.ceil(payload.length / seg));
  for (let i = 0; i < n; i++) {
    let f = t[13]!;
    if (i < n - 1) f &= ~(TCP_FIN | TCP_PSH);
    if (i > 0) f &= ~TCP_CWR;
    out.push({ flow, seq: (seq0 + i * seg) >>> 0, flags: f, payload: payload.slice(i * seg, (i + 1) * seg) });
  }
  return out;
}

function flowOf(p: Uint8Array): string {
  const ip = p.subarray(VNET_HDR_LEN);
  const { ipHdr } = ipHeaderLen(p);
  const addrs = ip[0]! >> 4 === 4 ? ip.subarray(12, 20) : ip.subarray(8, 40);
  return [...addrs, ...ip.subarray(ipHdr, ipHdr + 4)].join(".");
}

/** What a packet is on the wire, as reference segments (kernel semantics: GSO ones split by gso_size). */
function onWire(p: Uint8Array): Seg[] {
  return refSegments(p);
}

// ---- random packets ------------------------------------------------------------------------------------

interface PacketSpec {
  v6: boolean;
  ipOpts: number; // IPv4 option words / IPv6 dest-options headers
  tcpOpts: number[];
  seq: number;
  ack: number;
  flags: number;
  payload: Uint8Array;
  gsoSize: number;
  id: number;
  tos: number;
  addrs: number[];
  ports: number[];
}

const specArb = (maxPayload: number): fc.Arbitrary<PacketSpec> =>
  fc.record({
    v6: fc.boolean(),
    ipOpts: fc.integer({ min: 0, max: 2 }),
    tcpOpts: fc.array(fc.integer({ min: 0, max: 255 }), { maxLength: 40 }).map((a) => a.slice(0, a.length - (a.length % 4))),
    seq: fc.integer({ min: 0, max: 0xffffffff }),
    ack: fc.integer({ min: 0, max: 0xffffffff }),
    flags: fc.subarray([TCP_PSH, TCP_FIN, TCP_CWR, TCP_ECE]).map((fs) => fs.reduce((a, b) => a | b, TCP_ACK)),
    payload: fc.uint8Array({ minLength: 1, maxLength: maxPayload }),
    gsoSize: fc.integer({ min: 1, max: 9000 }),
    id: fc.integer({ min: 0, max: 0xffff }),
    tos: fc.integer({ min: 0, max: 255 }),
    addrs: fc.array(fc.integer({ min: 0, max: 255 }), { minLength: 32, maxLength: 32 }),
    ports: fc.array(fc.integer({ min: 0, max: 255 }), { minLength: 4, maxLength: 4 }),
  });

/** Build (vnet header + IP) for a spec: a GSO super-packet when gso, else a plain one. Checksum partial. */
function build(s: PacketSpec, gso: boolean): Uint8Array {
  const ipHdr = s.v6 ? 40 + s.ipOpts * 8 : 20 + s.ipOpts * 4;
  const thl = 20 + s.tcpOpts.length;
  const len = ipHdr + thl + s.payload.length;
  const p = new Uint8Array(VNET_HDR_LEN + len);
  const ip = p.subarray(VNET_HDR_LEN);
  const dv = new DataView(ip.buffer, ip.byteOffset);
  if (s.v6) {
    ip[0] = 0x60 | (s.tos >> 4);
    ip[1] = (s.tos & 15) << 4;
    dv.setUint16(4, len - 40);
    ip[6] = s.ipOpts ? 60 : 6;
    ip[7] = 64;
    ip.set(s.addrs, 8);
    for (let k = 0; k < s.ipOpts; k++) {
      const o = 40 + k * 8;
      ip[o] = k === s.ipOpts - 1 ? 6 : 60;
      ip[o + 1] = 0;
      ip[o + 2] = 1; // PadN
      ip[o + 3] = 4;
    }
  } else {
    ip[0] = 0x40 | (ipHdr / 4);
    ip[1] = s.tos;
    dv.setUint16(2, len);
    dv.setUint16(4, s.id);
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip.set(s.addrs.slice(0, 8), 12);
    for (let k = 20; k < ipHdr; k++) ip[k] = 1; // NOP options
    const c = ~naiveSum([[...ip.subarray(0, ipHdr)]]) & 0xffff;
    dv.setUint16(10, c);
  }
  const t = ip.subarray(ipHdr);
  const tv = new DataView(t.buffer, t.byteOffset);
  t.set(s.ports, 0);
  tv.setUint32(4, s.seq);
  tv.setUint32(8, s.ack);
  t[12] = (thl / 4) << 4;
  t[13] = s.flags;
  tv.setUint16(14, 65535);
  t.set(s.tcpOpts, 20);
  t.set(s.payload, thl);
  // checksum: pseudo-header sum, partial (as the kernel hands GSO packets over)
  tv.setUint16(16, naiveSum([pseudo(ip, 6, thl + s.payload.length)]));
  p[0] = 1;
  p[1] = gso ? (s.v6 ? VNET_GSO_TCPV6 : VNET_GSO_TCPV4) : 0;
  new DataView(p.buffer).setUint16(2, ipHdr + thl, true);
  new DataView(p.buffer).setUint16(4, gso ? s.gsoSize : 0, true);
  new DataView(p.buffer).setUint16(6, ipHdr, true);
  new DataView(p.buffer).setUint16(8, 16, true);
  return p;
}

function asSeg(p: Uint8Array): Seg {
  const r = refSegments(p);
  expect(r.length).toBe(1);
  return r[0]!;
}

// ---- properties ---------------------------------------------------------------------------------------

describe("software GSO", () => {
  it("splits any TCP super-packet into valid packets of at most maxIp that carry the same bytes", () => {
    fc.assert(
      fc.property(specArb(20000), fc.integer({ min: 576, max: 9000 }), fc.constantFrom<"partial" | "full">("partial", "full"), (s, maxIp, csum) => {
        const p = build(s, true);
        const arena = new ByteArena(4096);
        const out: Uint8Array[] = [];
        expect(segment(p, { maxIp, csum }, arena, out)).toBeNull();
        const want = refSegments(p, maxIp);
        expect(out.length).toBe(want.length);
        const ipHdr = ipHeaderLen(p).ipHdr;
        for (let i = 0; i < out.length; i++) {
          const o = out[i]!;
          expect(o.length - VNET_HDR_LEN).toBeLessThanOrEqual(Math.max(maxIp, ipHdr + 20 + s.tcpOpts.length + 1));
          expect(validateVnetPacket(o)).toBeNull();
          const h = peekIp(o, VNET_HDR_LEN);
          expect(h.ok && h.totalLength === o.length - VNET_HDR_LEN).toBe(true);
          expect(o[1]).toBe(0); // no GSO left
          if (csum === "full") expect([...o.subarray(0, 10)]).toEqual(new Array(10).fill(0));
          expect(checksumsValid(o)).toBe(true);
          expect(asSeg(o)).toEqual(want[i]);
          // headers other than the fixed-up fields are the original's
          const oi = o.subarray(VNET_HDR_LEN);
          const pi = p.subarray(VNET_HDR_LEN);
          if (!s.v6) {
            expect(oi[1]).toBe(pi[1]);
            expect(new DataView(oi.buffer, oi.byteOffset).getUint16(4)).toBe((s.id + i) & 0xffff);
            expect([...oi.subarray(6, 10)]).toEqual([...pi.subarray(6, 10)]);
            expect([...oi.subarray(12, ipHdr)]).toEqual([...pi.subarray(12, ipHdr)]);
          } else {
            expect([...oi.subarray(0, 4)]).toEqual([...pi.subarray(0, 4)]);
            expect([...oi.subarray(6, ipHdr)]).toEqual([...pi.subarray(6, ipHdr)]);
          }
          expect([...oi.subarray(ipHdr + 8, ipHdr + 12)]).toEqual([...pi.subarray(ipHdr + 8, ipHdr + 12)]); // ack
          expect([...oi.subarray(ipHdr + 14, ipHdr + 16)]).toEqual([...pi.subarray(ipHdr + 14, ipHdr + 16)]); // window
          expect([...oi.subarray(ipHdr + 20, ipHdr + 20 + s.tcpOpts.length)]).toEqual(s.tcpOpts);
        }
      }),
      { numRuns: 300 },
    );
  });

  it("passes small and non-TCP packets through untouched and fits segments into one frame record each", () => {
    fc.assert(
      fc.property(specArb(1000), (s) => {
        const p = build(s, false);
        const out: Uint8Array[] = [];
        segment(p, { maxIp: 1500 }, new ByteArena(), out);
        expect(out).toEqual([p]);
        expect(out[0]).toBe(p);
        const { frames } = encodeFrames(new Uint8Array(8), new Uint8Array(8).fill(1), out, { maxMessageSize: 1500 + 32 });
        const f = decodeFrame(frames[0]!);
        expect(f.ok && f.packets.length === 1).toBe(true);
      }),
    );
  });

  it("splits UDP_L4 (USO) by gso_size with valid checksums", () => {
    fc.assert(
      fc.property(fc.boolean(), fc.uint8Array({ minLength: 1, maxLength: 9000 }), fc.integer({ min: 1, max: 2000 }), (v6, payload, gsoSize) => {
        const s: PacketSpec = { v6, ipOpts: 0, tcpOpts: [], seq: 0, ack: 0, flags: 0, payload, gsoSize, id: 7, tos: 0, addrs: new Array(32).fill(9), ports: [1, 2, 3, 4] };
        const p = build(s, true);
        const ip = p.subarray(VNET_HDR_LEN);
        const ipHdr = v6 ? 40 : 20;
        // turn the TCP header into UDP: 8-byte header + payload
        const u = new Uint8Array(VNET_HDR_LEN + ipHdr + 8 + payload.length);
        u.set(p.subarray(0, VNET_HDR_LEN + ipHdr));
        const ui = u.subarray(VNET_HDR_LEN);
        const dv = new DataView(ui.buffer, ui.byteOffset);
        if (v6) {
          dv.setUint16(4, 8 + payload.length);
          ui[6] = 17;
        } else {
          dv.setUint16(2, 28 + payload.length);
          ui[9] = 17;
        }
        void ip;
        ui.set([1, 2, 3, 4], ipHdr);
        dv.setUint16(ipHdr + 4, 8 + payload.length);
        ui.set(payload, ipHdr + 8);
        u[1] = VNET_GSO_UDP_L4;
        u[8] = 6;
        const out: Uint8Array[] = [];
        expect(segment(u, { maxIp: 1280 }, new ByteArena(), out)).toBeNull();
        expect(out.length).toBe(Math.ceil(payload.length / gsoSize));
        const got: number[] = [];
        for (const o of out) {
          expect(validateVnetPacket(o)).toBeNull();
          expect(checksumsValid(o)).toBe(true);
          const oi = o.subarray(VNET_HDR_LEN);
          expect(new DataView(oi.buffer, oi.byteOffset).getUint16(ipHdr + 4)).toBe(oi.length - ipHdr);
          got.push(...oi.subarray(ipHdr + 8));
        }
        expect(got).toEqual([...payload]);
      }),
      { numRuns: 100 },
    );
  });

  it("drops what it cannot segment, typed", () => {
    const s: PacketSpec = { v6: false, ipOpts: 0, tcpOpts: [], seq: 1, ack: 1, flags: TCP_ACK, payload: new Uint8Array(3000), gsoSize: 1000, id: 0, tos: 0, addrs: new Array(32).fill(1), ports: [0, 1, 0, 2] };
    const ufo = build(s, true);
    ufo[1] = 3;
    const out: Uint8Array[] = [];
    expect(segment(ufo, { maxIp: 1400 }, new ByteArena(), out)).toBe(GSO_DROPS.ufo);
    const fam = build(s, true);
    fam[1] = VNET_GSO_TCPV6;
    expect(segment(fam, { maxIp: 1400 }, new ByteArena(), out)).toBe(GSO_DROPS.gsoType);
    const len = build(s, true);
    len[VNET_HDR_LEN + 3]! ^= 1;
    expect(segment(len, { maxIp: 1400 }, new ByteArena(), out)).toBe(GSO_DROPS.length);
    const zero = build(s, true);
    zero[4] = 0;
    zero[5] = 0;
    expect(segment(zero, { maxIp: 1400 }, new ByteArena(), out)).toBe(GSO_DROPS.gsoSize);
    expect(out).toEqual([]);
    const drops: string[] = [];
    segmentBatch([ufo, build(s, true), zero], { maxIp: 1400 }, new ByteArena(), out, (_p, d) => drops.push(d.detail));
    expect(drops).toEqual([GSO_DROPS.ufo.detail, GSO_DROPS.gsoSize.detail]);
    expect(out.length).toBe(3);
  });

  it("never throws on random bytes", () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 3000 }), fc.integer({ min: 576, max: 2000 }), (b, maxIp) => {
        const out: Uint8Array[] = [];
        segment(b, { maxIp }, new ByteArena(), out);
        coalesce(out.length ? out : [b], new ByteArena(), []);
      }),
      { numRuns: 2000 },
    );
  });
});

describe("userspace GRO", () => {
  it("re-coalesces a segmented super-packet into one equivalent super-packet", () => {
    fc.assert(
      fc.property(specArb(60000), fc.integer({ min: 576, max: 1500 }), (s, maxIp) => {
        s.flags &= ~(TCP_FIN | TCP_CWR | TCP_ECE);
        const p = build(s, true);
        const arena = new ByteArena();
        const segs: Uint8Array[] = [];
        segment(p, { maxIp }, arena, segs);
        const out: Uint8Array[] = [];
        coalesce(segs, arena, out);
        // every output is valid and carries, on the wire, exactly the segments that went in
        const wire = out.flatMap((o) => {
          expect(validateVnetPacket(o)).toBeNull();
          expect(checksumsValid(o)).toBe(true);
          return onWire(o);
        });
        expect(wire).toEqual(segs.map(asSeg));
        // IPv4 options and IPv6 extension headers travel uncoalesced (the kernel GRO does not merge them either)
        if (s.ipOpts === 0 && segs.length <= 64) expect(out.length).toBe(1);
      }),
      { numRuns: 200 },
    );
  });

  it("keeps every flow's bytes and order across interleaved flows, losses and stray packets", () => {
    const streamArb = fc.record({
      flows: fc.array(fc.tuple(specArb(8000), fc.integer({ min: 576, max: 1500 })), { minLength: 1, maxLength: 4 }),
      order: fc.array(fc.nat(), { maxLength: 400 }),
      lost: fc.array(fc.nat(), { maxLength: 10 }),
    });
    fc.assert(
      fc.property(streamArb, ({ flows, order, lost }) => {
        const arena = new ByteArena();
        // each flow: a few consecutive super-packets, segmented
        const queues = flows.map(([s, maxIp], k) => {
          const segs: Uint8Array[] = [];
          let seq = s.seq;
          for (let j = 0; j < 3; j++) {
            const sj = { ...s, seq, ports: [k, k, 0, 80], flags: s.flags & ~(TCP_FIN | TCP_CWR | TCP_ECE) };
            segment(build(sj, true), { maxIp }, arena, segs);
            seq = (seq + s.payload.length) >>> 0;
          }
          return segs;
        });
        const input: Uint8Array[] = [];
        let oi = 0;
        while (queues.some((q) => q.length)) {
          const live = queues.filter((q) => q.length);
          input.push(live[(order[oi++] ?? 0) % live.length]!.shift()!);
        }
        for (const l of lost) if (input.length > 1) input.splice(l % input.length, 1);
        const out: Uint8Array[] = [];
        coalesce(input, arena, out);
        const byFlow = (segs: Seg[]) => {
          const m = new Map<string, Seg[]>();
          for (const x of segs) m.set(x.flow, [...(m.get(x.flow) ?? []), x]);
          return m;
        };
        for (const o of out) {
          expect(validateVnetPacket(o)).toBeNull();
          expect(checksumsValid(o)).toBe(true);
        }
        expect(byFlow(out.flatMap(onWire))).toEqual(byFlow(input.map(asSeg)));
        expect(out.length).toBeLessThanOrEqual(input.length);
      }),
      { numRuns: 150 },
    );
  });
});
