/** The path MTU search (src/packet/gso-pmtu.ts) against random paths: it finds the path MTU within its resolution. */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { PmtuSearch } from "../../src/packet/gso-pmtu.js";

/** Run the search against a path that carries packets up to `path` bytes; returns the result and rounds. */
function run(hi: number, path: number, lossy = () => false) {
  const s = new PmtuSearch({ lo: 1280, hi });
  for (let guard = 0; guard < 20; guard++) {
    for (const size of s.pending()) if (size <= path && !lossy()) s.acked(size);
    const r = s.endRound();
    if (r.done) return { mtu: r.mtu, rounds: s.rounds };
  }
  throw new Error("search did not end");
}

describe("PmtuSearch", () => {
  it("confirms the built MTU in one round when the path carries it", () => {
    expect(run(4096, 9000)).toEqual({ mtu: 4096, rounds: 1 });
    expect(run(1500, 1500)).toEqual({ mtu: 1500, rounds: 1 });
  });

  it("finds any path MTU between 1280 and the built one within 16 bytes, in at most 4 rounds", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1300, max: 4096 }), fc.integer({ min: 1280, max: 4096 }), (hi, path) => {
        const { mtu, rounds } = run(hi, path);
        const want = Math.min(hi, path);
        expect(mtu).toBeLessThanOrEqual(want);
        expect(want - mtu).toBeLessThan(path >= hi ? 1 : 16);
        expect(mtu).toBeGreaterThanOrEqual(1280);
        expect(rounds).toBeLessThanOrEqual(4);
      }),
    );
  });

  it("a lost probe only makes the answer smaller, never larger than the path", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1300, max: 4096 }), fc.integer({ min: 1280, max: 4096 }), fc.double({ min: 0, max: 0.5, noNaN: true }), (hi, path, p) => {
        const { mtu } = run(hi, path, () => Math.random() < p);
        expect(mtu).toBeLessThanOrEqual(Math.min(hi, path));
        expect(mtu).toBeGreaterThanOrEqual(1280);
      }),
    );
  });

  it("ignores acks for sizes it did not ask for", () => {
    const s = new PmtuSearch({ lo: 1280, hi: 4096 });
    expect(s.acked(3000)).toBe(false);
    expect(s.acked(4096)).toBe(true);
    expect(s.complete).toBe(true);
  });
});
