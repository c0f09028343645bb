import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { backoffDelay, DEFAULT_BACKOFF, PROBE_BACKOFF, probeDelay, RECENT_PATH, recentPathBackoff } from "../../src/mesh/backoff.js";

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

  it("retries a path that was up a moment ago within RECENT_PATH.maxMs, however many attempts failed", () => {
    const now = 1_000_000;
    for (const n of [0, 3, 10, 30]) {
      const recent = backoffDelay(n, recentPathBackoff(DEFAULT_BACKOFF, now - 30_000, now), () => 0.999999);
      expect(recent).toBeLessThanOrEqual(RECENT_PATH.maxMs);
    }
    // long ago, or never: the full backoff
    expect(recentPathBackoff(DEFAULT_BACKOFF, now - RECENT_PATH.windowMs, now)).toBe(DEFAULT_BACKOFF);
    expect(recentPathBackoff(DEFAULT_BACKOFF, undefined, now)).toBe(DEFAULT_BACKOFF);
    // a config already tighter than the recent cap is kept
    const tight = { baseMs: 100, maxMs: 1000, minMs: 50 };
    expect(recentPathBackoff(tight, now - 1, now)).toBe(tight);
  });

  it("upgrade probes: doubling up to PROBE_BACKOFF.maxMs, at most RECENT_PATH.maxMs (+25%) after a recent link", () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 60 }), fc.double({ min: 0, max: 0.999999, noNaN: true }), fc.option(fc.integer({ min: 0, max: 2 * RECENT_PATH.windowMs })), (n, r, ago) => {
        const now = 10_000_000;
        const d = probeDelay(n, ago === null ? undefined : now - ago, now, PROBE_BACKOFF, () => r);
        const cap = ago !== null && ago < RECENT_PATH.windowMs ? RECENT_PATH.maxMs : PROBE_BACKOFF.maxMs;
        const base = Math.min(cap, PROBE_BACKOFF.firstMs * 2 ** n);
        expect(d).toBeGreaterThanOrEqual(Math.floor(base * 0.75));
        expect(d).toBeLessThanOrEqual(Math.ceil(base * 1.25));
      }),
    );
    expect(probeDelay(8, undefined, 0, PROBE_BACKOFF, () => 0.5)).toBe(PROBE_BACKOFF.maxMs); // no recent link: minutes
  });
});
