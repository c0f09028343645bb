import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { backoffDelay, DEFAULT_BACKOFF } from "../../src/mesh/backoff.js";

describe("backoff", () => {
  it("stays within [min, min(max, base*2^n)]", () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 100 }), fc.double({ min: 0, max: 0.999999, noNaN: true }), (n, r) => {
        const d = backoffDelay(n, DEFAULT_BACKOFF, () => r);
        expect(d).toBeGreaterThanOrEqual(DEFAULT_BACKOFF.minMs);
        expect(d).toBeLessThanOrEqual(Math.max(DEFAULT_BACKOFF.minMs, Math.min(DEFAULT_BACKOFF.maxMs, DEFAULT_BACKOFF.baseMs * 2 ** n)));
      }),
    );
  });
  it("grows with attempts and caps at max", () => {
    const top = (n: number) => backoffDelay(n, DEFAULT_BACKOFF, () => 0.999999);
    expect(top(0)).toBeLessThan(top(3));
    expect(top(50)).toBeLessThanOrEqual(DEFAULT_BACKOFF.maxMs);
    expect(top(50)).toBeGreaterThan(DEFAULT_BACKOFF.maxMs * 0.99);
  });
  it("jitters", () => {
    const seen = new Set(Array.from({ length: 20 }, () => backoffDelay(5)));
    expect(seen.size).toBeGreaterThan(5);
  });
});
