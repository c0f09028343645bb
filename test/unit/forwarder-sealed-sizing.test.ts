/**
 * Frames sealed end to end for a node behind a transit, towards a hop whose link carries them only whole
 * and small (the bulk link: one sealed frame per datagram, ForwarderPorts.sealedBudget): the forwarder
 * segments and packs them to fit, whatever the segmentation mode, so every frame of a flow takes that link;
 * frames to the hop itself (unsealed) are not touched. Real keys, real AEAD, real GRO at the destination.
 */
import { describe, expect, it } from "vitest";
import { generateIdentity, type Identity } from "../../src/identity.js";
import { Forwarder } from "../../src/packet/forwarder.js";
import { coalesce } from "../../src/packet/gro.js";
import { ByteArena } from "../../src/packet/gso.js";
import type { SegmentMode } from "../../src/packet/gso-policy.js";
import { PrefixTable } from "../../src/packet/prefix-table.js";
import { FLAG_SEALED, FrameSealer } from "../../src/packet/seal.js";
import { VNET_HDR_LEN } from "../../src/packet/vnet.js";
import { ipv4Packet } from "./packet-fixtures.js";

const ids = [generateIdentity(), generateIdentity(), generateIdentity()] as const;
const [A, B, C] = ids.map((i) => i.id) as [string, string, string];
const pubs = new Map(ids.map((i) => [i.id, i.publicKey]));
/** What BulkService.sealedBudget says for a 1500-byte LAN: path MTU 1464 less its 32-byte header and tag. */
const BULK_SEALED = 1464 - 32;

/** An IPv4 TCP GSO super-packet from 10.40.0.2:5000 to `dst`:80, `payload` bytes from `seq`, gso_size 1360. */
function superPacket(dst: number, seq: number, payload: number): Uint8Array {
  const p = new Uint8Array(VNET_HDR_LEN + 40 + payload);
  const ip = p.subarray(VNET_HDR_LEN);
  const dv = new DataView(ip.buffer, ip.byteOffset);
  ip[0] = 0x45;
  dv.setUint16(2, 40 + payload);
  ip[6] = 0x40;
  ip[8] = 64;
  ip[9] = 6;
  ip.set([10, 40, 0, 2, 10, 40, 0, dst], 12);
  dv.setUint16(20, 5000);
  dv.setUint16(22, 80);
  dv.setUint32(24, seq);
  ip[32] = 0x50;
  ip[33] = 0x10;
  for (let i = 0; i < payload; i++) ip[40 + i] = (seq + i * 7) & 0xff;
  p[0] = 1;
  p[1] = 1; // TCPV4
  new DataView(p.buffer).setUint16(4, 1360, true);
  new DataView(p.buffer).setUint16(6, 20, true);
  p[8] = 16;
  return p;
}

/** A -> C through B; A's link to B is "bulk" (sealedBudget) unless `bulk` is false. */
function net(mode: SegmentMode, bulk = true) {
  const routes = new PrefixTable<string>();
  routes.insert("10.40.0.0/26", A);
  routes.insert("10.40.0.64/26", B);
  routes.insert("10.40.0.128/26", C);
  const sources = new PrefixTable<string>();
  sources.replaceAll([["10.40.0.0/26", A], ["10.40.0.64/26", B], ["10.40.0.128/26", C]]);
  const hops: Record<string, Record<string, string>> = { [A]: { [B]: B, [C]: B }, [B]: { [A]: A, [C]: C }, [C]: { [A]: B, [B]: B } };
  const wire: { from: string; to: string; frame: Uint8Array }[] = [];
  const delivered: Record<string, Uint8Array[]> = { [A]: [], [B]: [], [C]: [] };
  const fw: Record<string, Forwarder> = {};
  for (const idn of ids as readonly Identity[]) {
    const id = idn.id;
    fw[id] = new Forwarder({
      selfId: id,
      routes,
      sources,
      sealer: new FrameSealer({ identity: idn, publicKeyOf: (n) => pubs.get(n), now: () => 1_800_000_000_000 }),
      nextHop: (n) => hops[id]![n],
      send: (peer, frame) => {
        const copy = new Uint8Array(frame);
        wire.push({ from: id, to: peer, frame: copy });
        fw[peer]!.fromPeer(id, copy);
        return "ok";
      },
      deliver: (ps) => delivered[id]!.push(...ps.map((p) => new Uint8Array(p))),
      sendBorrows: true,
      segment: mode,
      // the WebRTC link's budget: what the hop reports when the bulk link is down
      linkBudget: () => 1356,
      ...(id === A && bulk ? { sealedBudget: (peer: string) => (peer === B ? BULK_SEALED : undefined) } : {}),
    });
  }
  return { fw, wire, delivered };
}

const payloadOf = (pkts: Uint8Array[]) => {
  const out: Uint8Array[] = [];
  coalesce(pkts, new ByteArena(), out);
  return Buffer.concat(out.map((p) => p.subarray(VNET_HDR_LEN + 40)));
};

describe("sealed frames sized for a bulk hop", () => {
  it.each(["auto", "off", "always"] as const)("segment %s: every sealed frame A -> B fits one bulk datagram, and C gets the bytes", (mode) => {
    const { fw, wire, delivered } = net(mode);
    const batch = [superPacket(130, 1000, 60_000), superPacket(130, 61_000, 30_000)];
    const want = Buffer.concat(batch.map((p) => Buffer.from(p.subarray(VNET_HDR_LEN + 40))));
    fw[A]!.fromTun(batch);
    const hop1 = wire.filter((w) => w.from === A && w.to === B);
    expect(hop1.length).toBeGreaterThanOrEqual(Math.ceil(90_000 / 1336));
    for (const w of hop1) {
      expect(w.frame[0]! & FLAG_SEALED).toBe(FLAG_SEALED);
      expect(w.frame.length).toBeLessThanOrEqual(BULK_SEALED);
    }
    // the transit forwards them as they are (header only), the destination opens every one
    expect(wire.filter((w) => w.from === B && w.to === C)).toHaveLength(hop1.length);
    expect(fw[C]!.drops.snapshot()).toEqual({});
    expect(payloadOf(delivered[C]!).equals(want)).toBe(true);
  });

  it("small packets are packed several to a sealed frame, still within the budget", () => {
    const { fw, wire, delivered } = net("auto");
    const small = Array.from({ length: 40 }, (_, i) => {
      const ip = ipv4Packet(0x0a280002, 0x0a280082, new Uint8Array(100).fill(i));
      const p = new Uint8Array(VNET_HDR_LEN + ip.length);
      p.set(ip, VNET_HDR_LEN);
      return p;
    });
    fw[A]!.fromTun(small);
    const hop1 = wire.filter((w) => w.from === A && w.to === B);
    expect(hop1.length).toBeLessThan(10);
    for (const w of hop1) expect(w.frame.length).toBeLessThanOrEqual(BULK_SEALED);
    expect(delivered[C]).toEqual(small);
  });

  it("frames for the hop itself are not sealed and not cut: one frame per super-packet, as before", () => {
    const { fw, wire, delivered } = net("auto");
    const p = superPacket(66, 1, 60_000);
    fw[A]!.fromTun([p]);
    expect(wire).toHaveLength(1);
    expect(wire[0]!.frame[0]! & FLAG_SEALED).toBe(0);
    expect(delivered[B]).toEqual([p]);
  });

  it("without a bulk hop, sealed frames follow the mesh link's policy (auto on a clean path: not cut)", () => {
    const { fw, wire, delivered } = net("auto", false);
    const p = superPacket(130, 1, 60_000);
    fw[A]!.fromTun([p]);
    const hop1 = wire.filter((w) => w.from === A && w.to === B);
    expect(hop1).toHaveLength(1);
    expect(hop1[0]!.frame.length).toBeGreaterThan(60_000);
    expect(delivered[C]).toEqual([p]);
  });
});
