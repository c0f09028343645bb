/**
 * Path MTU search for a link, sans-I/O (issue 11 item 3). A link built for path MTU `hi` can send one
 * single-packet probe of any size up to `hi` (agent/transport/link-base.ts sends them, the peer acks each).
 * The search is stop-and-wait and ascending, so that it loses as few probes as possible:
 *
 *   1. `hi` itself (the common case: the path carries it, done in one round trip);
 *   2. coarse steps up from `lo` (1280 + 256, + 512, ...) until a size is lost;
 *   3. fine steps up from the largest acked size (+16, +32, ...) until a size is lost or the lost one is reached.
 *
 * Each size gets `tries` probes before it counts as lost. Why not rounds of many sizes at once, or a binary
 * search: every lost probe is an abandoned SCTP chunk that stays in flight until the association's T3 timer
 * fires (1 s, doubling with each expiry) and holds the congestion window; measured on a 2000-byte LAN with a
 * 4096 link: after the 4 lost full-size checks every later probe waited out the backoff and the search found
 * 1280. Here at most three sizes are ever lost (hi, one coarse, one fine) and one probe is in flight at a time.
 * The answer is the largest acked size, within `fine` bytes of what the path carries. `lo` is assumed to work
 * (1280, the IPv6 minimum). Sizes are multiples of 4.
 */
export class PmtuSearch {
  private ok: number;
  private lost: number;
  private readonly hi: number;
  private readonly coarse: number;
  private readonly fine: number;
  private readonly tries: number;
  private step: number;
  private current: number | undefined;
  private triesLeft = 0;
  /** Probes sent so far (each try counts). */
  probes = 0;
  /** Sizes that counted as lost. */
  losses = 0;

  constructor(opts: { lo: number; hi: number; coarse?: number; fine?: number; tries?: number }) {
    this.ok = opts.lo;
    this.hi = opts.hi;
    this.lost = opts.hi + 1;
    this.coarse = opts.coarse ?? 256;
    this.fine = opts.fine ?? 16;
    this.tries = opts.tries ?? 2;
    this.step = this.coarse;
    this.current = opts.hi > opts.lo ? opts.hi : undefined;
    this.triesLeft = this.tries;
  }

  /** The size to probe now (undefined: done). Each call counts as one probe sent. */
  next(): number | undefined {
    if (this.current !== undefined) this.probes++;
    return this.current;
  }

  get done(): boolean {
    return this.current === undefined;
  }

  /** The largest size known to get through (the answer once done). */
  get mtu(): number {
    return this.ok;
  }

  /** The probe of `size` was acked (true) or its wait ran out (false). Stale sizes are ignored. */
  result(size: number, acked: boolean): void {
    if (size !== this.current) return;
    if (acked) {
      if (size > this.ok) this.ok = size;
    } else if (--this.triesLeft > 0) {
      return; // same size again
    } else {
      this.losses++;
      if (size < this.lost) this.lost = size;
      if (this.step === this.coarse && size !== this.hi) this.step = this.fine; // refine below the coarse loss
    }
    this.current = this.pick();
    this.triesLeft = this.tries;
  }

  private pick(): number | undefined {
    if (this.ok >= this.hi) return undefined;
    for (;;) {
      const s = (this.ok + this.step) & ~3;
      if (s < this.lost && s <= this.hi) return s;
      if (this.step === this.fine) return undefined;
      this.step = this.fine; // the coarse grid passed the lost size: refine from the largest acked
    }
  }
}
