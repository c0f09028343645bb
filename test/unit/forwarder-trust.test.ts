// Cryptokey routing on the data path, attacked: a peer (or a transit node) that spoofs source nodes, inner
// source or destination addresses, or tampers with, replays or forges frames it relays. Real keys, real
// AEAD; every attack is dropped with a typed, counted reason while honest traffic flows.
import { describe, expect, it } from "vitest";
import { generateIdentity, type Identity } from "../../src/identity.js";
import { Forwarder } from "../../src/packet/forwarder.js";
import { FrameEncoder, nodeIdToBytes } from "../../src/packet/frame.js";
import { parseIPv4 } from "../../src/packet/ip.js";
import { PrefixTable } from "../../src/packet/prefix-table.js";
import { ed25519PrivToX25519, ed25519PubToX25519, FrameSealer } from "../../src/packet/seal.js";
import { VNET_HDR_LEN } from "../../src/packet/vnet.js";
import { createPublicKey, diffieHellman } from "node:crypto";
import { ipv4Packet } from "./packet-fixtures.js";

const ids = [generateIdentity(), generateIdentity(), generateIdentity()] as const;
const [IA, IB, IC] = ids;
const A = IA.id;
const B = IB.id;
const C = IC.id;
const pubs = new Map(ids.map((i) => [i.id, i.publicKey]));

const withVnet = (ip: Uint8Array) => {
  const p = new Uint8Array(VNET_HDR_LEN + ip.length);
  p.set(ip, VNET_HDR_LEN);
  return p;
};
const pkt = (src: string, dst: string, fill = 7) => withVnet(ipv4Packet(parseIPv4(src)!, parseIPv4(dst)!, new Uint8Array(100).fill(fill)));

/** A (10.40.0.0/26), B (.64/26), C (.128/26). hops: per node, destination -> next hop. Wire taps per link. */
function net(hops: Record<string, Record<string, string>>) {
  const routes = new PrefixTable<string>();
  routes.insert("10.40.0.0/26", A);
  routes.insert("10.40.0.64/26", B);
  routes.insert("10.40.0.128/26", C);
  const sources = new PrefixTable<string>();
  sources.replaceAll([["10.40.0.0/26", A], ["10.40.0.64/26", B], ["10.40.0.128/26", C]]);
  const delivered: Record<string, Uint8Array[]> = { [A]: [], [B]: [], [C]: [] };
  const wire: { from: string; to: string; frame: Uint8Array }[] = [];
  const fw: Record<string, Forwarder> = {};
  const sealers: Record<string, FrameSealer> = {};
  for (const idn of ids as readonly Identity[]) {
    const id = idn.id;
    sealers[id] = new FrameSealer({ identity: idn, publicKeyOf: (n) => pubs.get(n), now: () => 1_800_000_000_000 });
    fw[id] = new Forwarder({
      selfId: id,
      routes,
      sources,
      sealer: sealers[id],
      nextHop: (n) => hops[id]?.[n],
      send: (peer, frame) => {
        const copy = new Uint8Array(frame);
        wire.push({ from: id, to: peer, frame: copy });
        fw[peer]!.fromPeer(id, copy);
        return "ok";
      },
      deliver: (ps) => delivered[id]!.push(...ps.map((p) => new Uint8Array(p))),
      sendBorrows: true,
    });
  }
  return { fw, delivered, wire };
}

/** A frame built by hand (a hostile node's own code): any source node, any packets. */
function rawFrame(src: string, dst: string, pkts: Uint8Array[]): Uint8Array {
  const enc = new FrameEncoder();
  enc.begin(nodeIdToBytes(src), nodeIdToBytes(dst));
  for (const p of pkts) enc.add(p);
  return new Uint8Array(enc.finish()!);
}

describe("data path anti-spoofing", () => {
  it("delivers honest direct traffic, and the Ed25519 -> X25519 conversion agrees on both sides", () => {
    const { fw, delivered } = net({ [A]: { [C]: C } });
    fw[A]!.fromTun([pkt("10.40.0.2", "10.40.0.130")]);
    expect(delivered[C]).toHaveLength(1);
    const dh = (a: Identity, b: Identity) => diffieHellman({ privateKey: ed25519PrivToX25519(a), publicKey: createPublicKey({ key: Buffer.concat([Buffer.from("302a300506032b656e032100", "hex"), ed25519PubToX25519(b.publicKey)]), format: "der", type: "spki" }) });
    expect(dh(IA, IB).equals(dh(IB, IA))).toBe(true);
  });

  it("a packet read from the TUN with a source that is not ours is dropped (spoofed-source), nothing sent", () => {
    const { fw, wire } = net({ [A]: { [C]: C } });
    fw[A]!.fromTun([pkt("10.40.0.70", "10.40.0.130"), pkt("192.168.1.9", "10.40.0.130"), pkt("169.254.169.254", "10.40.0.130")]);
    expect(fw[A]!.drops.get("spoofed-source")).toBe(3);
    expect(wire).toHaveLength(0);
  });

  it("a peer naming another source node on a direct link is dropped (spoofed-node)", () => {
    const { fw, delivered } = net({});
    fw[C]!.fromPeer(B, rawFrame(A, C, [pkt("10.40.0.2", "10.40.0.130")]));
    expect(fw[C]!.drops.get("spoofed-node")).toBe(1);
    expect(delivered[C]).toHaveLength(0);
    // ...also when it is not for us: a transit does not forward an unsealed frame of a third node
    fw[B]!.fromPeer(C, rawFrame(A, A, [pkt("10.40.0.130", "10.40.0.2")]));
    expect(fw[B]!.drops.get("spoofed-node")).toBe(1);
  });

  it("a peer's packets with a source outside its blocks, or a destination outside ours, are dropped per packet", () => {
    const { fw, delivered } = net({});
    const good = pkt("10.40.0.2", "10.40.0.130", 1);
    const frame = rawFrame(A, C, [
      pkt("10.40.0.70", "10.40.0.130"), // B's pod address
      pkt("8.8.8.8", "10.40.0.130"), // the internet
      good,
      pkt("10.40.0.2", "169.254.169.254"), // cloud metadata via C
      pkt("10.40.0.2", "192.168.1.1"), // C's LAN
      pkt("10.40.0.2", "10.40.0.66"), // B's pod through C
    ]);
    fw[C]!.fromPeer(A, frame);
    expect(fw[C]!.drops.get("spoofed-source")).toBe(2);
    expect(fw[C]!.drops.get("foreign-destination")).toBe(3);
    expect(delivered[C]).toEqual([good]);
  });

  it("frames through a transit are sealed end to end: delivered, unreadable and unforgeable by the transit", () => {
    const { fw, delivered, wire } = net({ [A]: { [C]: B }, [B]: { [C]: C, [A]: A }, [C]: { [A]: B } });
    const secret = pkt("10.40.0.2", "10.40.0.130", 0x5a);
    fw[A]!.fromTun([secret]);
    expect(delivered[C]).toEqual([secret]);
    expect(fw[B]!.stats.fwdFrames).toBe(1);
    // the transit saw only ciphertext: the payload bytes do not appear on the A -> B hop
    const onWire = wire.find((w) => w.from === A && w.to === B)!.frame;
    expect(Buffer.from(onWire).includes(Buffer.from(secret.subarray(VNET_HDR_LEN + 28, VNET_HDR_LEN + 60)))).toBe(false);

    // B replays it: dropped (replayed)
    fw[C]!.fromPeer(B, new Uint8Array(onWire));
    expect(fw[C]!.drops.get("replayed")).toBe(1);
    // B flips a byte of the ciphertext, of the header (source node), of the tag: bad-seal each
    for (const off of [30, 3, onWire.length - 1]) {
      const t = new Uint8Array(onWire);
      t[off] = t[off]! ^ 1;
      fw[C]!.fromPeer(B, t);
    }
    expect(fw[C]!.drops.get("bad-seal")).toBeGreaterThanOrEqual(2); // a changed source node may also have no key
    // B forges a frame "from A", sealed with its own keys (it has no A-C key): bad-seal
    const forgedPlain = rawFrame(A, C, [pkt("10.40.0.2", "10.40.0.130", 9)]);
    const bSealed = new FrameSealer({ identity: IB, publicKeyOf: (n) => pubs.get(n), now: () => 1_900_000_000_000 }).seal(C, forgedPlain)!;
    bSealed.set(nodeIdToBytes(A), 2); // claim A as the source
    fw[C]!.fromPeer(B, bSealed);
    // and an unsealed frame "from A" through B: spoofed-node
    fw[C]!.fromPeer(B, forgedPlain);
    expect(fw[C]!.drops.get("spoofed-node")).toBe(1);
    expect(fw[C]!.drops.get("bad-seal")).toBeGreaterThanOrEqual(3);
    expect(delivered[C]).toEqual([secret]);
    // honest traffic keeps flowing after all that
    fw[A]!.fromTun([pkt("10.40.0.3", "10.40.0.131", 2)]);
    expect(delivered[C]).toHaveLength(2);
  });

  it("without the destination's key (no signed record yet) a transit frame is not sent unsealed (no-key)", () => {
    const { fw, wire } = net({ [A]: { [C]: B } });
    pubs.delete(C);
    try {
      fw[A]!.fromTun([pkt("10.40.0.2", "10.40.0.130")]);
      expect(fw[A]!.drops.get("no-key")).toBe(1);
      expect(wire).toHaveLength(0);
    } finally {
      pubs.set(C, IC.publicKey);
    }
  });
});
