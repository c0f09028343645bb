import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { DEFAULT_TIMING, isOfferer, PeerFsm, type PeerAction, type PeerEvent } from "../../src/mesh/peer.js";

const A = "0000000000000001";
const B = "0000000000000002";
const timing = { ...DEFAULT_TIMING, connectTimeoutMs: 1000, heartbeatMs: 100, deadAfterMs: 500, goneTtlMs: 10_000, backoff: { baseMs: 100, maxMs: 1000, minMs: 50 } };
const types = (as: PeerAction[]) => as.map((a) => a.type);

describe("PeerFsm", () => {
  it("the lower id offers, the other waits (no glare)", () => {
    expect(isOfferer(A, B)).toBe(true);
    expect(isOfferer(B, A)).toBe(false);
    const offerer = new PeerFsm(A, B, timing);
    const answerer = new PeerFsm(B, A, timing);
    expect(types(offerer.handle({ type: "present" }, 0))).toEqual(["dial"]);
    expect(types(answerer.handle({ type: "present" }, 0))).toEqual([]);
    expect(types(answerer.handle({ type: "offer", conn: "x" }, 1))).toEqual(["accept"]);
    expect(offerer.handle({ type: "offer", conn: "y" }, 1)).toEqual([]); // offerer ignores offers
  });

  it("connects, pings on heartbeat, measures RTT", () => {
    const f = new PeerFsm(A, B, timing);
    const [dial] = f.handle({ type: "present" }, 0) as [{ type: "dial"; conn: string }];
    expect(types(f.handle({ type: "open", conn: dial.conn }, 10))).toEqual(["hello", "ping"]);
    expect(f.state).toBe("connected");
    expect(types(f.handle({ type: "tick", canDial: true }, 50))).toEqual([]);
    expect(types(f.handle({ type: "tick", canDial: true }, 111))).toEqual(["ping"]);
    f.handle({ type: "pong", seq: 2, sentAt: 111 }, 115);
    expect(f.rttMs).toBe(4);
  });

  it("times out a link that never opens and redials with backoff", () => {
    const f = new PeerFsm(A, B, timing, (n) => `c${n}`, () => 0);
    f.handle({ type: "present" }, 0);
    const acts = f.handle({ type: "tick", canDial: true }, 1001);
    expect(acts).toEqual([{ type: "close", conn: "c1", reason: expect.stringMatching(/did not open/) }]);
    expect(f.state).toBe("backoff");
    expect(f.handle({ type: "tick", canDial: true }, 1002)).toEqual([]); // minMs 50 not elapsed
    expect(f.handle({ type: "tick", canDial: false }, 2000)).toEqual([]); // signaling down: no dial
    expect(f.handle({ type: "tick", canDial: true }, 2000)).toEqual([{ type: "dial", conn: "c2" }]);
  });

  it("redials a link that was up a moment ago within seconds, however many attempts failed since", () => {
    const slow = { ...timing, backoff: { baseMs: 500, maxMs: 60_000, minMs: 200 } };
    const f = new PeerFsm(A, B, slow, (n) => `c${n}`, () => 0.999999);
    f.handle({ type: "present" }, 0);
    f.handle({ type: "open", conn: "c1" }, 0);
    let now = 10_000;
    f.handle({ type: "tick", canDial: true }, now); // no heartbeat: dead
    expect(f.state).toBe("backoff");
    expect(f.lastUpAt).toBe(now);
    for (let i = 0; i < 12; i++) {
      // each redial times out; the wait before the next one stays within RECENT_PATH.maxMs (5 s)
      const t0 = now;
      while (!f.handle({ type: "tick", canDial: true }, now).some((a) => a.type === "dial")) now += 100;
      expect(now - t0).toBeLessThanOrEqual(5_000);
      now += slow.connectTimeoutMs;
      f.handle({ type: "tick", canDial: true }, now);
      expect(f.state).toBe("backoff");
    }
    // a peer that never connected backs off fully
    const g = new PeerFsm(A, B, slow, (n) => `c${n}`, () => 0.999999);
    g.handle({ type: "present" }, 0);
    let t = 0;
    for (let i = 0; i < 8; i++) {
      t += slow.connectTimeoutMs;
      g.handle({ type: "tick", canDial: true }, t);
      const t0 = t;
      while (!g.handle({ type: "tick", canDial: true }, t).some((a) => a.type === "dial")) t += 100;
      if (i === 7) expect(t - t0).toBeGreaterThan(30_000);
    }
  });

  it("detects a dead link by missing heartbeats", () => {
    const f = new PeerFsm(A, B, timing, (n) => `c${n}`);
    f.handle({ type: "present" }, 0);
    f.handle({ type: "open", conn: "c1" }, 0);
    f.handle({ type: "heard" }, 300);
    expect(f.handle({ type: "tick", canDial: true }, 800).map((a) => a.type)).not.toContain("close");
    expect(f.handle({ type: "tick", canDial: true }, 801)).toContainEqual({ type: "close", conn: "c1", reason: expect.stringMatching(/no heartbeat/) });
    expect(f.state).toBe("backoff");
  });

  it("keeps a connected link when the peer leaves signaling; bye ends it", () => {
    const f = new PeerFsm(A, B, timing, (n) => `c${n}`);
    f.handle({ type: "present" }, 0);
    f.handle({ type: "open", conn: "c1" }, 0);
    expect(f.handle({ type: "absent" }, 10)).toEqual([]);
    expect(f.state).toBe("connected");
    expect(f.handle({ type: "bye", reason: "stopping" }, 20)).toEqual([{ type: "close", conn: "c1", reason: "peer said bye: stopping" }]);
    expect(f.state).toBe("gone");
    expect(types(f.handle({ type: "tick", canDial: true }, 20 + timing.goneTtlMs))).toEqual(["remove"]);
  });

  it("ignores events for stale connections", () => {
    const f = new PeerFsm(B, A, timing);
    f.handle({ type: "present" }, 0);
    f.handle({ type: "offer", conn: "new" }, 0);
    expect(f.handle({ type: "open", conn: "old" }, 1)).toEqual([]);
    expect(f.handle({ type: "closed", conn: "old", reason: "x" }, 1)).toEqual([]);
    expect(f.state).toBe("connecting");
  });

  it("reports auth failures and does not drop a live link for a forged offer", () => {
    const f = new PeerFsm(B, A, timing);
    f.handle({ type: "present" }, 0);
    f.handle({ type: "offer", conn: "c" }, 0);
    f.handle({ type: "open", conn: "c" }, 1);
    expect(f.handle({ type: "auth-failed", reason: "forged" }, 2)).toEqual([]);
    expect(f.state).toBe("connected");
    const g = new PeerFsm(A, B, timing, (n) => `c${n}`);
    g.handle({ type: "present" }, 0);
    expect(g.handle({ type: "auth-failed", conn: "c1", reason: "bad sig" }, 1)).toEqual([{ type: "close", conn: "c1", reason: "bad sig" }]);
    expect(g.state).toBe("auth-failed");
    expect(g.lastError).toBe("bad sig");
  });

  it("half-open: a link whose peer is heard but acks none of our heartbeats closes within deadAfterMs", () => {
    const f = new PeerFsm(A, B, timing, (n) => `c${n}`);
    f.handle({ type: "present" }, 0);
    f.handle({ type: "open", conn: "c1" }, 0);
    // The peer hears us until t=1000: its pings carry acks of our pings.
    let now = 0;
    for (; now <= 1000; now += 50) {
      for (const a of f.handle({ type: "tick", canDial: true }, now)) if (a.type === "ping") f.handle({ type: "heard", ack: a.seq }, now);
    }
    // From now on our pings are lost; its pings still reach us every 50 ms, acking the last one it got.
    const cut = now;
    let closedAt: number | undefined;
    for (let theirs = 1; now <= cut + 2000 && closedAt === undefined; now += 50) {
      f.handle({ type: "ping-in", seq: theirs++ }, now);
      f.handle({ type: "heard", ack: 20 }, now);
      const acts = f.handle({ type: "tick", canDial: true }, now);
      if (acts.some((a) => a.type === "close")) closedAt = now;
    }
    expect(closedAt).toBeDefined();
    expect(closedAt! - cut).toBeLessThanOrEqual(timing.deadAfterMs + timing.heartbeatMs);
    expect(f.state).toBe("backoff");
    expect(f.lastError).toMatch(/one-way link/);
  });

  it("half-open counts ack progress, not round trips: acks delayed by more than deadAfterMs, or carried only by the peer's pings, keep the link", () => {
    const f = new PeerFsm(A, B, timing, (n) => `c${n}`);
    f.handle({ type: "present" }, 0);
    f.handle({ type: "open", conn: "c1" }, 0);
    // Every ack arrives 3 x deadAfterMs after the ping it acks (heartbeats queued behind data), and most are
    // lost (a congested relay drops frames): only every 4th ping's ack arrives, in one of the peer's pings.
    const delay = 3 * timing.deadAfterMs;
    const due: { at: number; ack: number }[] = [];
    for (let now = 0; now <= 20 * timing.deadAfterMs; now += 25) {
      // the peer's own messages keep arriving (it hears us, late): the silent rule is satisfied
      for (const a of f.handle({ type: "tick", canDial: true }, now)) if (a.type === "ping" && a.seq % 4 === 0) due.push({ at: now + delay, ack: a.seq });
      while (due.length && due[0]!.at <= now) f.handle({ type: "heard", ack: due.shift()!.ack }, now);
      f.handle({ type: "heard" }, now);
      expect(f.state).toBe("connected");
    }
    expect(due.length).toBeGreaterThan(0); // acks were still in flight: the link lived on progress alone
  });

  it("half-open: a peer that sends no acks (an older agent) is judged by silence alone; acks beyond our seq do not count", () => {
    const f = new PeerFsm(A, B, timing, (n) => `c${n}`);
    f.handle({ type: "present" }, 0);
    f.handle({ type: "open", conn: "c1" }, 0);
    for (let now = 0; now <= 10 * timing.deadAfterMs; now += 50) {
      f.handle({ type: "heard" }, now);
      f.handle({ type: "tick", canDial: true }, now);
    }
    expect(f.state).toBe("connected");
    // An ack of a ping we never sent (a restarted peer's stale view, or a forgery) is no progress.
    const g = new PeerFsm(A, B, timing, (n) => `c${n}`);
    g.handle({ type: "present" }, 0);
    g.handle({ type: "open", conn: "c1" }, 0);
    let closed = false;
    for (let now = 0; now <= 2 * timing.deadAfterMs && !closed; now += 50) {
      g.handle({ type: "heard", ack: 1_000_000 }, now);
      closed = g.handle({ type: "tick", canDial: true }, now).some((a) => a.type === "close");
    }
    expect(closed).toBe(true);
    expect(g.lastError).toMatch(/one-way link/);
  });

  it("pings carry the highest ping seq heard from the peer on this link; a new link starts over", () => {
    const f = new PeerFsm(A, B, timing, (n) => `c${n}`);
    f.handle({ type: "present" }, 0);
    expect(f.handle({ type: "open", conn: "c1" }, 0)).toContainEqual({ type: "ping", seq: 1, ack: 0 });
    f.handle({ type: "ping-in", seq: 7 }, 10);
    f.handle({ type: "ping-in", seq: 5 }, 20); // reordered: the highest stays
    expect(f.handle({ type: "tick", canDial: true }, 100)).toContainEqual({ type: "ping", seq: 2, ack: 7 });
    f.handle({ type: "swap", conn: "c9" }, 150);
    expect(f.handle({ type: "tick", canDial: true }, 200)).toContainEqual({ type: "ping", seq: 3, ack: 0 });
  });

  it("random event sequences keep the machine consistent", () => {
    const ev: fc.Arbitrary<PeerEvent> = fc.oneof(
      fc.constant({ type: "present" } as const),
      fc.constant({ type: "absent" } as const),
      fc.record({ type: fc.constant("offer" as const), conn: fc.constantFrom("c1", "c2", "c3") }),
      fc.record({ type: fc.constant("open" as const), conn: fc.constantFrom("c1", "c2", "c3") }),
      fc.record({ type: fc.constant("closed" as const), conn: fc.constantFrom("c1", "c2", "c3"), reason: fc.constant("x") }),
      fc.record({ type: fc.constant("auth-failed" as const), conn: fc.option(fc.constantFrom("c1", "c2"), { nil: undefined }), reason: fc.constant("y") }),
      fc.constant({ type: "heard" } as const),
      fc.record({ type: fc.constant("tick" as const), canDial: fc.boolean() }),
      fc.record({ type: fc.constant("bye" as const), reason: fc.constant("z") }),
    );
    fc.assert(
      fc.property(fc.boolean(), fc.array(fc.tuple(ev, fc.integer({ min: 0, max: 700 })), { maxLength: 60 }), (offerer, evs) => {
        const f = offerer ? new PeerFsm(A, B, timing, (n) => `c${n}`) : new PeerFsm(B, A, timing);
        let now = 0;
        let open: string | undefined; // the conn the driver holds a link for
        for (const [e, dt] of evs) {
          now += dt;
          for (const a of f.handle(e, now)) {
            if (a.type === "dial" || a.type === "accept") open = a.conn;
            if (a.type === "close" && a.conn === open) open = undefined;
          }
          // Invariants: connected/connecting always have a conn; gone/backoff/waiting never hold one.
          if (f.state === "connected" || f.state === "connecting") expect(f.conn).toBeDefined();
          if (f.state === "gone" || f.state === "backoff" || f.state === "waiting") expect(f.conn).toBeUndefined();
          if (f.conn !== undefined) expect(open).toBe(f.conn);
          if (f.state !== "connected") expect(f.connectedAt).toBeUndefined();
        }
      }),
      { numRuns: 500 },
    );
  });
});
