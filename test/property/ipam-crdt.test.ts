import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { BlockTable, IpamError, type EntryTuple } from "../../src/ipam/index.js";

const N = 8;
const NODES = ["0000000000000001", "0000000000000002", "0000000000000003", "0000000000000004"];
const FOUNDER = NODES[0]!;

// A "valid history": transfers at (block, version) always name the same owner (only one owner writes it).
const transferOwner = fc.array(fc.constantFrom(...NODES), { minLength: N * 8, maxLength: N * 8 });
const rawEntry = fc.tuple(fc.integer({ min: 0, max: N - 1 }), fc.integer({ min: 1, max: 7 }), fc.constantFrom("t", "c", "f", "o"), fc.constantFrom(...NODES));

const history = fc.tuple(transferOwner, fc.array(fc.array(rawEntry, { maxLength: 12 }), { minLength: 3, maxLength: 3 })).map(([owners, sets]) =>
  sets.map((set) => set.map(([i, v, k, o]): EntryTuple => [i, k === "t" ? owners[i * 8 + v]! : o, v, k as "t" | "c" | "f" | "o"])),
);

function table(...parts: EntryTuple[][]): BlockTable {
  const t = new BlockTable(N, FOUNDER);
  for (const p of parts) t.merge(p);
  return t;
}
const view = (t: BlockTable) => t.all().map((e) => `${e.owner}:${e.version}:${e.kind}`);

describe("ipam block-table CRDT", () => {
  it("merge is commutative, associative and idempotent", () => {
    fc.assert(
      fc.property(history, ([a, b, c]) => {
        const A = table(a!);
        const B = table(b!);
        const C = table(c!);
        const ab = table(A.nonBaseline(), B.nonBaseline());
        const ba = table(B.nonBaseline(), A.nonBaseline());
        expect(view(ab)).toEqual(view(ba));
        const ab_c = table(ab.nonBaseline(), C.nonBaseline());
        const bc = table(B.nonBaseline(), C.nonBaseline());
        const a_bc = table(A.nonBaseline(), bc.nonBaseline());
        expect(view(ab_c)).toEqual(view(a_bc));
        expect(ab_c.digest()).toBe(a_bc.digest());
        expect(A.clone().merge(A.nonBaseline())).toEqual([]);
        // raw entry order does not matter either
        expect(view(table([...a!].reverse()))).toEqual(view(A));
      }),
      { numRuns: 300 },
    );
  });

  it("merge returns exactly the delta: applying only the delta reproduces the merge", () => {
    fc.assert(
      fc.property(history, ([a, b]) => {
        const A = table(a!);
        const before = view(A);
        const target = A.clone();
        const delta = target.merge(table(b!).nonBaseline());
        const changed = new Set(delta.map((d) => d[0]));
        view(target).forEach((v, i) => expect(v !== before[i]).toBe(changed.has(i)));
        const viaDelta = A.clone();
        viaDelta.merge(delta);
        expect(view(viaDelta)).toEqual(view(target));
        expect(target.clone().merge(delta)).toEqual([]);
      }),
      { numRuns: 300 },
    );
  });

  it("two different transfers at one version are refused, all-or-nothing", () => {
    const t = table([[1, NODES[1]!, 2, "t"]]);
    const before = view(t);
    expect(() => t.merge([[0, NODES[2]!, 1, "t"], [1, NODES[2]!, 2, "t"]])).toThrow(IpamError);
    expect(view(t)).toEqual(before);
    expect(() => t.merge([[N, NODES[1]!, 1, "t"]])).toThrow(/outside/);
  });

  it("concurrent claims at one version converge to the lowest claimer; claims beat transfers, forces beat claims", () => {
    const t = table([[0, NODES[2]!, 1, "c"]], [[0, NODES[1]!, 1, "c"]], [[0, NODES[3]!, 1, "t"]]);
    expect(t.get(0)).toEqual({ owner: NODES[1], version: 1, kind: "c" });
    t.merge([[0, NODES[3]!, 1, "f"]]);
    expect(t.get(0).kind).toBe("f");
    t.merge([[0, NODES[2]!, 2, "t"]]);
    expect(t.get(0)).toEqual({ owner: NODES[2], version: 2, kind: "t" });
  });
});
