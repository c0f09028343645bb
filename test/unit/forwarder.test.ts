import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { Forwarder } from "../../src/packet/forwarder.js";
import { PrefixTable } from "../../src/packet/prefix-table.js";
import { parseIPv4 } from "../../src/packet/ip.js";
import { VNET_HDR_LEN } from "../../src/packet/vnet.js";
import { ipv4Packet } from "./packet-fixtures.js";

const A = "aaaaaaaaaaaaaaaa";
const B = "bbbbbbbbbbbbbbbb";
const C = "cccccccccccccccc";

const withVnet = (ip: Uint8Array) => {
  const p = new Uint8Array(VNET_HDR_LEN + ip.length);
  p.set(ip, VNET_HDR_LEN);
  return p;
};
const pkt = (dst: string, payload = new Uint8Array(100).fill(7)) => withVnet(ipv4Packet(parseIPv4("10.40.0.2")!, parseIPv4(dst)!, payload));

function net(hops: Record<string, Record<string, string | undefined>>, full = new Set<string>(), holdBytes?: number) {
  const routes = new PrefixTable<string>();
  routes.insert("10.40.0.0/26", A);
  routes.insert("10.40.0.64/26", B);
  routes.insert("10.40.0.128/26", C);
  const delivered: Record<string, Uint8Array[]> = { [A]: [], [B]: [], [C]: [] };
  const fw: Record<string, Forwarder> = {};
  const links = new Set([`${A}-${B}`, `${B}-${A}`, `${B}-${C}`, `${C}-${B}`, `${A}-${C}`, `${C}-${A}`]);
  for (const id of [A, B, C]) {
    fw[id] = new Forwarder({
      selfId: id,
      routes,
      nextHop: (n) => hops[id]?.[n],
      send: (peer, frame) => {
        if (!links.has(`${id}-${peer}`)) return "closed";
        if (full.has(peer)) return "full";
        const copy = new Uint8Array(frame); // the wire copies
        queueMicrotask(() => fw[peer]!.fromPeer(id, copy));
        return "ok";
      },
      deliver: (ps) => delivered[id]!.push(...ps.map((p) => new Uint8Array(p))),
      sendBorrows: true, // frames are reused after send(): the fake wire above copies, as links do
      ...(holdBytes !== undefined ? { holdBytes } : {}),
    });
  }
  return { fw, delivered, links };
}
const flush = () => new Promise((r) => setTimeout(r, 0));

describe("Forwarder", () => {
  it("delivers directly and coalesces a batch into one frame", async () => {
    const { fw, delivered } = net({ [A]: { [C]: C } });
    const batch = [pkt("10.40.0.130"), pkt("10.40.0.131"), pkt("10.40.0.132")];
    fw[A]!.fromTun(batch);
    await flush();
    expect(fw[A]!.stats.txFrames).toBe(1);
    expect(fw[A]!.stats.txPackets).toBe(3);
    expect(delivered[C]).toEqual(batch);
    expect(fw[C]!.stats.perPeer.get(A)).toMatchObject({ rxPackets: 3 });
  });

  it("routes via an intermediate node that reads only the header", async () => {
    const { fw, delivered } = net({ [A]: { [C]: B }, [B]: { [C]: C } });
    const p = pkt("10.40.0.140");
    fw[A]!.fromTun([p]);
    await flush();
    await flush();
    expect(fw[B]!.stats.fwdFrames).toBe(1);
    expect(delivered[B]).toEqual([]);
    expect(delivered[C]).toEqual([p]);
  });

  it("counts typed drops: no route, no link, local block, garbage, TTL exhaustion in a loop", async () => {
    const { fw } = net({ [A]: { [C]: B }, [B]: { [C]: A } }); // a routing loop A->B->A
    fw[A]!.fromTun([pkt("192.168.1.1"), pkt("10.40.0.5"), new Uint8Array([1, 2, 3])]);
    expect(fw[A]!.drops.get("no-route")).toBe(1);
    expect(fw[A]!.drops.get("not-for-us")).toBe(1);
    expect(fw[A]!.drops.get("malformed")).toBe(1);
    fw[A]!.fromTun([pkt("10.40.0.70")]); // B's block, but A has no next hop for B
    expect(fw[A]!.drops.get("no-link")).toBe(1);
    fw[A]!.fromTun([pkt("10.40.0.150")]);
    for (let i = 0; i < 20; i++) await flush();
    // B never sends a frame back where it came from; the loop is cut at B.
    expect(fw[B]!.drops.get("no-link")).toBe(1);
    fw[C]!.fromPeer(A, new Uint8Array([0x10, 8, 1, 2, 3]));
    expect(fw[C]!.drops.total()).toBe(1);
  });

  it("expires frames whose TTL runs out on a longer loop", async () => {
    const { fw, links } = net({ [A]: { [C]: B }, [B]: { [C]: C }, [C]: {} });
    links.add(`${C}-${A}`);
    // C is not the destination of frames to a 4th node D that every node routes around the triangle.
    const D = "dddddddddddddddd";
    const hops: Record<string, string> = { [A]: B, [B]: C, [C]: A };
    for (const id of [A, B, C]) (fw[id] as unknown as { p: { nextHop: (n: string) => string | undefined } }).p.nextHop = (n) => (n === D ? hops[id] : undefined);
    const frame = new Uint8Array(18 + 4 + VNET_HDR_LEN + 20);
    frame[0] = 0x10;
    frame[1] = 8;
    frame.set(Buffer.from(A, "hex"), 2);
    frame.set(Buffer.from(D, "hex"), 10);
    new DataView(frame.buffer).setUint32(18, VNET_HDR_LEN + 20);
    frame.set(ipv4Packet(1, 2, new Uint8Array(0)), 22 + VNET_HDR_LEN);
    fw[B]!.fromPeer(A, frame);
    for (let i = 0; i < 20; i++) await flush();
    const expired = fw[A]!.drops.get("ttl-expired") + fw[B]!.drops.get("ttl-expired") + fw[C]!.drops.get("ttl-expired");
    expect(expired).toBe(1);
  });

  it("backpressure: a full link holds frames in order, asks to pause, and flushes them when drained", async () => {
    const full = new Set([C]);
    const { fw, delivered } = net({ [A]: { [C]: C, [B]: B } }, full);
    const first = [pkt("10.40.0.130"), pkt("10.40.0.131")];
    fw[A]!.fromTun(first);
    const second = [pkt("10.40.0.132")];
    fw[A]!.fromTun(second); // behind the held frame even if the link had room
    expect(fw[A]!.drops.get("queue-full")).toBe(0);
    expect(fw[A]!.heldFor(C)).toBe(true);
    expect(fw[A]!.shouldPause()).toBe(true);
    fw[A]!.drained(C); // a stale drain: still full, nothing moves
    expect(fw[A]!.shouldPause()).toBe(true);
    full.delete(C);
    fw[A]!.drained(C);
    expect(fw[A]!.heldFor(C)).toBe(false);
    expect(fw[A]!.shouldPause()).toBe(false);
    await flush();
    expect(delivered[C]).toEqual([...first, ...second]);
    expect(fw[A]!.stats.txPackets).toBe(3);
    fw[A]!.fromTun([pkt("10.40.0.130"), pkt("10.40.0.70")]); // B is fine: keep reading
    expect(fw[A]!.shouldPause()).toBe(false);
  });

  it("backpressure: what does not fit the hold buffer is dropped as queue-full; a lost link drops the rest as no-link", () => {
    const full = new Set([C]);
    const { fw } = net({ [A]: { [C]: C } }, full, 1000);
    fw[A]!.fromTun([pkt("10.40.0.130", new Uint8Array(600))]); // held (one ~650-byte frame)
    fw[A]!.fromTun([pkt("10.40.0.131", new Uint8Array(600))]); // does not fit: dropped
    expect(fw[A]!.drops.get("queue-full")).toBe(1);
    fw[A]!.linkDown(C);
    expect(fw[A]!.drops.get("no-link")).toBe(1);
    expect(fw[A]!.heldFor(C)).toBe(false);
    expect(fw[A]!.shouldPause()).toBe(false);
  });

  it("backpressure with holdBytes 0 drops at once", () => {
    const { fw } = net({ [A]: { [C]: C } }, new Set([C]), 0);
    fw[A]!.fromTun([pkt("10.40.0.130"), pkt("10.40.0.131")]);
    expect(fw[A]!.drops.get("queue-full")).toBe(2);
    expect(fw[A]!.shouldPause()).toBe(true);
  });

  it("backpressure: too-big is a counted drop that never parks the peer; closed counts as no-link", () => {
    const routes = new PrefixTable<string>();
    routes.insert("10.40.0.128/26", C);
    let result: "too-big" | "closed" = "too-big";
    const fw = new Forwarder({ selfId: A, routes, nextHop: (n) => n, send: () => result, deliver: () => {} });
    fw.fromTun([pkt("10.40.0.130"), pkt("10.40.0.131")]);
    expect(fw.drops.get("too-big")).toBe(2);
    expect(fw.heldFor(C)).toBe(false);
    expect(fw.shouldPause()).toBe(false); // no drain would ever come for an oversize refusal
    result = "closed";
    fw.fromTun([pkt("10.40.0.130")]);
    expect(fw.drops.get("no-link")).toBe(1);
    expect(fw.shouldPause()).toBe(false);
  });

  it("watermarks: pauses while every target's queue is at or above high water, resumes on its drain", () => {
    const routes = new PrefixTable<string>();
    routes.insert("10.40.0.64/26", B);
    routes.insert("10.40.0.128/26", C);
    const queued = new Map<string, number>([
      [B, 0],
      [C, 0],
    ]);
    const fw = new Forwarder({ selfId: A, routes, nextHop: (n) => n, send: () => "ok", queued: (p) => queued.get(p) ?? 0, highWater: 1000, deliver: () => {} });
    queued.set(C, 1000);
    fw.fromTun([pkt("10.40.0.130")]);
    expect(fw.shouldPause()).toBe(true);
    queued.set(C, 10); // below, but no drain yet: the pause holds until the link says so
    expect(fw.shouldPause()).toBe(true);
    fw.drained(C);
    expect(fw.shouldPause()).toBe(false);
    queued.set(C, 5000);
    fw.fromTun([pkt("10.40.0.130"), pkt("10.40.0.70")]); // B has room: keep reading
    expect(fw.shouldPause()).toBe(false);
    fw.fromTun([pkt("10.40.0.130")]);
    expect(fw.shouldPause()).toBe(true);
    fw.linkDown(C);
    expect(fw.shouldPause()).toBe(false);
    expect(fw.stats.txPackets).toBe(4);
  });

  it("random batches arrive intact and in order at their owners", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(fc.tuple(fc.constantFrom("10.40.0.70", "10.40.0.130", "10.40.0.180"), fc.uint8Array({ minLength: 0, maxLength: 3000 })), { maxLength: 60 }), async (items) => {
        const { fw, delivered } = net({ [A]: { [B]: B, [C]: B }, [B]: { [C]: C } });
        const batch = items.map(([d, pl]) => pkt(d, pl));
        fw[A]!.fromTun(batch);
        for (let i = 0; i < 4; i++) await flush();
        expect(delivered[B]).toEqual(batch.filter((_, i) => items[i]![0] === "10.40.0.70"));
        expect(delivered[C]).toEqual(batch.filter((_, i) => items[i]![0] !== "10.40.0.70"));
      }),
      { numRuns: 100 },
    );
  });
});
