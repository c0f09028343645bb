/** The path MTU search (src/packet/gso-pmtu.ts) against random paths: it finds the path MTU within its fine step. */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { PmtuSearch } from "../../src/packet/gso-pmtu.js";

/** Run the search against a path that carries packets up to `path` bytes (stop-and-wait: one probe at a time). */
function run(hi: number, path: number, lossy = () => false) {
  const s = new PmtuSearch({ lo: 1280, hi });
  for (let guard = 0; guard < 200; guard++) {
    const size = s.next();
    if (size === undefined) return { mtu: s.mtu, probes: s.probes, losses: s.losses };
    s.result(size, size <= path && !lossy());
  }
  throw new Error("search did not end");
}

describe("PmtuSearch", () => {
  it("confirms the built MTU with one probe when the path carries it", () => {
    expect(run(4096, 9000)).toEqual({ mtu: 4096, probes: 1, losses: 0 });
    expect(run(1500, 1500)).toEqual({ mtu: 1500, probes: 1, losses: 0 });
  });

  it("finds the 2000-byte LAN below a 4096 link within 16 bytes, losing three sizes at most", () => {
    const r = run(4096, 2000);
    expect(2000 - r.mtu).toBeLessThan(16);
    expect(r.mtu).toBeLessThanOrEqual(2000);
    expect(r.losses).toBeLessThanOrEqual(3);
  });

  it("finds any path MTU between 1280 and the built one within 16 bytes; never more than three sizes lost", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1300, max: 4096 }), fc.integer({ min: 1280, max: 4096 }), (hi, path) => {
        const { mtu, losses, probes } = run(hi, path);
        const want = Math.min(hi, path);
        expect(mtu).toBeLessThanOrEqual(want);
        expect(want - mtu).toBeLessThan(path >= hi ? 1 : 16);
        expect(mtu).toBeGreaterThanOrEqual(1280);
        expect(losses).toBeLessThanOrEqual(3);
        expect(probes).toBeLessThanOrEqual(2 + 2 * (12 + 16) + 6);
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

  it("one lost probe per size is retried: a single random loss does not lower the answer", () => {
    let n = 0;
    // every probe's first try is lost once, at each size
    const seen = new Set<number>();
    const s = new PmtuSearch({ lo: 1280, hi: 4096 });
    for (let size = s.next(); size !== undefined; size = s.next()) {
      n++;
      const first = !seen.has(size);
      seen.add(size);
      s.result(size, size <= 2000 && !first);
    }
    expect(2000 - s.mtu).toBeLessThan(16);
    expect(n).toBeGreaterThan(2);
  });

  it("ignores results for sizes it did not ask for", () => {
    const s = new PmtuSearch({ lo: 1280, hi: 4096 });
    expect(s.next()).toBe(4096);
    s.result(3000, true);
    expect(s.mtu).toBe(1280);
    s.result(4096, true);
    expect(s.done).toBe(true);
    expect(s.mtu).toBe(4096);
  });
});
