/**
 * The consensus write rule (docs/ipam.md rules 2, 2b, 3, 7): every write that moves a block to another
 * owner — a claim of a silent member's block, a grant to a requester — is proposed, and written only
 * with promises from a strict majority of the members. An acceptor promises a (block, version) to one
 * live proposer at a time, persistently. (Hellos still list an acceptor's outstanding promises, for
 * status; they no longer "doom" the owner's blocks: a pin is refused by any acceptor holding a live
 * promise for someone else, which protects the owner without trusting what another node says.)
 *
 * Pins (rule 7): before an owner hands out addresses from a block it writes a pin ("p") on it and waits
 * until a strict majority of the members has recorded that pin in its own table (`prop` kind "p" ->
 * the acceptor merges the pin if it holds no live promise of that block version for someone else ->
 * `prom`). A confirmed pin can never be claimed: any claim majority contains a member that recorded the
 * pin, which refuses. So a pinned block stays its owner's — with every address in it — until the owner
 * unpins it (only when empty) or hands it over, or an operator force-releases it.
 *
 * This module decides; node.ts applies (table writes are done here, settle times, counters, gossip
 * and persistence are the dispatcher's).
 */
import type { Lease } from "./lease.js";
import type { BlockTable, EntryTuple } from "./table.js";

/** A promise this node gave as an acceptor: block version `v` may be written by `by`, naming `to`. */
export interface Promise_ {
  v: number;
  to: string;
  by: string;
  kind: "t" | "c";
  until: number;
}

/** A write this node proposed: needs promises (pins: recordings) from a strict majority of the members. */
export interface Proposal {
  v: number;
  kind: "t" | "c" | "p";
  owner: string; // current owner (the silent member for claims, us for grants)
  to: string; // new owner (us for claims, the requester for grants)
  acks: Set<string>;
  /** the acceptors' signed promises (with keys): acceptor -> [pk, sig, members it counted] */
  sigs: Map<string, [Uint8Array, Uint8Array, number]>;
  until: number;
}

/** A write completed by a majority: the entry, the owner before, and the signed promises. */
export interface Written {
  entry: EntryTuple;
  from: string;
  proof: [string, Uint8Array, Uint8Array, number][];
}

export type PromiseTuple = [number, number, string, string, "t" | "c", number];

export class WriteRule {
  readonly promises = new Map<number, Promise_>();
  readonly proposals = new Map<number, Proposal>();
  /** our pins that a strict majority recorded: block -> pinned version (persisted) */
  readonly confirmed = new Map<number, number>();

  constructor(
    private readonly self: string,
    private readonly lease: Lease,
    private readonly R: number,
    private readonly signed = false,
    /** the member list (members.ts): owners plus added nodes not removed */
    private readonly listed: (table: BlockTable) => Set<string> = (t) => t.owners(),
  ) {}

  snapshot(): PromiseTuple[] {
    return [...this.promises].map(([i, p]): PromiseTuple => [i, p.v, p.to, p.by, p.kind, p.until]);
  }

  restore(ps: readonly PromiseTuple[]): void {
    for (const [i, v, to, by, kind, until] of ps) this.promises.set(i, { v, to, by, kind, until });
  }

  /**
   * The member set used for majorities: the member list (members.ts: every owner, every node added by a
   * grant and not removed), plus the new owners of grants we promised and that are not yet written (a
   * grant to a new node is a membership change: it counts against us as soon as we promised it, so a
   * majority computed from an older view can never be outvoted).
   */
  memberSet(table: BlockTable): Set<string> {
    const m = this.listed(table);
    for (const p of this.promises.values()) if (p.kind === "t") m.add(p.to);
    return m;
  }

  /** A promise is void once its proposer abandoned it (beat >= until) or went silent for A. */
  promiseVoid(p: Promise_, now: number): boolean {
    if (p.by === this.self) return this.lease.beat >= p.until;
    return this.lease.beatOf(p.by) >= p.until || this.lease.silentFor(p.by, now) >= this.lease.A;
  }

  /** Is our pin on block i confirmed by a majority and still the current entry? */
  isConfirmed(table: BlockTable, i: number): boolean {
    const e = table.get(i);
    return e.owner === this.self && e.kind === "p" && this.confirmed.get(i) === e.version;
  }

  prune(table: BlockTable, now: number): void {
    for (const [i, v] of this.confirmed) if (!this.isConfirmed(table, i) || table.get(i).version !== v) this.confirmed.delete(i);
    for (const [i, p] of this.proposals) {
      const e = table.get(i);
      if (p.kind === "p" ? this.lease.beat >= p.until || e.version !== p.v || e.owner !== this.self || e.kind !== "p" : this.lease.beat >= p.until || e.version >= p.v) this.proposals.delete(i);
    }
    for (const [i, p] of this.promises) if (table.get(i).version >= p.v || this.promiseVoid(p, now)) this.promises.delete(i);
  }

  /** A block with a proposal of ours open is not pinned or granted meanwhile. */
  isDoomed(i: number): boolean {
    return this.proposals.has(i);
  }

  /** A hello from a proposer with beat >= until voids the promises we gave it. */
  proposerBeat(from: string, beat: number): void {
    for (const [i, p] of this.promises) if (p.to === from && beat >= p.until) this.promises.delete(i);
  }

  /** Our outstanding promises, listed in hellos. */
  outstanding(table: BlockTable | null): [number, number][] {
    return [...this.promises].filter(([i, p]) => table !== null && table.get(i).version < p.v).map(([i, p]): [number, number] => [i, p.v]);
  }

  pinRound(): boolean {
    return [...this.proposals.values()].some((p) => p.kind === "p");
  }

  hasGrantRound(): boolean {
    return [...this.proposals.values()].some((p) => p.kind === "t");
  }

  grantingTo(to: string): boolean {
    return [...this.proposals.values()].some((p) => p.kind === "t" && p.to === to);
  }

  /**
   * Acceptor rule for writing version v of block i. Every write except an operator force needs a
   * majority of these promises, and each acceptor promises a (block, version) to one live proposer:
   *   claim ("c"): the owner is someone else, and WE also saw it silent for A = R - M/2;
   *   transfer ("t"): proposed by the owner itself; if it adds a new member, only one such membership
   *   change may be outstanding per acceptor.
   */
  accept(table: BlockTable, i: number, v: number, by: string, kind: "t" | "c", owner: string, to: string, until: number, now: number): boolean {
    if (i >= table.count) return false;
    const e = table.get(i);
    if (e.version !== v - 1 || e.owner !== owner || to === owner || e.kind === "p") return false; // a pinned block is the owner's
    if (kind === "c") {
      if (by !== to || owner === this.self || this.lease.silentFor(owner, now) < this.lease.A) return false;
    } else {
      if (by !== owner) return false;
      const listed = this.listed(table);
      if (!listed.has(to)) {
        for (const [j, q] of this.promises) if (j !== i && q.kind === "t" && q.to !== to && !listed.has(q.to) && !this.promiseVoid(q, now)) return false;
      }
    }
    const p = this.promises.get(i);
    if (p && !this.promiseVoid(p, now) && (p.v > v || (p.v === v && (p.by !== by || p.to !== to || p.kind !== kind)))) return false;
    if (by !== this.self && this.lease.beatOf(by) >= until) return false; // already abandoned
    this.promises.set(i, { v, to, by, kind, until });
    return true;
  }

  /**
   * Acceptor rule for a pin of block i at version v by its owner `by`: record it (merge the entry) if
   * our table shows `by` as the owner at v-1 (or already this pin) and we hold no live promise of that
   * block at version >= v for anybody else. Returns the entries that changed our table (to flood), or
   * null if refused.
   */
  acceptPin(table: BlockTable, i: number, v: number, by: string, now: number): EntryTuple[] | null {
    if (i >= table.count) return null;
    const e = table.get(i);
    const already = e.version === v && e.owner === by && e.kind === "p";
    if (!already && !(e.version === v - 1 && e.owner === by)) return null;
    if (!already && this.signed) return null; // signed clusters record a pin only from its signed entry (state)
    const p = this.promises.get(i);
    if (p && !this.promiseVoid(p, now) && p.v >= v && p.by !== by) return null;
    if (already) return [];
    this.promises.delete(i);
    return table.merge([[i, by, v, "p"]]);
  }

  /**
   * Pin our block i: write the pin at version+1 (or ask again for an unconfirmed pin already written) and
   * open a proposal collecting recordings. Returns the [block, version] to send in `prop` kind "p".
   */
  openPin(table: BlockTable, i: number, until: number): [number, number] | null {
    if (this.proposals.has(i)) return null;
    const e = table.get(i);
    if (e.owner !== this.self) return null;
    let v = e.version;
    if (e.kind !== "p") {
      v = e.version + 1;
      table.write(i, { owner: this.self, version: v, kind: "p" });
    } else if (this.confirmed.get(i) === v) return null;
    this.proposals.set(i, { v, kind: "p", owner: this.self, to: this.self, acks: new Set([this.self]), sigs: new Map(), until });
    return [i, v];
  }

  /**
   * Open a proposal for each of `blocks` not already proposed (self-promise first). Returns the
   * [block, version] pairs to send in `prop`, and whether our own promises changed (persist).
   */
  open(table: BlockTable, kind: "t" | "c", owner: string, to: string, blocks: number[], until: number, now: number): { sent: [number, number][]; promised: boolean } {
    const sent: [number, number][] = [];
    let promised = false;
    for (const i of blocks) {
      if (this.proposals.has(i)) continue;
      const v = table.get(i).version + 1;
      const acks = new Set<string>();
      if (this.accept(table, i, v, this.self, kind, owner, to, until, now)) {
        acks.add(this.self);
        promised = true;
      }
      this.proposals.set(i, { v, kind, owner, to, acks, sigs: new Map(), until });
      sent.push([i, v]);
    }
    return { sent, promised };
  }

  /** A `prom` from an acceptor (with keys: only promises whose signature `check` accepts count). */
  promised(from: string, blocks: readonly [number, number][], sigs?: { pk: Uint8Array; sigs: Uint8Array[]; m: number; check: (i: number, p: Proposal, sig: Uint8Array) => boolean }): void {
    blocks.forEach(([i, v], k) => {
      const p = this.proposals.get(i);
      if (!p || p.v !== v) return;
      if (sigs) {
        const sig = sigs.sigs[k]!;
        if (p.kind !== "p" && !sigs.check(i, p, sig)) return;
        p.sigs.set(from, [sigs.pk, sig, sigs.m]);
      }
      p.acks.add(from);
    });
  }

  /** Our own promise's signature on a proposal we made. */
  selfSign(i: number, pk: Uint8Array, sig: Uint8Array, m: number): void {
    this.proposals.get(i)?.sigs.set(this.self, [pk, sig, m]);
  }

  /**
   * Write every proposal that has promises from a strict majority of the members (and, checked last and
   * only then, the lease). Returns the entries written, with their kind, for the dispatcher to apply.
   */
  complete(table: BlockTable, leaseValid: () => boolean): Written[] {
    const members = this.memberSet(table);
    // promises and recordings count from listed members only (a promised grantee is not one yet)
    const owners = this.listed(table);
    const written: Written[] = [];
    for (const [i, p] of this.proposals) {
      const e = table.get(i);
      if (p.kind === "p") {
        // pins need no lease: the majority that recorded the pin is what protects it
        if (e.version !== p.v || e.owner !== this.self || e.kind !== "p" || this.lease.beat >= p.until) {
          this.proposals.delete(i);
          continue;
        }
        // Recordings count only from listed members (by a written grant), out of all members including
        // the grantees we promised: a grantee whose grant is not written is no member anywhere else, and
        // counting its recording let a pin be "confirmed" by a majority that missed every member of the
        // other side of a partition (property seed 1553934982: owners {a,b,c} + written grantee d +
        // promised grantee e; d's pin recorded by {d,a,e} = 3 of 5 while {b,c} claimed the block).
        let n = 0;
        for (const a of p.acks) if (owners.has(a)) n++;
        if (2 * n > members.size) {
          this.proposals.delete(i);
          this.confirmed.set(i, p.v);
        }
        continue;
      }
      if (e.version !== p.v - 1 || e.owner !== p.owner || this.lease.beat >= p.until) {
        this.proposals.delete(i);
        continue;
      }
      // a grant is approved by the configuration before it (the new member cannot vote on itself)
      const voters = p.kind === "t" && !owners.has(p.to) ? members.size - 1 : members.size;
      let n = 0;
      for (const a of p.acks) if (owners.has(a)) n++;
      if (2 * n <= voters || !leaseValid()) continue;
      this.proposals.delete(i);
      const kind = p.kind as "t" | "c";
      table.write(i, { owner: p.to, version: p.v, kind });
      written.push({ entry: [i, p.to, p.v, kind], from: p.owner, proof: [...p.sigs].map(([n, [pk, sig, m]]) => [n, pk, sig, m]) });
    }
    return written;
  }
}
