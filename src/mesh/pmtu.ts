/**
 * Path MTU search, sans-I/O (issue 11 item 3): a state machine fed `handle(event, now)`; a driver sends the
 * probes it asks for, feeds back acks and timer ticks, and arms one timer at `deadline`. One search, two drivers:
 *
 * - the WebRTC link (agent/transport/link-base.ts): a probe of size s is one SCTP packet of a link built for MTU
 *   s; the peer's link acks each probe. A local limit below the built MTU ends the search (limitMode "end": the
 *   next link is built for it);
 * - the bulk link (src/bulk/session.ts): a probe of size s is one sealed bulk datagram of s bytes (UDP payload),
 *   sent with Don't Fragment; the peer acks it. A local limit caps the search (limitMode "clamp": the limit is
 *   probed like any size, since a datagram above it only fails in sendto, and the path behind it may carry less).
 *
 * Stop-and-wait and ascending, so that as few probes as possible are lost:
 *
 *   0. (bulk) `first`, the safe size: the link carries traffic at it once acked;
 *   1. the largest size allowed: min(hi, the local limit) — the common case: the path carries it, one round trip;
 *   2. coarse steps up from `lo` (+256, +512, ...) until a size is lost;
 *   3. fine steps up from the largest acked size (+16, +32, ...) until a size is lost or the lost one is reached.
 *
 * Each size gets `tries` probes before it counts as lost; a probe waits for its ack at least `minWaitMs`, or 4
 * round trips of the acked probes so far. Why stop-and-wait: every lost probe is an abandoned SCTP chunk that
 * stays in flight until the association's T3 timer (1 s, doubling) fires; rounds of many sizes at once were
 * measured to lose every size (SCTP bundled them into one packet, and T3 backoff held the later ones).
 *
 * The local limit (`localLimit()`, read before every probe): the largest link MTU whose packets the local kernel
 * lets out toward the peer (its route MTU, lowered by any ICMP "fragmentation needed" / "packet too big" it has
 * cached; RFC 8899 section 5.1.2: never probe above the local interface MTU). When it is below the MTU the link
 * was built for, the search ends at once with the limit (rounded down to a multiple of 4; reason "local-limit")
 * and sends nothing more: the transport builds the next link for exactly that and its full-size check verifies
 * it. Why not probe up to the limit on this link: libjuice sets Don't Fragment, so a packet above the route
 * MTU fails in sendto with EMSGSIZE, and usrsctp then keeps that chunk at the head of its send queue (never
 * sent, so never abandoned by PR-SCTP) and retries it on every output: no later DATA chunk of any size leaves
 * the association (measured with strace: after the first 4096 probe only 4025-byte sendto calls, all EMSGSIZE;
 * every smaller probe stayed queued and the search "found" 1280). And a probe smaller than the link's MTU is
 * not a fixed size on the wire: usrsctp bundles a pending SACK into its packet (measured: +24 bytes), so only a
 * link built no larger than the limit can never emit a packet above it.
 *
 * The answer is the largest acked size, within `fine` bytes of what the path carries (reason "confirmed" when
 * that is `hi`, "searched" below it). `lo` is assumed to work (1280, the IPv6 minimum). Probed sizes below hi
 * are multiples of 4 (a full-size SCTP DATA chunk then needs no padding).
 */

export type PmtuEvent =
  /** begin: the first probe goes out */
  | { kind: "start" }
  /** the peer acked a probe of `size` bytes */
  | { kind: "ack"; size: number }
  /** the timer armed at `deadline` fired (early ticks are ignored) */
  | { kind: "tick" };

/**
 * How a search ended: hi acked, a smaller size found by probing, or the local limit (nothing probed above it;
 * "clamp": the limit itself was acked).
 */
export type PmtuOutcome = "confirmed" | "searched" | "local-limit";

/** What the driver does now: send one probe of `probe` bytes, or the search is over with `done`. */
export interface PmtuStep {
  probe?: number;
  done?: { mtu: number; outcome: PmtuOutcome };
}

/** Why an ack or a probe size was not used (typed, counted in `stats.drops`). */
export type PmtuDrop = "stale-ack" | "ack-not-in-flight" | "ack-after-done";

export interface PmtuStats {
  /** probes sent (each try counts) */
  probes: number;
  /** probes acked */
  acked: number;
  /** sizes that counted as lost (all tries timed out) */
  lost: number;
  /** sizes never sent because the local limit was below them ("end": 0 or 1, the search then ends) */
  skipped: number;
  drops: Record<PmtuDrop, number>;
}

export interface PmtuSearchOptions {
  /** assumed to work (default 1280) */
  lo?: number;
  /** the MTU the link was built for: the largest size worth probing */
  hi: number;
  coarse?: number;
  fine?: number;
  tries?: number;
  /** least time a probe waits for its ack (ms) */
  minWaitMs?: number;
  /** largest size the local kernel sends toward the peer (undefined: unknown, no limit); read before each probe */
  localLimit?: () => number | undefined;
  /**
   * What a local limit below the next size does: "end" the search at once with the limit (default; the WebRTC
   * link, see the header), or "clamp" the sizes still to probe to it and probe on (the bulk link).
   */
  limitMode?: "end" | "clamp";
  /**
   * Probe this size first, before hi (between lo and hi; the bulk link's safe size, RFC 8899's BASE_PLPMTU:
   * the link carries traffic at the largest acked size while the search goes on). Its loss means the path
   * carries less: coarse steps up from lo follow, and hi is never probed.
   */
  first?: number;
}

export class PmtuSearch {
  private ok: number;
  private readonly lo: number;
  private lost: number;
  private readonly hi: number;
  private readonly coarse: number;
  private readonly fine: number;
  private readonly tries: number;
  private readonly minWaitMs: number;
  private readonly localLimit: () => number | undefined;
  private readonly limitMode: "end" | "clamp";
  /** the largest size still worth probing: hi, or a local limit below it ("clamp") */
  private cap: number;
  private limited = false;
  private readonly first: number | undefined;
  private capTried: boolean;
  private step: number;
  private current: number | undefined;
  private triesLeft: number;
  private started = false;
  private finished = false;
  private sentAt = 0;
  private rttMs: number | undefined;
  /** when the probe in flight counts as lost (undefined: none in flight) */
  deadline: number | undefined;
  readonly stats: PmtuStats = { probes: 0, acked: 0, lost: 0, skipped: 0, drops: { "stale-ack": 0, "ack-not-in-flight": 0, "ack-after-done": 0 } };

  constructor(o: PmtuSearchOptions) {
    this.lo = o.lo ?? 1280;
    this.ok = this.lo;
    this.hi = o.hi;
    this.lost = o.hi + 1;
    this.coarse = o.coarse ?? 256;
    this.fine = o.fine ?? 16;
    this.tries = o.tries ?? 2;
    this.minWaitMs = o.minWaitMs ?? 500;
    this.localLimit = o.localLimit ?? (() => undefined);
    this.limitMode = o.limitMode ?? "end";
    this.cap = o.hi;
    this.first = o.first !== undefined && o.first > this.lo && o.first < o.hi ? o.first : undefined;
    this.capTried = this.first === undefined;
    this.step = this.coarse;
    this.triesLeft = this.tries;
  }

  get done(): boolean {
    return this.finished;
  }

  /** The largest size known to get through (the answer once done). */
  get mtu(): number {
    return this.ok;
  }

  /** Smoothed round trip of the acked probes (ms), once one was acked. */
  get rtt(): number | undefined {
    return this.rttMs;
  }

  handle(ev: PmtuEvent, now: number): PmtuStep {
    switch (ev.kind) {
      case "start":
        if (this.started) return {};
        this.started = true;
        this.current = this.first ?? (this.hi > this.ok ? this.hi : undefined);
        return this.send(now);
      case "ack": {
        if (this.finished) {
          this.stats.drops["ack-after-done"]++;
          return {};
        }
        if (this.deadline === undefined) {
          this.stats.drops["ack-not-in-flight"]++;
          return {};
        }
        if (ev.size !== this.current) {
          this.stats.drops["stale-ack"]++; // a late ack of an earlier (timed-out) probe
          return {};
        }
        this.stats.acked++;
        const rtt = Math.max(0, now - this.sentAt);
        this.rttMs = this.rttMs === undefined ? rtt : 0.75 * this.rttMs + 0.25 * rtt;
        if (ev.size > this.ok) this.ok = ev.size;
        this.current = this.pick();
        this.triesLeft = this.tries;
        return this.send(now);
      }
      case "tick": {
        if (this.finished || this.deadline === undefined || now < this.deadline) return {};
        if (--this.triesLeft > 0) return this.send(now); // same size again
        this.stats.lost++;
        this.markLost(this.current!);
        this.current = this.pick();
        this.triesLeft = this.tries;
        return this.send(now);
      }
    }
  }

  private markLost(size: number): void {
    if (size < this.lost) this.lost = size;
    if (this.step === this.coarse && size !== this.cap && size !== this.first) this.step = this.fine; // refine below the coarse loss
  }

  /** Send `current`, or finish (nothing left, or the local limit is below the link's MTU). */
  private send(now: number): PmtuStep {
    for (;;) {
      if (this.current === undefined) return this.finish(this.ok >= this.hi ? "confirmed" : this.limited && this.ok >= this.cap ? "local-limit" : "searched");
      const limit = this.localLimit();
      if (this.limitMode === "end" && limit !== undefined && limit < this.hi) {
        this.stats.skipped++;
        this.ok = Math.max(this.lo, Math.min(this.hi, limit & ~3));
        return this.finish("local-limit");
      }
      if (this.limitMode === "clamp" && limit !== undefined && limit < this.current) {
        // Never above the limit: it becomes the largest size left to try (itself probed next, unless known).
        this.stats.skipped++;
        this.limited = true;
        this.cap = Math.max(this.lo, Math.min(this.cap, limit & ~3));
        this.current = this.cap > this.ok ? this.cap : undefined;
        this.triesLeft = this.tries;
        continue;
      }
      this.stats.probes++;
      this.sentAt = now;
      this.deadline = now + Math.max(this.minWaitMs, Math.round(4 * (this.rttMs ?? 0)));
      return { probe: this.current };
    }
  }

  private finish(outcome: PmtuOutcome): PmtuStep {
    this.finished = true;
    this.deadline = undefined;
    this.current = undefined;
    return { done: { mtu: this.ok, outcome } };
  }

  private pick(): number | undefined {
    if (this.ok >= this.cap) return undefined;
    if (!this.capTried) {
      // after `first`: the largest size next (unless `first` was lost)
      this.capTried = true;
      if (this.cap < this.lost) return this.cap;
    }
    for (;;) {
      const s = (this.ok + this.step) & ~3;
      if (s < this.lost && s <= this.cap) return s;
      if (this.step === this.fine) return undefined;
      this.step = this.fine; // the coarse grid passed the lost size: refine from the largest acked
    }
  }
}
