import { describe, expect, it } from "vitest";
import { ProtocolError } from "../../src/errors.js";
import {
  MAX_LINKS_PER_RECORD,
  Topology,
  TopologyError,
  decodeTopologyMessage,
  encodeTopologyMessages,
  validateRecord,
  type TopologyRecord,
} from "../../src/mesh/topology.js";
import { decodeControl, encodeControl } from "../../src/wire/control.js";

const id = (n: number) => n.toString(16).padStart(16, "0");
const A = id(0xa);
const B = id(0xb);
const C = id(0xc);
const T0 = 1_700_000_000_000;

function rec(node: string, seq: number, links: [string, number][] = [], prefixes: string[] = []): TopologyRecord {
  return { node, seq, links: links.map(([peer, rttMs]) => ({ peer, rttMs })), prefixes };
}

describe("Topology.setLocal", () => {
  it("originates a record with seq floored at the clock and bumps only on change", () => {
    const t = new Topology(A);
    const r1 = t.setLocal([{ peer: B, rttMs: 10 }], ["10.40.1.0/24"], T0);
    expect(r1).toEqual({ node: A, seq: T0, links: [{ peer: B, rttMs: 10 }], prefixes: ["10.40.1.0/24"], updatedAt: T0 });
    expect(t.setLocal([{ peer: B, rttMs: 10 }], ["10.40.1.0/24"], T0)).toBeUndefined();
    // same ms, a real change: seq still strictly increases
    const r2 = t.setLocal([{ peer: B, rttMs: 10 }, { peer: C, rttMs: 5 }], ["10.40.1.0/24"], T0);
    expect(r2?.seq).toBe(T0 + 1);
    expect(t.seq).toBe(T0 + 1);
    expect(t.get(A)).toEqual(r2);
  });

  it("keeps advertised RTTs sticky: small jitter does not re-originate, a 20%+ change does", () => {
    const t = new Topology(A);
    t.setLocal([{ peer: B, rttMs: 20 }], [], T0);
    expect(t.setLocal([{ peer: B, rttMs: 23 }], [], T0 + 1000)).toBeUndefined(); // 15%
    expect(t.setLocal([{ peer: B, rttMs: 17.5 }], [], T0 + 2000)).toBeUndefined();
    const r = t.setLocal([{ peer: B, rttMs: 25 }], [], T0 + 3000); // 25%
    expect(r?.links).toEqual([{ peer: B, rttMs: 25 }]);
    // small absolute changes on tiny RTTs are ignored too (2 ms floor)
    t.setLocal([{ peer: C, rttMs: 0.3 }], [], T0 + 4000);
    expect(t.setLocal([{ peer: C, rttMs: 1.5 }], [], T0 + 5000)).toBeUndefined();
  });

  it("a fall of 20% re-originates without the 2 ms floor (ratchets down), so a high first sample does not stick; jitter does not flood", () => {
    const t = new Topology(A);
    t.setLocal([{ peer: B, rttMs: 2.3 }], [], T0); // first sample, taken while the link was settling
    const r = t.setLocal([{ peer: B, rttMs: 0.5 }], [], T0 + 1000);
    expect(r?.links).toEqual([{ peer: B, rttMs: 0.5 }]);
    // jitter around the settled value: a rise below max(20%, 2 ms) stays, a fall of <= 20% stays
    for (const [i, rtt] of [0.9, 0.45, 1.4, 0.41, 2.4].entries()) expect(t.setLocal([{ peer: B, rttMs: rtt }], [], T0 + 2000 + i)).toBeUndefined();
    // a fall of more than 20% moves it again, by 0.1 ms steps at least
    expect(t.setLocal([{ peer: B, rttMs: 0.3 }], [], T0 + 3000)?.links).toEqual([{ peer: B, rttMs: 0.3 }]);
    expect(t.setLocal([{ peer: B, rttMs: 0.2 }], [], T0 + 3001)).toBeUndefined(); // 0.1 ms: not more than the floor
    // a real rise still moves it up
    expect(t.setLocal([{ peer: B, rttMs: 2.5 }], [], T0 + 4000)?.links).toEqual([{ peer: B, rttMs: 2.5 }]);
  });

  it("advertises unknownRttMs until a measurement exists, and keeps the old value when it goes missing", () => {
    const t = new Topology(A, { unknownRttMs: 77 });
    expect(t.setLocal([{ peer: B }], [], T0)?.links).toEqual([{ peer: B, rttMs: 77 }]);
    expect(t.setLocal([{ peer: B, rttMs: 5 }], [], T0 + 1)?.links).toEqual([{ peer: B, rttMs: 5 }]);
    expect(t.setLocal([{ peer: B }], [], T0 + 2)).toBeUndefined();
  });

  it("canonicalises prefixes and refuses bad local input with TopologyError", () => {
    const t = new Topology(A);
    expect(t.setLocal([], ["10.40.1.7/24", "10.40.1.0/24", "fd00:0::/8"], T0)?.prefixes).toEqual(["10.40.1.0/24", "fd00::/8"]);
    expect(() => t.setLocal([], ["nope"], T0)).toThrow(TopologyError);
    expect(() => t.setLocal([{ peer: A }], [], T0)).toThrow(TopologyError);
    expect(() => new Topology("XYZ")).toThrow(TopologyError);
  });

  it("refresh() re-originates after refreshMs (or when forced), never before setLocal", () => {
    const t = new Topology(A, { refreshMs: 10_000 });
    expect(t.refresh(T0, true)).toBeUndefined();
    const r0 = t.setLocal([], [], T0)!;
    expect(t.refresh(T0 + 9_999)).toBeUndefined();
    const r1 = t.refresh(T0 + 10_000)!;
    expect(r1.seq).toBeGreaterThan(r0.seq);
    expect({ ...r1, seq: 0, updatedAt: 0 }).toEqual({ ...r0, seq: 0, updatedAt: 0 });
    expect(t.refresh(T0 + 10_001, true)!.seq).toBeGreaterThan(r1.seq);
  });
});

describe("Topology.merge", () => {
  it("keeps the highest seq per origin and returns only what was new", () => {
    const t = new Topology(A);
    const b1 = rec(B, 1, [[A, 3]]);
    const b2 = rec(B, 2, [[A, 4]]);
    expect(t.merge([b1], T0)).toEqual([b1]);
    expect(t.merge([b1], T0)).toEqual([]);
    expect(t.merge([b2, b1], T0)).toEqual([b2]);
    expect(t.merge([b1], T0)).toEqual([]);
    expect(t.get(B)).toEqual(b2);
  });

  it("settles equal seq with different content the same way in any order", () => {
    const x = rec(B, 5, [[A, 1]]);
    const y = rec(B, 5, [[A, 2]]);
    const t1 = new Topology(A);
    const t2 = new Topology(A);
    t1.merge([x, y], T0);
    t2.merge([y, x], T0);
    expect(t1.get(B)).toEqual(t2.get(B));
  });

  it("validates remote records: invalid ones are rejected and counted, the rest merged", () => {
    const t = new Topology(A);
    const bad = [
      { node: "zz", seq: 1, links: [], prefixes: [] },
      { node: B, seq: 0, links: [], prefixes: [] },
      { node: B, seq: 1, links: [{ peer: B, rttMs: 1 }], prefixes: [] },
      { node: B, seq: 1, links: [{ peer: C, rttMs: 1 }, { peer: C, rttMs: 2 }], prefixes: [] },
      { node: B, seq: 1, links: [{ peer: C, rttMs: -1 }], prefixes: [] },
      { node: B, seq: 1, links: [], prefixes: ["10.40.1.1/24"] },
      { node: B, seq: 1, links: Array.from({ length: MAX_LINKS_PER_RECORD + 1 }, (_, i) => ({ peer: id(i + 100), rttMs: 1 })), prefixes: [] },
    ] as unknown as TopologyRecord[];
    const ok = rec(C, 1);
    const res = t.mergeDetailed([...bad, ok], T0);
    expect(res.delta).toEqual([ok]);
    expect(res.rejected).toHaveLength(bad.length);
    for (const e of res.rejected) expect(e).toBeInstanceOf(ProtocolError);
  });

  it("bounds the number of nodes (ourselves included)", () => {
    const t = new Topology(A, { maxNodes: 3 });
    t.setLocal([], [], T0);
    const res = t.mergeDetailed([rec(B, 1), rec(C, 1), rec(id(0xd), 1)], T0);
    expect(res.delta.map((r) => r.node)).toEqual([B, C]);
    expect(res.rejected).toHaveLength(1);
    expect((res.rejected[0] as TopologyError).code).toBe("ERR_TOO_MANY_NODES");
    // updates of known origins still go through
    expect(t.merge([rec(B, 2)], T0)).toHaveLength(1);
  });

  it("an older incarnation of ourselves in the mesh makes us jump past it and re-originate", () => {
    const t = new Topology(A);
    t.setLocal([{ peer: B, rttMs: 1 }], [], 1000); // clock far behind: seq 1000
    const stale = rec(A, 5_000, [[C, 9]], ["10.40.9.0/24"]);
    const { delta, originated } = t.mergeDetailed([stale], 1001);
    expect(delta).toHaveLength(1);
    expect(originated).toBe(delta[0]);
    expect(delta[0]!.node).toBe(A);
    expect(delta[0]!.seq).toBe(5_001);
    expect(delta[0]!.links).toEqual([{ peer: B, rttMs: 1 }]);
    expect(t.get(A)).toEqual(delta[0]);
    // before any setLocal the floor is only remembered
    const u = new Topology(A);
    expect(u.merge([stale], 1)).toEqual([]);
    expect(u.setLocal([], [], 1)!.seq).toBe(5_001);
  });

  it("initialSeq (persisted counter) keeps seq increasing across a restart with a slow clock", () => {
    const t = new Topology(A, { initialSeq: 10_000 });
    expect(t.setLocal([], [], 5)!.seq).toBe(10_001);
  });
});

describe("Topology.expire", () => {
  it("ages out records not advanced for maxAgeMs, never our own; tombstones stop resurrection", () => {
    const t = new Topology(A, { maxAgeMs: 60_000, refreshMs: 10_000, tombstoneMs: 60_000 });
    t.setLocal([], [], T0);
    t.merge([rec(B, 1), rec(C, 1)], T0);
    t.merge([rec(C, 2)], T0 + 30_000);
    expect(t.expire(T0 + 60_000)).toEqual([]);
    expect(t.expire(T0 + 60_001)).toEqual([B]);
    expect(t.get(B)).toBeUndefined();
    expect(t.get(A)).toBeDefined();
    // a neighbour that still has B@1 cannot bring it back
    expect(t.merge([rec(B, 1)], T0 + 61_000)).toEqual([]);
    // but B restarting (higher seq) is welcome at once
    expect(t.merge([rec(B, 2)], T0 + 62_000)).toHaveLength(1);
    expect(t.expire(T0 + 90_001)).toEqual([C]);
    expect(t.snapshot().tombstones.map((x) => x.node)).toEqual([C]);
    // tombstones themselves go after tombstoneMs (C's is gone; B@2 just aged out and left a new one)
    expect(t.expire(T0 + 200_000)).toEqual([B]);
    expect(t.snapshot().tombstones).toEqual([{ node: B, seq: 2, at: T0 + 200_000 }]);
  });

  it("snapshot and fullSync list every live record sorted by node", () => {
    const t = new Topology(B);
    t.setLocal([{ peer: A, rttMs: 1 }], [], T0);
    t.merge([rec(C, 3), rec(A, 1, [[B, 1]])], T0 + 5);
    expect(t.fullSync().map((r) => r.node)).toEqual([A, B, C]);
    const s = t.snapshot();
    expect(s.self).toBe(B);
    expect(s.records.map((r) => [r.node, r.receivedAt])).toEqual([
      [A, T0 + 5],
      [B, T0],
      [C, T0 + 5],
    ]);
  });
});

describe("topology wire", () => {
  it("round-trips through the control channel codec", () => {
    const recs = [rec(A, 7, [[B, 1.5], [C, 20]], ["10.40.1.0/24", "fd00::/64"]), { ...rec(B, 1), updatedAt: T0 }];
    const bodies = encodeTopologyMessages(recs);
    expect(bodies).toHaveLength(1);
    const wire = decodeControl(encodeControl({ t: "app", ch: "topo", body: bodies[0] }));
    expect(wire.t).toBe("app");
    expect(decodeTopologyMessage((wire as { body: unknown }).body)).toEqual(recs);
  });

  it("chunks large syncs under the budget and each chunk encodes under the control limit", () => {
    const recs = Array.from({ length: 40 }, (_, i) =>
      rec(
        id(i + 1),
        1,
        Array.from({ length: 200 }, (_, j) => [id(1000 + j), 123.4] as [string, number]),
        Array.from({ length: 50 }, (_, j) => `10.${i}.${j}.0/24`),
      ),
    );
    const bodies = encodeTopologyMessages(recs);
    expect(bodies.length).toBeGreaterThan(1);
    const back = bodies.flatMap((b) => decodeTopologyMessage((decodeControl(encodeControl({ t: "app", ch: "topo", body: b })) as { body: unknown }).body));
    expect(back).toEqual(recs.map(validateRecord)); // prefixes come back sorted
    for (const b of bodies) expect(() => encodeControl({ t: "app", ch: "topo", body: b })).not.toThrow();
  });

  it("ignores unknown fields and trailing tuple elements; refuses malformed bodies with ProtocolError", () => {
    expect(decodeTopologyMessage({ v: 1, t: "recs", recs: [[A, 1, [[B, 2, "x"]], [], null, null, null, null, "future"]], extra: 1 })).toEqual([rec(A, 1, [[B, 2]])]);
    const bad: unknown[] = [
      null,
      [],
      { v: 2, t: "recs", recs: [] },
      { v: 1, t: "what", recs: [] },
      { v: 1, t: "recs", recs: "x" },
      { v: 1, t: "recs", recs: [[A, 1, []]] },
      { v: 1, t: "recs", recs: [[A, 1, [[B]], []]] },
      { v: 1, t: "recs", recs: [[A, 1.5, [], []]] },
      { v: 1, t: "recs", recs: [[A, 1, [[B, Infinity]], []]] },
      { v: 1, t: "recs", recs: [[A, 1, [], [42]]] },
    ];
    for (const b of bad) expect(() => decodeTopologyMessage(b), JSON.stringify(b)).toThrow(ProtocolError);
  });

  it("validateRecord sorts links", () => {
    expect(validateRecord(rec(A, 1, [[C, 1], [B, 2]])).links.map((l) => l.peer)).toEqual([B, C]);
  });
});
