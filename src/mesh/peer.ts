/**
 * Per-peer link state machine (sans-I/O). The agent feeds it events with the current time and performs
 * the actions it returns; it never awaits and never touches a socket.
 *
 *                     present (we offer)                 open
 *   waiting ───────────────────────────────▶ connecting ─────────▶ connected
 *      ▲  ▲  offer (they offer)  ───────────────▲  │ timeout/closed      │ heartbeat timeout /
 *      │  │                                      │  ▼                     │ closed
 *      │  └──────────── (answerer) ◀──────── backoff / auth-failed ◀─────┘
 *      │                                  (offerer redials after a jittered exponential delay,
 *      │                                   at most 5 s for 10 min after a link was up: RECENT_PATH)
 *   gone ◀── absent while not connected, or bye
 *
 * Who offers is deterministic (the lower node id), so two agents never offer to each other at once
 * (no glare). Links outlive the signaling server: `absent` (the peer left signaling) does not touch a
 * connected link; only heartbeats or a `bye` end it.
 */
import { backoffDelay, DEFAULT_BACKOFF, recentPathBackoff, type BackoffConfig } from "./backoff.js";

export type PeerState = "waiting" | "connecting" | "connected" | "backoff" | "auth-failed" | "gone";

export interface PeerTiming {
  /** give up on a link that has not opened after this long (werift never reports ICE failure itself) */
  connectTimeoutMs: number;
  heartbeatMs: number;
  /** a connected link with nothing heard for this long is dead */
  deadAfterMs: number;
  /** forget a gone peer after this long */
  goneTtlMs: number;
  backoff: BackoffConfig;
}

export const DEFAULT_TIMING: PeerTiming = {
  connectTimeoutMs: 10_000,
  heartbeatMs: 1_000,
  deadAfterMs: 5_000,
  goneTtlMs: 300_000,
  backoff: DEFAULT_BACKOFF,
};

export type PeerEvent =
  | { type: "present" }
  | { type: "absent" }
  | { type: "offer"; conn: string }
  | { type: "open"; conn: string }
  | { type: "closed"; conn: string; reason: string }
  | { type: "auth-failed"; conn?: string; reason: string }
  | { type: "heard" }
  | { type: "pong"; seq: number; sentAt: number }
  | { type: "bye"; reason: string }
  /** the connected link moved to another connection (make-before-break path upgrade) */
  | { type: "swap"; conn: string }
  | { type: "tick"; canDial: boolean };

export type PeerAction =
  | { type: "dial"; conn: string }
  | { type: "accept"; conn: string }
  | { type: "close"; conn: string; reason: string }
  | { type: "ping"; seq: number }
  | { type: "hello" }
  | { type: "remove" };

/** Samples in the windowed-minimum RTT (one per heartbeat: ~8 s at 1 Hz). */
export const RTT_WINDOW = 8;

export function isOfferer(self: string, peer: string): boolean {
  return self < peer;
}

export class PeerFsm {
  state: PeerState = "waiting";
  present = false;
  conn: string | undefined;
  attempts = 0;
  lastError: string | undefined;
  rttMs: number | undefined;
  srttMs: number | undefined;
  /** recent RTT samples (ring of RTT_WINDOW); their minimum is the routing weight */
  private readonly recent: number[] = [];
  connectedAt: number | undefined;
  /** when a link to this peer was last up (open, or until it failed): retries stay short after it */
  lastUpAt: number | undefined;
  readonly offerer: boolean;
  private deadline = 0;
  private nextAt = 0;
  private lastHeard = 0;
  private nextPing = 0;
  private seq = 0;
  private goneAt = 0;
  private connCounter = 0;

  constructor(
    readonly self: string,
    readonly peer: string,
    private readonly timing: PeerTiming = DEFAULT_TIMING,
    private readonly newConnId: (n: number) => string = (n) => `${n}`,
    private readonly random: () => number = Math.random,
  ) {
    this.offerer = isOfferer(self, peer);
  }

  handle(ev: PeerEvent, now: number): PeerAction[] {
    const out: PeerAction[] = [];
    switch (ev.type) {
      case "present":
        this.present = true;
        if (this.state === "gone") this.state = "waiting";
        if (this.state === "waiting" && this.offerer) this.dial(now, out);
        break;
      case "absent":
        this.present = false;
        if (this.state !== "connected") this.toGone(now, "left the signaling server", out);
        break;
      case "offer":
        if (this.offerer) break; // we offer to this peer; an offer from it breaks the rule: ignore
        if (this.conn !== undefined && this.conn !== ev.conn) out.push({ type: "close", conn: this.conn, reason: "replaced by a new offer" });
        this.conn = ev.conn;
        this.state = "connecting";
        this.connectedAt = undefined;
        this.deadline = now + this.timing.connectTimeoutMs;
        out.push({ type: "accept", conn: ev.conn });
        break;
      case "open":
        if (ev.conn !== this.conn || this.state !== "connecting") break;
        this.state = "connected";
        this.attempts = 0;
        this.lastError = undefined;
        this.connectedAt = now;
        this.lastHeard = now;
        this.recent.length = 0;
        this.nextPing = now;
        out.push({ type: "hello" });
        this.maybePing(now, out);
        break;
      case "closed":
        if (ev.conn !== this.conn) break;
        this.conn = undefined;
        this.failed(now, ev.reason, "backoff", out);
        break;
      case "auth-failed":
        if (ev.conn !== undefined && this.conn === ev.conn) {
          out.push({ type: "close", conn: ev.conn, reason: ev.reason });
          this.conn = undefined;
        }
        if (this.state === "connected" && ev.conn === undefined) break; // stale offer for a live link: ignore
        this.failed(now, ev.reason, "auth-failed", out);
        break;
      case "heard":
        this.lastHeard = now;
        break;
      case "pong": {
        this.lastHeard = now;
        const rtt = Math.max(0, now - ev.sentAt);
        this.rttMs = rtt;
        this.srttMs = this.srttMs === undefined ? rtt : this.srttMs * 0.875 + rtt * 0.125;
        this.recent.push(rtt);
        if (this.recent.length > RTT_WINDOW) this.recent.shift();
        break;
      }
      case "bye":
        this.present = false;
        if (this.conn !== undefined) out.push({ type: "close", conn: this.conn, reason: `peer said bye: ${ev.reason}` });
        this.conn = undefined;
        this.toGone(now, `left: ${ev.reason}`, out);
        break;
      case "swap":
        if (this.state === "connected") {
          this.conn = ev.conn;
          this.lastHeard = now;
        }
        break;
      case "tick":
        this.tick(now, ev.canDial, out);
        break;
    }
    return out;
  }

  private tick(now: number, canDial: boolean, out: PeerAction[]): void {
    switch (this.state) {
      case "connecting":
        if (now >= this.deadline && this.conn !== undefined) {
          const conn = this.conn;
          this.conn = undefined;
          const reason = `link did not open within ${Math.round(this.timing.connectTimeoutMs / 1000)} s (ICE/DTLS timeout)`;
          out.push({ type: "close", conn, reason });
          this.failed(now, reason, "backoff", out);
        }
        break;
      case "connected":
        if (now - this.lastHeard > this.timing.deadAfterMs && this.conn !== undefined) {
          const conn = this.conn;
          this.conn = undefined;
          const reason = `no heartbeat for ${Math.round((now - this.lastHeard) / 100) / 10} s`;
          out.push({ type: "close", conn, reason });
          this.failed(now, reason, "backoff", out);
        } else {
          this.maybePing(now, out);
        }
        break;
      case "backoff":
      case "auth-failed":
      case "waiting":
        if (this.offerer && this.present && canDial && now >= this.nextAt) this.dial(now, out);
        break;
      case "gone":
        if (now - this.goneAt >= this.timing.goneTtlMs) out.push({ type: "remove" });
        break;
    }
  }

  /**
   * RTT for routing: the minimum over the last RTT_WINDOW samples. The first samples of a new link are
   * inflated (DTLS handshakes, CPU contention at start) and an EWMA would carry them for many seconds;
   * the windowed minimum tracks the path's propagation delay and ignores queueing spikes (like BBR).
   */
  /** when anything was last heard from the peer (its hello, pings, pongs, gossip); undefined: never */
  get lastHeardAt(): number | undefined {
    return this.lastHeard > 0 ? this.lastHeard : undefined;
  }

  get pathRttMs(): number | undefined {
    return this.recent.length ? Math.min(...this.recent) : undefined;
  }

  private maybePing(now: number, out: PeerAction[]): void {
    if (now >= this.nextPing) {
      this.nextPing = now + this.timing.heartbeatMs;
      out.push({ type: "ping", seq: ++this.seq });
    }
  }

  private dial(now: number, out: PeerAction[]): void {
    const conn = this.newConnId(++this.connCounter);
    this.conn = conn;
    this.state = "connecting";
    this.deadline = now + this.timing.connectTimeoutMs;
    out.push({ type: "dial", conn });
  }

  private failed(now: number, reason: string, state: "backoff" | "auth-failed", _out: PeerAction[]): void {
    this.lastError = reason;
    if (this.connectedAt !== undefined) this.lastUpAt = now;
    this.connectedAt = undefined;
    if (!this.present) {
      this.toGone(now, reason, _out);
      return;
    }
    // Answerers wait for the offerer's next attempt; an auth failure stays visible either way.
    this.state = state === "auth-failed" ? "auth-failed" : this.offerer ? "backoff" : "waiting";
    this.nextAt = now + backoffDelay(this.attempts, recentPathBackoff(this.timing.backoff, this.lastUpAt, now), this.random);
    this.attempts++;
  }

  private toGone(now: number, reason: string, out: PeerAction[]): void {
    if (this.conn !== undefined) {
      out.push({ type: "close", conn: this.conn, reason });
      this.conn = undefined;
    }
    if (this.state !== "gone") {
      this.state = "gone";
      this.goneAt = now;
      this.lastError = reason;
      this.connectedAt = undefined;
    }
  }
}
