import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { ReplayWindow, WINDOW_SIZE } from "../../src/bulk/replay.js";

/** Reference model: a set of everything seen and the highest counter; accept iff unseen and within the window. */
class Model {
  private seen = new Set<number>();
  private last = 0;
  private any = false;
  validate(c: number, limit: number): boolean {
    if (c >= limit) return false;
    if (this.any && c < this.last && this.last - c > WINDOW_SIZE) return false;
    if (this.seen.has(c)) return false;
    this.seen.add(c);
    if (!this.any || c > this.last) this.last = c;
    this.any = true;
    return true;
  }
}

describe("bulk replay window", () => {
  it("accepts each counter once, in any order within the window", () => {
    const w = new ReplayWindow();
    for (let i = 0; i < 20_000; i++) expect(w.validate(i)).toBe(true);
    for (let i = 20_000 - WINDOW_SIZE; i < 20_000; i++) expect(w.validate(i)).toBe(false);
    expect(w.validate(20_000 - WINDOW_SIZE - 1)).toBe(false);
    expect(w.validate(1e12)).toBe(true);
    expect(w.validate(1e12 - WINDOW_SIZE)).toBe(true);
    expect(w.validate(1e12 - WINDOW_SIZE - 1)).toBe(false);
  });

  it("rejects counters at or over the limit and non-integers", () => {
    const w = new ReplayWindow();
    expect(w.validate(10, 10)).toBe(false);
    expect(w.validate(-1)).toBe(false);
    expect(w.validate(1.5)).toBe(false);
    expect(w.validate(9, 10)).toBe(true);
  });

  it("matches the reference model on random sequences (jumps, reorders, replays)", () => {
    const step = fc.oneof(
      fc.integer({ min: 0, max: 40 }).map((d) => ({ kind: "fwd" as const, d })),
      fc.integer({ min: 0, max: WINDOW_SIZE + 64 }).map((d) => ({ kind: "back" as const, d })),
      fc.integer({ min: 0, max: 100_000 }).map((d) => ({ kind: "jump" as const, d })),
      fc.constant({ kind: "again" as const, d: 0 }),
    );
    fc.assert(
      fc.property(fc.array(step, { maxLength: 600 }), (steps) => {
        const w = new ReplayWindow();
        const m = new Model();
        let hi = 0;
        let prev = 0;
        for (const s of steps) {
          let c = s.kind === "fwd" ? hi + s.d : s.kind === "back" ? Math.max(0, hi - s.d) : s.kind === "jump" ? hi + s.d : prev;
          c = Math.min(c, 2 ** 50);
          const limit = 2 ** 49;
          expect(w.validate(c, limit)).toBe(m.validate(c, limit));
          if (c < limit) hi = Math.max(hi, c);
          prev = c;
        }
      }),
      { numRuns: 300 },
    );
  });
});
