/**
 * Why a packet (or a whole data-channel frame) was dropped. Every drop on the data path names one of
 * these and bumps a counter; nothing on the packet path returns silently.
 *
 *   no-route      no route-table entry covers the destination address
 *   no-link       the next hop is known but there is no open link to it
 *   too-big       a packet does not fit in one data-channel message (or exceeds the 64 KiB GSO limit)
 *   queue-full    the link's send buffer is saturated, or the TUN write returned EAGAIN
 *   malformed     bytes that do not parse: IP header, virtio-net header or frame structure
 *   bad-version   a frame whose version this build cannot read
 *   ttl-expired   a transit frame whose hop budget ran out (routing loop or too many hops)
 *   not-for-us    a frame whose destination node is not this node and forwarding is off
 *   write-failed  the kernel refused a TUN write for another reason (EINVAL, EIO...)
 *   spoofed-node  a frame whose source node is not the link peer and that is not sealed end to end by it
 *   spoofed-source a packet whose inner source is not owned by its source node (a frame from a peer), or
 *                 not by this node (a packet read from the TUN)
 *   foreign-destination a packet from a peer whose inner destination is not an address of this node
 *   bad-seal      a sealed (multi-hop) frame that does not open with its source node's key
 *   replayed      a sealed frame whose counter was already seen (or is older than the replay window)
 *   no-key        no key for the destination node yet (its signed topology record has not arrived)
 */
export const DROP_REASONS = [
  "no-route",
  "no-link",
  "too-big",
  "queue-full",
  "malformed",
  "bad-version",
  "ttl-expired",
  "not-for-us",
  "write-failed",
  "spoofed-node",
  "spoofed-source",
  "foreign-destination",
  "bad-seal",
  "replayed",
  "no-key",
] as const;

export type DropReason = (typeof DROP_REASONS)[number];

/** A typed drop: the reason (counted) plus a static human detail (constant strings: no allocation). */
export interface Drop {
  readonly reason: DropReason;
  readonly detail: string;
}

export function isDropReason(x: unknown): x is DropReason {
  return typeof x === "string" && (DROP_REASONS as readonly string[]).includes(x);
}

/** Per-reason counters (packets and frames share them; callers pick what they count). */
export class DropCounters {
  private readonly counts: Record<DropReason, number>;

  constructor() {
    this.counts = Object.fromEntries(DROP_REASONS.map((r) => [r, 0])) as Record<DropReason, number>;
  }

  drop(reason: DropReason, n = 1): void {
    this.counts[reason] += n;
  }

  get(reason: DropReason): number {
    return this.counts[reason];
  }

  total(): number {
    let t = 0;
    for (const r of DROP_REASONS) t += this.counts[r];
    return t;
  }

  /** A copy; only reasons with a non-zero count unless `all`. */
  snapshot(all = false): Partial<Record<DropReason, number>> {
    const out: Partial<Record<DropReason, number>> = {};
    for (const r of DROP_REASONS) if (all || this.counts[r] !== 0) out[r] = this.counts[r];
    return out;
  }

  reset(): void {
    for (const r of DROP_REASONS) this.counts[r] = 0;
  }
}
