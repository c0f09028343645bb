import { createHash, randomBytes } from "node:crypto";
import { afterEach, describe, expect, it } from "vitest";
import { UdpSocket } from "../../agent/os/udp.js";
import { parseCandidate } from "../../src/bulk/wire.js";
import { waitFor } from "../helpers/cluster.js";

describe("UDP socket over FFI (GSO send, GRO receive)", () => {
  const open: UdpSocket[] = [];
  afterEach(async () => {
    await Promise.all(open.splice(0).map((s) => s.close()));
  });

  it("sends batches with UDP_SEGMENT and receives every datagram intact, segment sizes from GRO", async () => {
    const a = UdpSocket.open({ address: "127.0.0.1" });
    const b = UdpSocket.open({ address: "127.0.0.1" });
    open.push(a, b);
    expect(a.port).toBeGreaterThan(0);
    const got: Buffer[] = [];
    const segs = new Set<number>();
    b.start((data, seg, from) => {
      expect(from.port).toBe(a.port);
      segs.add(seg);
      for (let o = 0; o < data.length; o += seg) got.push(Buffer.from(data.subarray(o, Math.min(data.length, o + seg))));
    });
    const to = parseCandidate(`127.0.0.1:${b.port}`)!;
    const slab = Buffer.allocUnsafeSlow(64 * 1024);
    const sent: Buffer[] = [];
    const rounds = 200;
    for (let r = 0; r < rounds; r++) {
      const count = 1 + (r % 40);
      const seg = 1200;
      const last = 1 + (r * 7) % seg;
      const len = (count - 1) * seg + last;
      randomBytes(len).copy(slab);
      for (let i = 0; i < count; i++) sent.push(Buffer.from(slab.subarray(i * seg, i === count - 1 ? len : (i + 1) * seg)));
      expect(a.sendBatch(to, slab.subarray(0, len), seg, count)).toBe(count);
      if (r % 10 === 9) await new Promise((res) => setTimeout(res, 5));
    }
    await waitFor(() => got.length >= sent.length, 5000, "all datagrams");
    const h = (l: Buffer[]) => createHash("sha256").update(Buffer.concat(l)).digest("hex");
    expect(got.length).toBe(sent.length);
    expect(h(got)).toBe(h(sent));
    expect(a.gso).toBe(true);
    expect(a.stats.txCalls).toBe(rounds);
    // GRO coalesced at least some reads (the loopback path supports it)
    if (b.gro) expect(b.stats.rxCalls).toBeLessThan(sent.length);
  });

  it("single datagrams, and close() wakes a waiting socket", async () => {
    const a = UdpSocket.open({ address: "127.0.0.1", gro: false });
    const b = UdpSocket.open({ address: "127.0.0.1", pollTimeoutMs: 30_000 });
    open.push(a, b);
    const got: string[] = [];
    b.start((d) => got.push(Buffer.from(d).toString()));
    expect(a.send(parseCandidate(`127.0.0.1:${b.port}`)!, Buffer.from("hello"))).toBe(true);
    await waitFor(() => got.length === 1, 2000, "datagram");
    expect(got).toEqual(["hello"]);
    const t0 = Date.now();
    await b.close();
    expect(Date.now() - t0).toBeLessThan(10_000); // the eventfd wakes the poll; without it, 30 s
  });

  it("refuses a taken port with a typed error", () => {
    const a = UdpSocket.open({ address: "127.0.0.1" });
    open.push(a);
    expect(() => UdpSocket.open({ address: "127.0.0.1", port: a.port })).toThrow(/ERR_UDP_BIND|cannot bind/);
  });
});
