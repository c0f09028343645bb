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
 *
 * Liveness of a connected link, two rules, each within `deadAfterMs`:
 *   silent     nothing heard from the peer for deadAfterMs (any control message counts);
 *   half-open  the peer is heard, but it hears none of our heartbeats: every ping and pong carries `ack`,
 *              the highest ping seq its sender received from us (wire/control.ts), and a connected link
 *              whose acks have not advanced for deadAfterMs is closed ("one-way link"). So a link whose
 *              one direction is lost closes on both sides within the heartbeat timeout (before, the side
 *              that still heard the peer kept it until the peer gave up and went quiet: up to 2 x).
 * The half-open rule counts ack *progress*, not round-trip time, and acks are cumulative and ride the
 * peer's own pings as well as its pongs: heartbeats that queue behind data (a sender saturating the relay)
 * or are dropped on the way (the signaling server drops relay frames to a congested receiver) delay or
 * lose single messages, and the next one that arrives carries the progress. It is only as strict as the
 * silent rule is on the peer's side (our heartbeats stalled for deadAfterMs make the peer close on
 * silence too). A peer that sends no acks (an older agent) is judged by the silent rule alone.
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
  /** any control message; `ack`: the highest of our ping seqs it says the peer received (pings, pongs) */
  | { type: "heard"; ack?: number }
  /** a ping from the peer (its seq is acked in our next ping and pong) */
  | { type: "ping-in"; seq: number }
  | { type: "pong"; seq: number; sentAt: number }
  | { type: "bye"; reason: string }
  /** the connected link moved to another connection (make-before-break path upgrade) */
  | { type: "swap"; conn: string }
  | { type: "tick"; canDial: boolean };

export type PeerAction =
  | { type: "dial"; conn: string }
  | { type: "accept"; conn: string }
  | { type: "close"; conn: string; reason: string }
  /** send a heartbeat; `ack`: the highest ping seq heard from the peer on this link */
  | { type: "ping"; seq: number; ack: number }
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
  /** highest ping seq received from the peer on this link (acked in our pings and pongs) */
  heardSeq = 0;
  /** highest of our ping seqs the peer acked, and when that last advanced (or the link opened/swapped) */
  private acked = 0;
  private ackProgressAt = 0;
  /** the peer sends acks on this link (agents from before the half-open rule do not) */
  private peerAcks = false;
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
        this.resetAcks(now);
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
        if (ev.ack !== undefined) {
          this.peerAcks = true;
          // Only acks of pings we sent count (a forged or confused ack beyond our seq is ignored).
          if (ev.ack > this.acked && ev.ack <= this.seq) {
            this.acked = ev.ack;
            this.ackProgressAt = now;
          }
        }
        break;
      case "ping-in":
        if (ev.seq > this.heardSeq) this.heardSeq = ev.seq;
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
          this.resetAcks(now);
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
      case "connected": {
        const secs = (t: number) => Math.round((now - t) / 100) / 10;
        const silent = now - this.lastHeard > this.timing.deadAfterMs;
        const halfOpen = this.peerAcks && now - this.ackProgressAt > this.timing.deadAfterMs && this.seq > this.acked;
        if ((silent || halfOpen) && this.conn !== undefined) {
          const conn = this.conn;
          this.conn = undefined;
          const reason = silent ? `no heartbeat for ${secs(this.lastHeard)} s` : `one-way link: the peer is heard but has acked none of our heartbeats for ${secs(this.ackProgressAt)} s`;
          out.push({ type: "close", conn, reason });
          this.failed(now, reason, "backoff", out);
        } else {
          this.maybePing(now, out);
        }
        break;
      }
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
      out.push({ type: "ping", seq: ++this.seq, ack: this.heardSeq });
    }
  }

  /** A new link (open, or swapped in by an upgrade): ack progress counts from now, acks from it only. */
  private resetAcks(now: number): void {
    this.heardSeq = 0;
    this.ackProgressAt = now;
    this.acked = this.seq;
    this.peerAcks = false;
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
