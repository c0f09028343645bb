/**
 * The relay -> WebRTC upgrade of one peer, as a state machine with named states (sans-I/O: `handle(event,
 * now)` returns actions; MeshManager owns the links and performs them). While a peer is linked through the
 * signaling server's relay, the offerer keeps trying WebRTC in the background and switches make-before-break:
 *
 *   idle ──relay-open──▶ waiting ──tick (offerer, signaling up, now ≥ nextAt)──▶ probing ──opened──▶ open
 *                          ▲  ▲                                                    │  answerer: offer ──┘
 *                          │  └──── end: closed / bye / did not open in time ◀─────┘           │
 *                          │        (attempts++, nextAt = now + backoff)                        │
 *                          └───────────────────── promoted ◀── offerer: at once; answerer: on the
 *                                                   (→ idle)     offerer's bye of the old link
 *
 *   idle      no relay link in use (WebRTC, or not connected)
 *   waiting   on the relay; the next attempt is due at `nextAt` (PROBE_FIRST_MS after the relay opened,
 *             then backoff.ts probeDelay: doubling up to PROBE_MAX_MS, or a few seconds while a link to
 *             the peer was up recently; ±25% jitter from the injected random source). `path-works` (a
 *             direct UDP path to the peer works now: the bulk link came up) makes it due at once, once
 *             per failed attempt, so a healed path is used within seconds, not at the end of a backoff
 *   probing   a WebRTC attempt (`conn`) runs beside the relay link, until `deadline`
 *   open      the attempt opened; the offerer promotes it (the old link is retired with a bye), the
 *             answerer follows when that bye arrives. Both links carry traffic meanwhile. The bye can
 *             overtake the answerer's side of the attempt opening: the attempt is then `retired` and the
 *             answerer promotes as soon as it opens (or, if it fails, drops the retired old link too).
 */
import { PROBE_BACKOFF, probeDelay } from "./backoff.js";

export const PROBE_FIRST_MS = PROBE_BACKOFF.firstMs;
export const PROBE_MAX_MS = PROBE_BACKOFF.maxMs;

export type UpgradeState = "idle" | "waiting" | "probing" | "open";

export type UpgradeEvent =
  /** the relay link opened: schedule the first attempt */
  | { type: "relay-open" }
  | { type: "tick"; offerer: boolean; onRelay: boolean; canDial: boolean }
  /** answerer: the offerer started an attempt */
  | { type: "offer"; conn: string }
  | { type: "opened"; conn: string; offerer: boolean }
  /** the attempt's link closed by itself */
  | { type: "closed"; conn: string; reason: string }
  /** the attempt's link failed the identity proof over the link */
  | { type: "refused"; conn: string; reason: string }
  /** the peer ended the attempt (signaled bye for its conn) */
  | { type: "bye"; conn: string }
  /** answerer: the offerer retired the old link (the attempt, if open, becomes the link) */
  | { type: "old-link-bye" }
  /** the mesh replaced or dropped the peer's link */
  | { type: "link-replaced" }
  /** the mesh made the open attempt the peer's link */
  | { type: "promoted" }
  /** a direct UDP path to the peer works now (the bulk link's handshake went through) */
  | { type: "path-works" };

export type UpgradeAction =
  | { type: "start"; conn: string }
  | { type: "accept"; conn: string }
  /** close the attempt's link; `tellPeer`: send the peer a bye for it */
  | { type: "end"; conn: string; reason: string; tellPeer: boolean }
  | { type: "promote"; conn: string }
  /** close the peer's current (old) link: the offerer retired it and no attempt will replace it */
  | { type: "close-old" };

export interface UpgradeOptions {
  connectTimeoutMs: number;
  newConn: () => string;
  random: () => number;
  /** when a link to the peer was last up (the direct path was lost then): recent paths retry sooner */
  lastUpAt?: () => number | undefined;
}

export class Upgrade {
  state: UpgradeState = "idle";
  /** the running attempt's connection id (probing, open) */
  conn: string | undefined;
  deadline = 0;
  attempts = 0;
  nextAt = 0;
  /** answerer: the offerer already retired the old link for the running attempt */
  retired = false;
  /** `attempts` when a path-works hint last moved the next attempt forward (once per failed attempt) */
  private hintedAt = -1;

  constructor(private readonly o: UpgradeOptions) {}

  handle(ev: UpgradeEvent, now: number): UpgradeAction[] {
    switch (ev.type) {
      case "relay-open":
        this.attempts = 0;
        this.hintedAt = -1;
        this.nextAt = now + PROBE_FIRST_MS;
        if (this.state === "idle") this.state = "waiting";
        return [];
      case "tick": {
        if (this.state === "probing" && now >= this.deadline) return this.end("upgrade attempt did not open in time", true, now, true);
        if (this.state === "waiting" && ev.offerer && ev.onRelay && ev.canDial && now >= this.nextAt) {
          const conn = this.o.newConn();
          this.begin(conn, now);
          return [{ type: "start", conn }];
        }
        return [];
      }
      case "offer": {
        const out = this.state === "probing" || this.state === "open" ? this.end("replaced by a newer upgrade attempt", true, now) : [];
        this.begin(ev.conn, now);
        out.push({ type: "accept", conn: ev.conn });
        return out;
      }
      case "opened":
        if (this.state !== "probing" || ev.conn !== this.conn) return [];
        this.state = "open";
        // The offerer decides: it switches and retires the old link; the answerer follows on its bye
        // (which may have come first).
        return ev.offerer || this.retired ? [{ type: "promote", conn: ev.conn }] : [];
      case "closed":
        return this.current(ev.conn) ? this.end(ev.reason, false, now, true) : [];
      case "refused":
        return this.current(ev.conn) ? this.end(ev.reason, true, now) : [];
      case "bye":
        return this.current(ev.conn) ? this.end("peer ended the upgrade attempt", true, now, true) : [];
      case "old-link-bye":
        if (this.state === "open") return [{ type: "promote", conn: this.conn! }];
        if (this.state === "probing") {
          this.retired = true;
          return [];
        }
        return [{ type: "close-old" }];
      case "link-replaced":
        return this.state === "probing" || this.state === "open" ? this.end("link replaced", true, now) : [];
      case "promoted":
        this.state = "idle";
        this.conn = undefined;
        this.retired = false;
        this.attempts = 0;
        this.hintedAt = -1;
        return [];
      case "path-works":
        if (this.state === "waiting" && this.hintedAt !== this.attempts) {
          this.hintedAt = this.attempts;
          this.nextAt = Math.min(this.nextAt, now);
        }
        return [];
    }
  }

  /** Is `conn` the running attempt? */
  current(conn: string): boolean {
    return (this.state === "probing" || this.state === "open") && this.conn === conn;
  }

  private begin(conn: string, now: number): void {
    this.state = "probing";
    this.conn = conn;
    this.retired = false;
    this.deadline = now + this.o.connectTimeoutMs;
  }

  /**
   * The attempt did not make it: close it and schedule the next one (probeDelay). `failed`: it broke (not
   * replaced): if the peer had already retired the old link for it, that link goes too.
   */
  private end(reason: string, tellPeer: boolean, now: number, failed = false): UpgradeAction[] {
    const conn = this.conn!;
    const closeOld = failed && this.retired;
    this.retired = false;
    this.state = "waiting";
    this.conn = undefined;
    this.attempts++;
    this.nextAt = now + probeDelay(this.attempts, this.o.lastUpAt?.(), now, PROBE_BACKOFF, this.o.random);
    const out: UpgradeAction[] = [{ type: "end", conn, reason, tellPeer }];
    if (closeOld) out.push({ type: "close-old" });
    return out;
  }
}
