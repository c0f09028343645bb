/**
 * Path MTU search for a link, sans-I/O (issue 11 item 3). A link built for path MTU `hi` can send one
 * single-packet probe of any size up to `hi` (agent/transport/link-base.ts sends them, the peer acks each),
 * so the search runs on the link itself, in rounds:
 *
 *   round 0: [hi]                       -> acked: the path carries hi, done.
 *   round k: `ways` sizes evenly spread over (lo, hi), all probed at once; at the round's end
 *            lo = the largest acked size, hi = just below the smallest unacked size above lo,
 *            until hi - lo < resolution  -> the path MTU is lo.
 *
 * With 1280..4096, 8 ways and a 16-byte resolution that is at most 3 rounds after round 0 (a binary
 * search would need 8 sequential steps, each waiting out a lost probe). `lo` is assumed to work (1280,
 * the IPv6 minimum that every link may assume). Sizes are multiples of 4.
 */
export class PmtuSearch {
  private lo: number;
  private hi: number;
  private readonly ways: number;
  private readonly resolution: number;
  private sizes: number[];
  private readonly ok = new Set<number>();
  /** Rounds finished so far (0 while the first, full-size check runs). */
  rounds = 0;

  constructor(opts: { lo: number; hi: number; ways?: number; resolution?: number }) {
    this.lo = opts.lo;
    this.hi = opts.hi;
    this.ways = opts.ways ?? 8;
    this.resolution = opts.resolution ?? 16;
    this.sizes = [opts.hi];
  }

  /** Sizes of the current round not acked yet (what to (re)send). */
  pending(): number[] {
    return this.sizes.filter((s) => !this.ok.has(s));
  }

  /** A probe of `size` came back. true when it belongs to the current round. */
  acked(size: number): boolean {
    if (!this.sizes.includes(size)) return false;
    this.ok.add(size);
    return true;
  }

  /** Every size of the round acked (no need to wait the round out)? */
  get complete(): boolean {
    return this.pending().length === 0;
  }

  /** The round is over: the result, or the next round's sizes are set up. */
  endRound(): { done: true; mtu: number } | { done: false } {
    this.rounds++;
    let lo = this.lo;
    let hi = this.hi;
    for (const s of this.sizes) if (this.ok.has(s) && s > lo) lo = s;
    for (const s of this.sizes) if (!this.ok.has(s) && s > lo && s - 1 < hi) hi = s - 1;
    this.lo = lo;
    this.hi = hi;
    this.ok.clear();
    if (hi - lo < this.resolution) return { done: true, mtu: lo };
    const step = (hi - lo) / (this.ways + 1);
    const sizes: number[] = [];
    for (let i = 1; i <= this.ways; i++) {
      const s = (Math.floor(lo + step * i) & ~3) >>> 0;
      if (s > lo && s <= hi && !sizes.includes(s)) sizes.push(s);
    }
    if (sizes.length === 0) return { done: true, mtu: lo };
    this.sizes = sizes;
    return { done: false };
  }
}
