/**
 * The segmentation policy (src/packet/gso-policy.ts) on its own and inside the Forwarder: which hops get
 * segmented when, frames that fit the link's one-packet budget, and the receiver's GRO putting the bytes
 * back together.
 */
import { describe, expect, it } from "vitest";
import { Forwarder } from "../../src/packet/forwarder.js";
import { PrefixTable } from "../../src/packet/prefix-table.js";
import { LinkSegmenter, MIN_WINDOW_BYTES, WINDOW_MS, type SegmentMode } from "../../src/packet/gso-policy.js";
import { ByteArena } from "../../src/packet/gso.js";
import { coalesce } from "../../src/packet/gro.js";
import { VNET_HDR_LEN } from "../../src/packet/vnet.js";

const A = "aaaaaaaaaaaaaaaa";
const B = "bbbbbbbbbbbbbbbb";

/** An IPv4 TCP GSO super-packet 10.40.0.2:5000 -> 10.40.0.66:80, `payload` bytes from `seq`, gso_size 1348. */
function superPacket(seq: number, payload: number): Uint8Array {
  const p = new Uint8Array(VNET_HDR_LEN + 40 + payload);
  const ip = p.subarray(VNET_HDR_LEN);
  const dv = new DataView(ip.buffer, ip.byteOffset);
  ip[0] = 0x45;
  dv.setUint16(2, 40 + payload);
  ip[6] = 0x40;
  ip[8] = 64;
  ip[9] = 6;
  ip.set([10, 40, 0, 2, 10, 40, 0, 66], 12);
  dv.setUint16(20, 5000);
  dv.setUint16(22, 80);
  dv.setUint32(24, seq);
  ip[32] = 0x50;
  ip[33] = 0x10;
  for (let i = 0; i < payload; i++) ip[40 + i] = (seq + i) & 0xff;
  p[0] = 1;
  p[1] = 1; // TCPV4
  new DataView(p.buffer).setUint16(4, 1348, true);
  new DataView(p.buffer).setUint16(6, 20, true);
  p[8] = 16;
  return p;
}

describe("LinkSegmenter", () => {
  it("off and budget-less hops never segment; always does", () => {
    const p = superPacket(1, 20000);
    expect(new LinkSegmenter({ mode: "off" }).plan(B, [p], 1356, 0).packets).toEqual([p]);
    expect(new LinkSegmenter({ mode: "always" }).plan(B, [p], undefined, 0).packets).toEqual([p]);
    const plan = new LinkSegmenter({ mode: "always" }).plan(B, [p], 1356, 0);
    expect(plan.frameLimit).toBe(1356);
    expect(plan.packets.length).toBe(Math.ceil(20000 / (1356 - 32 - 40)));
    for (const s of plan.packets) expect(s.length + 22).toBeLessThanOrEqual(1356);
  });

  it("auto turns on after a window with many retransmissions, and off after the hold time", () => {
    const seg = new LinkSegmenter({ mode: "auto", holdMs: 5000 });
    let seq = 0;
    let now = 0;
    const send = (retransmit: boolean) => {
      const s = retransmit ? seq - 60000 : seq;
      if (!retransmit) seq += 60000;
      const n = seg.plan(B, [superPacket(s, 60000)], 1356, now).packets.length;
      seg.release(); // (empties the plan's array)
      return n > 1;
    };
    // clean: a window of data, never segmented
    for (; now < 3 * WINDOW_MS; now += 100) expect(send(false)).toBe(false);
    // lossy: 1 in 5 super-packets retransmitted (20% of the bytes) -> on at the end of the window
    let on = false;
    for (let i = 0; now < 6 * WINDOW_MS; now += 100, i++) on = send(i % 5 === 4) || on;
    expect(on).toBe(true);
    expect(seg.stats.activations).toBe(1);
    expect(seg.stats.retransmits).toBeGreaterThan(0);
    // clean again: stays on for the hold time, then off
    const t0 = now;
    for (; now < t0 + 4000; now += 100) expect(send(false)).toBe(true);
    for (; now < t0 + 8000; now += 100) send(false);
    expect(send(false)).toBe(false);
    expect(MIN_WINDOW_BYTES).toBeLessThan(10 * 60000);
  });
});

describe("Forwarder with segmentation", () => {
  function pair(mode: SegmentMode, budget: number | undefined) {
    const routes = new PrefixTable<string>();
    routes.insert("10.40.0.0/26", A);
    routes.insert("10.40.0.64/26", B);
    const frames: Uint8Array[] = [];
    const delivered: Uint8Array[] = [];
    const fwB = new Forwarder({ selfId: B, routes, nextHop: (n) => n, send: () => "closed", deliver: (ps) => delivered.push(...ps.map((p) => new Uint8Array(p))) });
    const fwA = new Forwarder({
      selfId: A,
      routes,
      nextHop: (n) => n,
      send: (_peer, frame) => {
        const copy = new Uint8Array(frame);
        frames.push(copy);
        fwB.fromPeer(A, copy);
        return "ok";
      },
      deliver: () => {},
      sendBorrows: true,
      segment: mode,
      linkBudget: () => budget,
    });
    return { fwA, frames, delivered };
  }

  it("always: every frame fits the budget, and GRO at the receiver rebuilds the super-packets", () => {
    const { fwA, frames, delivered } = pair("always", 1356);
    const batch = [superPacket(1000, 30000), superPacket(31000, 30000)];
    const want = batch.map((p) => new Uint8Array(p.subarray(VNET_HDR_LEN + 40)));
    fwA.fromTun(batch);
    expect(frames.length).toBeGreaterThan(40);
    for (const f of frames) expect(f.length).toBeLessThanOrEqual(1356);
    const out: Uint8Array[] = [];
    coalesce(delivered, new ByteArena(), out);
    // two super-packets' worth, as one or two GSO packets, same payload bytes
    const payload = Buffer.concat(out.map((p) => p.subarray(VNET_HDR_LEN + 40)));
    expect(payload.equals(Buffer.concat(want))).toBe(true);
    expect(out.length).toBeLessThanOrEqual(2);
    expect(out[0]![1]).toBe(1); // gso TCPV4
    expect(fwA.segmenter.stats.segmented).toBe(2);
  });

  it("auto on a clean path and off: one frame per super-packet, as before", () => {
    for (const mode of ["auto", "off"] as const) {
      const { fwA, frames } = pair(mode, 1356);
      fwA.fromTun([superPacket(1, 30000)]);
      expect(frames.length).toBe(1);
    }
  });
});
