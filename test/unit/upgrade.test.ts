// The relay -> WebRTC upgrade state machine on its own (src/mesh/upgrade.ts): named states, guards, backoff.
import { describe, expect, it } from "vitest";
import { PROBE_FIRST_MS, PROBE_MAX_MS, Upgrade } from "../../src/mesh/upgrade.js";

const make = () => {
  let n = 0;
  return new Upgrade({ connectTimeoutMs: 1000, newConn: () => `c${++n}`, random: () => 0.5 });
};
const tick = (u: Upgrade, now: number, o: Partial<{ offerer: boolean; onRelay: boolean; canDial: boolean }> = {}) => u.handle({ type: "tick", offerer: true, onRelay: true, canDial: true, ...o }, now);

describe("Upgrade", () => {
  it("offerer: waits PROBE_FIRST_MS on the relay, probes, promotes on open", () => {
    const u = make();
    expect(tick(u, 0)).toEqual([]); // idle: not on a relay link yet
    u.handle({ type: "relay-open" }, 0);
    expect(u.state).toBe("waiting");
    expect(tick(u, PROBE_FIRST_MS - 1)).toEqual([]);
    expect(tick(u, PROBE_FIRST_MS, { canDial: false })).toEqual([]); // signaling down: no attempt
    expect(tick(u, PROBE_FIRST_MS)).toEqual([{ type: "start", conn: "c1" }]);
    expect(u.state).toBe("probing");
    expect(u.handle({ type: "opened", conn: "other", offerer: true }, 1)).toEqual([]); // not ours
    expect(u.handle({ type: "opened", conn: "c1", offerer: true }, 1)).toEqual([{ type: "promote", conn: "c1" }]);
    expect(u.state).toBe("open");
    u.handle({ type: "promoted" }, 2);
    expect(u.state).toBe("idle");
    expect(u.attempts).toBe(0);
  });

  it("an attempt that does not open in time ends (the peer is told) and the next one backs off, capped", () => {
    const u = make();
    u.handle({ type: "relay-open" }, 0);
    let now = PROBE_FIRST_MS;
    tick(u, now);
    const delays: number[] = [];
    for (let i = 0; i < 10; i++) {
      now += 1000;
      const out = tick(u, now);
      expect(out).toEqual([{ type: "end", conn: `c${i + 1}`, reason: "upgrade attempt did not open in time", tellPeer: true }]);
      delays.push(u.nextAt - now);
      expect(tick(u, u.nextAt - 1)).toEqual([]);
      now = u.nextAt;
      expect(tick(u, now)).toEqual([{ type: "start", conn: `c${i + 2}` }]);
    }
    expect(delays.slice(0, 3)).toEqual([PROBE_FIRST_MS * 2, PROBE_FIRST_MS * 4, PROBE_FIRST_MS * 8]);
    expect(Math.max(...delays)).toBe(PROBE_MAX_MS);
  });

  it("answerer: accepts the offerer's attempt (a newer one replaces it), follows the offerer's bye of the old link", () => {
    const u = make();
    u.handle({ type: "relay-open" }, 0);
    expect(tick(u, PROBE_FIRST_MS, { offerer: false })).toEqual([]); // the answerer never dials
    expect(u.handle({ type: "offer", conn: "x1" }, 10)).toEqual([{ type: "accept", conn: "x1" }]);
    expect(u.handle({ type: "offer", conn: "x2" }, 20)).toEqual([
      { type: "end", conn: "x1", reason: "replaced by a newer upgrade attempt", tellPeer: true },
      { type: "accept", conn: "x2" },
    ]);
    expect(u.handle({ type: "opened", conn: "x2", offerer: false }, 40)).toEqual([]);
    expect(u.handle({ type: "old-link-bye" }, 50)).toEqual([{ type: "promote", conn: "x2" }]);
    u.handle({ type: "promoted" }, 60);
    expect(u.handle({ type: "old-link-bye" }, 70)).toEqual([{ type: "close-old" }]); // no attempt: the old link just closes
  });

  it("answerer: the offerer's bye can overtake the attempt opening: follow when it opens, or drop the old link if it fails", () => {
    const u = make();
    u.handle({ type: "relay-open" }, 0);
    u.handle({ type: "offer", conn: "y1" }, 10);
    expect(u.handle({ type: "old-link-bye" }, 20)).toEqual([]); // retired, not closed: the attempt is about to open
    expect(u.handle({ type: "opened", conn: "y1", offerer: false }, 30)).toEqual([{ type: "promote", conn: "y1" }]);
    u.handle({ type: "promoted" }, 31);
    u.handle({ type: "relay-open" }, 40);
    u.handle({ type: "offer", conn: "y2" }, 50);
    u.handle({ type: "old-link-bye" }, 60);
    expect(u.handle({ type: "closed", conn: "y2", reason: "ICE failed" }, 70)).toEqual([
      { type: "end", conn: "y2", reason: "ICE failed", tellPeer: false },
      { type: "close-old" },
    ]);
  });

  it("closed, bye and link-replaced end only the running attempt; stale events are ignored", () => {
    const u = make();
    u.handle({ type: "relay-open" }, 0);
    tick(u, PROBE_FIRST_MS);
    expect(u.handle({ type: "closed", conn: "nope", reason: "x" }, 1)).toEqual([]);
    expect(u.handle({ type: "closed", conn: "c1", reason: "ICE failed" }, 1)).toEqual([{ type: "end", conn: "c1", reason: "ICE failed", tellPeer: false }]);
    expect(u.handle({ type: "bye", conn: "c1" }, 2)).toEqual([]); // already ended
    tick(u, u.nextAt);
    expect(u.handle({ type: "bye", conn: "c2" }, u.nextAt)).toEqual([{ type: "end", conn: "c2", reason: "peer ended the upgrade attempt", tellPeer: true }]);
    tick(u, u.nextAt);
    expect(u.handle({ type: "link-replaced" }, u.nextAt)).toEqual([{ type: "end", conn: "c3", reason: "link replaced", tellPeer: true }]);
    expect(u.handle({ type: "link-replaced" }, u.nextAt)).toEqual([]);
  });
});
