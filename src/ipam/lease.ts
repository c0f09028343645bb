/**
 * Liveness and the lease (docs/ipam.md rules 1-2): this node's own heartbeat, the highest heartbeat
 * seen of every member and when it last advanced (silence), when each direct peer was last heard, and
 * whether this node holds the lease (a strict majority of the members heard within W, held for U after
 * a restart or a lapse).
 */
import type { Resolved } from "./config.js";
import type { BeatRecord } from "./wire.js";

const NEG = Number.NEGATIVE_INFINITY;

export class Lease {
  /** our own heartbeat: strictly increasing, survives restarts (persisted) */
  beat = 0;
  /** highest heartbeat seen of each other node, and when (our clock) it last advanced */
  readonly beats = new Map<string, { beat: number; at: number; pk?: Uint8Array; sig?: Uint8Array }>();
  /** when each direct peer was last heard (any IPAM message, or link-up) */
  readonly heard = new Map<string, number>();
  private since: number | null = null;
  private needsResync = false;
  /** start of the current unbroken contact with a fresh majority (each member heard within C), or null */
  private contactSince: number | null = null;

  constructor(
    private readonly self: string,
    private readonly cfg: Resolved,
  ) {}

  /** W: the lease window */
  get W(): number {
    return this.cfg.R - this.cfg.M;
  }

  /** A: the acceptor's silence threshold */
  get A(): number {
    return this.cfg.R - this.cfg.M / 2;
  }

  /** true once the lease has been held at least once since the last lapse (for status wording) */
  get held(): boolean {
    return this.since !== null;
  }

  /** After a restart: the lease must be re-earned, including the resync hold. */
  requireResync(): void {
    this.needsResync = true;
  }

  advance(now: number): void {
    this.beat = Math.max(this.beat + 1, Math.floor(now));
  }

  /** Merge a heartbeat (already verified by the caller when signed); keeps the origin's signature to relay. */
  mergeBeat(n: string, b: number, now: number, pk?: Uint8Array, sig?: Uint8Array): void {
    if (n === this.self) return;
    const cur = this.beats.get(n);
    if (!cur || b > cur.beat) this.beats.set(n, pk && sig ? { beat: b, at: now, pk, sig } : { beat: b, at: now });
  }

  beatOf(n: string): number {
    return this.beats.get(n)?.beat ?? -1;
  }

  /** Highest heartbeat seen of every other node (for hellos). */
  known(): BeatRecord[] {
    const out: BeatRecord[] = [];
    for (const [n, b] of this.beats) if (b.beat > 0) out.push(b.pk && b.sig ? [n, b.beat, b.pk, b.sig] : [n, b.beat]);
    return out;
  }

  heardWithin(p: string, now: number, window = this.W): boolean {
    return now - (this.heard.get(p) ?? NEG) < window;
  }

  /** Silence of member m as we see it: time since its heartbeat last advanced (or since we learned of it). */
  silentFor(m: string, now: number): number {
    if (m === this.self) return 0;
    let b = this.beats.get(m);
    if (!b) {
      b = { beat: 0, at: now };
      this.beats.set(m, b);
    }
    return now - b.at;
  }

  /** For status: silence without registering the member. */
  silentMs(m: string, now: number): number | null {
    if (m === this.self) return 0;
    const b = this.beats.get(m);
    return b ? now - b.at : null;
  }

  /** Strict majority of `members` heard from directly within W (self counts). */
  hasMajority(members: Set<string>, now: number): boolean {
    let n = 0;
    for (const m of members) if (m === this.self || this.heardWithin(m, now)) n++;
    return 2 * n > members.size;
  }

  /**
   * Track unbroken majority contact: called on every tick and every message. Contact is "fresh" while a
   * strict majority of the members (self included) was heard within C (the heartbeat timeout); one
   * observation without it breaks the run, and the resync hold U counts from the start of the run.
   */
  observe(members: Set<string>, now: number): void {
    let n = 0;
    for (const m of members) if (m === this.self || this.heardWithin(m, now, this.cfg.C)) n++;
    if (2 * n > members.size) this.contactSince ??= now;
    else this.contactSince = null;
  }

  /** The latest time by which a strict majority of `members` (self counts as now) had been heard. */
  private majorityHeardAt(members: Set<string>, now: number): number {
    const times = [...members].map((m) => (m === this.self ? now : (this.heard.get(m) ?? NEG))).sort((a, b) => b - a);
    return times[Math.floor(members.size / 2)] ?? NEG;
  }

  /**
   * The lease: majority contact (heard within W) now; after a restart or after a lapse, additionally an
   * unbroken fresh majority contact that has lasted U (docs/ipam.md rule 1). Updates lease state.
   */
  valid(members: Set<string>, now: number): boolean {
    if (members.size === 1 && members.has(this.self)) {
      this.since ??= now;
      this.needsResync = false;
      return true;
    }
    if (!this.hasMajority(members, now)) {
      if (this.since !== null) {
        this.since = null;
        this.needsResync = true;
      }
      return false;
    }
    this.since ??= now;
    if (this.needsResync) {
      this.observe(members, now);
      // the contact must verifiably span U: up to the moment the majority was last heard, not up to now
      if (this.contactSince === null || this.majorityHeardAt(members, now) - this.contactSince < this.cfg.U) return false;
      this.needsResync = false;
    }
    return true;
  }
}
