/**
 * The WebRTC link's path MTU search (src/mesh/pmtu.ts), sans-I/O with a fake clock: a simulated path that
 * delivers probes up to `path` bytes (acks after `rtt` ms), a local limit like the kernel's route MTU, loss.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { PmtuSearch, type PmtuStep } from "../../src/mesh/pmtu.js";

interface Sim {
  hi: number;
  lo?: number;
  limitMode?: "end" | "clamp";
  first?: number;
  path: number;
  rtt?: number;
  limit?: (sent: number[]) => number | undefined;
  lossy?: () => boolean;
}

/** Drive the search like link-base.ts does: send what it asks, ack after rtt when the path carries it, tick at the deadline. */
function run(sim: Sim) {
  const sent: number[] = [];
  const s = new PmtuSearch({ lo: sim.lo ?? 1280, hi: sim.hi, localLimit: () => sim.limit?.(sent), ...(sim.limitMode ? { limitMode: sim.limitMode } : {}), ...(sim.first ? { first: sim.first } : {}) });
  let now = 0;
  let step: PmtuStep = s.handle({ kind: "start" }, now);
  for (let guard = 0; guard < 500; guard++) {
    if (step.done) return { mtu: step.done.mtu, outcome: step.done.outcome, sent, stats: s.stats, elapsed: now };
    const size = step.probe!;
    sent.push(size);
    const limit = sim.limit?.(sent.slice(0, -1));
    expect(limit === undefined || size <= limit).toBe(true); // never above the local limit
    const arrives = size <= sim.path && !sim.lossy?.();
    const rtt = sim.rtt ?? 2;
    if (arrives && now + rtt < s.deadline!) {
      now += rtt;
      step = s.handle({ kind: "ack", size }, now);
    } else {
      now = s.deadline!;
      step = s.handle({ kind: "tick" }, now);
    }
  }
  throw new Error("search did not end");
}

describe("PmtuSearch (src/mesh/pmtu.ts)", () => {
  it("confirms the built MTU with one probe when the path carries it", () => {
    const r = run({ hi: 4096, path: 9000 });
    expect(r.mtu).toBe(4096);
    expect(r.outcome).toBe("confirmed");
    expect(r.sent).toEqual([4096]);
    expect(r.stats).toMatchObject({ probes: 1, acked: 1, lost: 0, skipped: 0 });
  });

  it("a local limit below the built MTU (the uplink's MTU): ends at once with the limit, nothing sent (the next link checks it)", () => {
    // 2000-byte IPv4 uplink: libdatachannel mtu 2031 is the largest whose packets leave (2031 - 31 = 2000)
    const r = run({ hi: 4096, path: 2031, limit: () => 2031 });
    expect(r).toMatchObject({ mtu: 2028, outcome: "local-limit", sent: [] });
    expect(r.stats).toMatchObject({ probes: 0, skipped: 1 });
    // the next link, built for 2028, confirms it with one full-size probe
    expect(run({ hi: 2028, path: 2031, limit: () => 2031 })).toMatchObject({ mtu: 2028, outcome: "confirmed", sent: [2028] });
    // a limit below 1280 still leaves 1280 (libdatachannel's default)
    expect(run({ hi: 4096, path: 9000, limit: () => 1200 })).toMatchObject({ mtu: 1280, outcome: "local-limit" });
  });

  it("a silent black hole behind the uplink (no ICMP): searches up from 1280 and lands within 16 bytes, three sizes lost at most", () => {
    const r = run({ hi: 4096, path: 2031 });
    expect(r.outcome).toBe("searched");
    expect(r.mtu).toBeLessThanOrEqual(2031);
    expect(2031 - r.mtu).toBeLessThan(16);
    expect(r.stats.lost).toBeLessThanOrEqual(3);
    expect(r.elapsed).toBeLessThan(10_000);
  });

  it("ICMP lowers the kernel's path MTU mid-search: the search ends with the new limit, nothing more is sent", () => {
    // the first probe (4096) leaves, is too big for a router, and the kernel learns 1500 (+31) from its ICMP
    const r = run({ hi: 4096, path: 1531, limit: (sent) => (sent.length === 0 ? undefined : 1531) });
    expect(r.sent).toEqual([4096]); // its retry is not sent: the limit is read first
    expect(r).toMatchObject({ mtu: 1528, outcome: "local-limit" });
  });

  it("finds any path MTU between 1280 and the built one within 16 bytes, with or without a local limit", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1300, max: 4096 }), fc.integer({ min: 1280, max: 4096 }), fc.option(fc.integer({ min: 1280, max: 4096 })), (hi, path, lim) => {
        const limit = lim ?? undefined;
        const r = run({ hi, path, limit: () => limit });
        expect(r.mtu).toBeGreaterThanOrEqual(1280);
        if (limit !== undefined && limit < hi) {
          expect(r).toMatchObject({ mtu: Math.max(1280, limit & ~3), outcome: "local-limit", sent: [] });
          return;
        }
        const want = Math.min(hi, path);
        expect(r.mtu).toBeLessThanOrEqual(want);
        expect(want - r.mtu).toBeLessThan(want === hi ? 1 : 16);
        expect(r.stats.lost).toBeLessThanOrEqual(3);
      }),
    );
  });

  it("random loss only makes the answer smaller, never larger than the path", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1300, max: 4096 }), fc.integer({ min: 1280, max: 4096 }), fc.double({ min: 0, max: 0.5, noNaN: true }), fc.integer(), (hi, path, p, seed) => {
        let x = seed >>> 0 || 1;
        const rnd = () => ((x = (x * 1103515245 + 12345) >>> 0) % 1000) / 1000;
        const r = run({ hi, path, lossy: () => rnd() < p });
        expect(r.mtu).toBeLessThanOrEqual(Math.min(hi, path));
        expect(r.mtu).toBeGreaterThanOrEqual(1280);
      }),
    );
  });

  it("a single lost try per size is retried: one random loss does not lower the answer", () => {
    const seen = new Set<number>();
    const s = new PmtuSearch({ lo: 1280, hi: 4096 });
    let now = 0;
    let step = s.handle({ kind: "start" }, now);
    while (!step.done) {
      const size = step.probe!;
      const first = !seen.has(size);
      seen.add(size);
      if (size <= 2000 && !first) {
        now += 1;
        step = s.handle({ kind: "ack", size }, now);
      } else {
        now = s.deadline!;
        step = s.handle({ kind: "tick" }, now);
      }
    }
    expect(2000 - step.done.mtu).toBeLessThan(16);
  });

  it("waits at least minWaitMs for an ack, and 4 round trips on a slow path; early ticks change nothing", () => {
    const s = new PmtuSearch({ lo: 1280, hi: 4096, minWaitMs: 500 });
    expect(s.handle({ kind: "start" }, 0)).toEqual({ probe: 4096 });
    expect(s.deadline).toBe(500);
    expect(s.handle({ kind: "tick" }, 499)).toEqual({});
    expect(s.handle({ kind: "tick" }, 500)).toEqual({ probe: 4096 }); // second try
    expect(s.handle({ kind: "tick" }, 1000)).toEqual({ probe: 1536 }); // lost: coarse steps from 1280
    expect(s.handle({ kind: "ack", size: 1536 }, 1300)).toEqual({ probe: 1792 });
    expect(s.rtt).toBe(300);
    expect(s.deadline).toBe(1300 + 1200); // 4 x 300 ms
  });

  it("typed drops: a late ack of a timed-out size, an ack with nothing in flight, an ack after the end", () => {
    const s = new PmtuSearch({ lo: 1280, hi: 4096, tries: 1 });
    expect(s.handle({ kind: "ack", size: 4096 }, 0)).toEqual({});
    expect(s.stats.drops["ack-not-in-flight"]).toBe(1);
    s.handle({ kind: "start" }, 0);
    s.handle({ kind: "tick" }, 500); // 4096 lost -> 1536
    expect(s.handle({ kind: "ack", size: 4096 }, 600)).toEqual({});
    expect(s.stats.drops["stale-ack"]).toBe(1);
    expect(s.mtu).toBe(1280);
    const done = new PmtuSearch({ lo: 1280, hi: 1500 });
    done.handle({ kind: "start" }, 0);
    expect(done.handle({ kind: "ack", size: 1500 }, 1)).toEqual({ done: { mtu: 1500, outcome: "confirmed" } });
    expect(done.handle({ kind: "ack", size: 1500 }, 2)).toEqual({});
    expect(done.stats.drops["ack-after-done"]).toBe(1);
  });

  it("nothing to search when the link is built for 1280 or less; a second start is ignored", () => {
    const s = new PmtuSearch({ lo: 1280, hi: 1280 });
    expect(s.handle({ kind: "start" }, 0)).toEqual({ done: { mtu: 1280, outcome: "confirmed" } });
    expect(s.handle({ kind: "start" }, 1)).toEqual({});
    expect(s.stats.probes).toBe(0);
  });

  describe('limitMode "clamp" (the bulk link: datagram sizes, the route MTU caps the search instead of ending it)', () => {
    // bulk datagrams: lo 1200 (RFC 8899 BASE_PLPMTU), hi = a 4000-byte pod packet's datagram
    const bulk = (path: number, limit?: number, lossy?: () => boolean) => run({ lo: 1200, hi: 4060, path, limitMode: "clamp", limit: () => limit, ...(lossy ? { lossy } : {}) });

    it("a route MTU below hi: probes exactly the limit first and ends there (local-limit) when it passes", () => {
      const r = bulk(1972, 1972);
      expect(r).toMatchObject({ mtu: 1972, outcome: "local-limit", sent: [1972] });
      expect(r.stats).toMatchObject({ probes: 1, acked: 1, skipped: 1 });
    });

    it("a silent black hole behind a larger route MTU: searches below the limit and never sends above it", () => {
      const r = bulk(1972, 8972);
      expect(r.outcome).toBe("searched");
      expect(r.sent.every((x) => x <= 8972)).toBe(true);
      expect(1972 - r.mtu).toBeLessThan(16);
      expect(r.mtu).toBeLessThanOrEqual(1972);
    });

    it("the limit drops mid-search (ICMP learnt by the kernel): the next probe is the new limit", () => {
      const r = run({ lo: 1200, hi: 4060, path: 1472, limitMode: "clamp", limit: (sent) => (sent.length === 0 ? undefined : 1472) });
      expect(r.sent).toEqual([4060, 1472]);
      expect(r).toMatchObject({ mtu: 1472, outcome: "local-limit" });
    });

    it("finds any path between lo and hi within 16 bytes and never probes above the limit (property)", () => {
      fc.assert(
        fc.property(fc.integer({ min: 1220, max: 9000 }), fc.integer({ min: 1200, max: 9000 }), fc.option(fc.integer({ min: 1000, max: 9000 })), (hi, path, lim) => {
          const limit = lim ?? undefined;
          const r = run({ lo: 1200, hi, path, limitMode: "clamp", limit: () => limit });
          const cap = limit === undefined ? hi : Math.max(1200, Math.min(hi, limit & ~3));
          const want = Math.max(1200, Math.min(cap, path));
          expect(r.mtu).toBeLessThanOrEqual(Math.max(1200, Math.min(hi, path, limit ?? Infinity)));
          expect(want - r.mtu).toBeLessThan(want === cap ? 1 : 16);
          if (r.mtu === hi) expect(r.outcome).toBe("confirmed");
          else if (limit !== undefined && limit < hi && r.mtu === cap) expect(r.outcome).toBe("local-limit");
          else expect(r.outcome).toBe("searched");
          expect(r.stats.lost).toBeLessThanOrEqual(3);
        }),
      );
    });

    it("`first` (the safe size) is probed before hi; a path below it is searched up from lo (the bulk link: lo 548, first 1200)", () => {
      const fl = (path: number, limit?: number) => run({ lo: 548, first: 1200, hi: 4060, path, limitMode: "clamp", limit: () => limit });
      expect(fl(9000)).toMatchObject({ mtu: 4060, outcome: "confirmed", sent: [1200, 4060] });
      expect(fl(9000, 1972)).toMatchObject({ mtu: 1972, outcome: "local-limit", sent: [1200, 1972] });
      const hole = fl(1972, 8972);
      expect(hole.sent.slice(0, 4)).toEqual([1200, 4060, 4060, 1456]);
      expect(1972 - hole.mtu).toBeLessThan(16);
      const small = fl(700);
      expect(small.sent.slice(0, 3)).toEqual([1200, 1200, 804]); // hi is never tried above a lost first
      expect(small.sent).not.toContain(4060);
      expect(700 - small.mtu).toBeLessThan(16);
      expect(small.outcome).toBe("searched");
    });

    it("a limit equal to an unaligned hi does not bind: hi is probed and confirmed", () => {
      const r = run({ lo: 548, first: 1200, hi: 8993, path: 8993, limitMode: "clamp", limit: () => 8993 });
      expect(r).toMatchObject({ mtu: 8993, outcome: "confirmed", sent: [1200, 8993] });
    });

    it("with `first`: any path between lo and hi within 16 bytes, at most 3 sizes lost (property)", () => {
      fc.assert(
        fc.property(fc.integer({ min: 1300, max: 9000 }), fc.integer({ min: 548, max: 9000 }), fc.option(fc.integer({ min: 600, max: 9000 })), (hi, path, lim) => {
          const limit = lim ?? undefined;
          const r = run({ lo: 548, first: 1200, hi, path, limitMode: "clamp", limit: () => limit });
          // A limit binds (and is rounded down to a multiple of 4) only below a size to probe: one at or above hi
          // leaves hi as it is (fresh clone, seed -85942651: hi = path = limit = 8993 is confirmed at 8993).
          const cap = limit === undefined || limit >= hi ? hi : Math.max(548, Math.min(hi, limit & ~3));
          const want = Math.max(548, Math.min(cap, path));
          expect(r.mtu).toBeLessThanOrEqual(want);
          expect(want - r.mtu).toBeLessThan(want === cap ? 1 : 16);
          expect(r.stats.lost).toBeLessThanOrEqual(3);
        }),
      );
    });

    it("random loss only makes the answer smaller (property)", () => {
      fc.assert(
        fc.property(fc.integer({ min: 1220, max: 9000 }), fc.integer({ min: 1200, max: 9000 }), fc.integer({ min: 1200, max: 9000 }), fc.double({ min: 0, max: 0.5, noNaN: true }), fc.integer(), (hi, path, limit, p, seed) => {
          let x = seed >>> 0 || 1;
          const rnd = () => ((x = (x * 1103515245 + 12345) >>> 0) % 1000) / 1000;
          const r = run({ lo: 1200, hi, path, limitMode: "clamp", limit: () => limit, lossy: () => rnd() < p });
          expect(r.mtu).toBeGreaterThanOrEqual(1200);
          expect(r.mtu).toBeLessThanOrEqual(Math.max(1200, Math.min(hi, path, limit)));
        }),
      );
    });
  });
});
