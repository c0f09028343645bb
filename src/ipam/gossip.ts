/**
 * Gossip of one IPAM node: hellos (heartbeats, digests), state messages (full syncs and deltas, with
 * their certs when signed), and merging remote state into our table — every entry checked first in a
 * signed cluster (certs.ts), refused force releases held back until their node is known gone. node.ts
 * dispatches to it; what the merge changes (lost blocks, disputed pins) goes back through GossipContext.
 */
import type { NodeParts } from "./context.js";
import type { WeftError } from "../errors.js";
import type { IpamOutput } from "./output.js";
import type { SignedState } from "./certs.js";
import type { Members } from "./members.js";
import type { IpamCounters, PeerInfo } from "./status.js";
import { compareEntries, type EntryTuple, IpamError } from "./table.js";
import { type CertWire, type EpochInfo, type HandoverWire, type IpamMessage, MEMBERS_CHUNK, type MemberRecordWire, STATE_CHUNK, encodeIpamMessage } from "./wire.js";

/** refused force releases kept until this node sees the released node gone itself (see refusedForces) */
const MAX_REFUSED_FORCES = 4096;
/** entries per state message when signed (each carries its cert, claims and grants a majority's promises) */
const SIGNED_CHUNK = 128;

/** a heartbeat (its origin's clock, ms) more than this far ahead of ours is refused (counted as a jump) */
export const MAX_BEAT_AHEAD_MS = 24 * 3600_000;

/** What gossip needs of its node (live views: the epoch and table are read at each use). */
export interface GossipContext extends NodeParts {
  readonly counters: IpamCounters;
  wholeFreeBlocks(now: number): number[];
  /** a peer's epoch matches ours again: forget the conflict reported for it */
  clearConflict(peer: string): void;
  /** count and report refused remote data */
  refuse(from: string, err: WeftError, out: IpamOutput): void;
  /** a disputed pin at one version (node.ts settleClash) */
  settleClash(i: number, now: number, out: IpamOutput): void;
  /** entries that changed our table: blocks no longer ours lose their allocations */
  dropLost(delta: EntryTuple[], out: IpamOutput): void;
  /** the member list (members.ts) */
  readonly members: Members;
  /** digest of the replicated state (table and member list) */
  digest(): number;
  /** `node` became known gone here: take it off the member list (node.ts removeGone) */
  markGone(node: string, out: IpamOutput): void;
}

/** A hello from a member (its epoch is set). */
export type HelloFrom = Extract<IpamMessage, { t: "hello" }> & { epoch: EpochInfo };

/** bytes of member records per `members` message (an addition carries its grant's promises, ~130 bytes each) */
const MEMBERS_BYTES = 128 * 1024;

/** Member records in messages of at most MEMBERS_CHUNK records and about MEMBERS_BYTES bytes. */
function* memberChunks(records: MemberRecordWire[]): Generator<MemberRecordWire[]> {
  let cur: MemberRecordWire[] = [];
  let size = 0;
  for (const r of records) {
    const promises = r[1] === "m" && r[2] ? ((r[2][6] as unknown[] | null | undefined)?.length ?? 0) : 0;
    const bytes = 160 + 130 * promises;
    if (cur.length > 0 && (cur.length >= MEMBERS_CHUNK || size + bytes > MEMBERS_BYTES)) {
      yield cur;
      cur = [];
      size = 0;
    }
    cur.push(r);
    size += bytes;
  }
  if (cur.length > 0) yield cur;
}

export class Gossip {
  /** nodes known gone here: a Kubernetes Node deletion we saw, or an operator's release we accepted or issued */
  readonly gone = new Set<string>();
  /**
   * Force releases refused only for want of authority (validly signed by their writer), kept by released
   * node, bounded: when this node sees that node gone itself (forceRelease with observedGone: every agent
   * sees a Kubernetes Node deletion, at slightly different times) they are merged then, so agents that
   * released the same node agree at once instead of at the next full sync.
   */
  private readonly refusedForces = new Map<string, { from: string; entry: EntryTuple; cert: CertWire }[]>();
  private refusedCount = 0;
  /** nodes an operator-signed release declared gone while a batch was checked (their held releases are merged after it) */
  readonly newlyGone = new Set<string>();

  constructor(private readonly c: GossipContext) {}

  /**
   * Check a heartbeat before merging or relaying it: signed by its origin (with keys), and not further
   * ahead of our clock than MAX_BEAT_AHEAD_MS (a beat is its origin's clock in ms).
   */
  beatOk(n: string, b: number, pk: Uint8Array | undefined, sig: Uint8Array | undefined, now: number): boolean {
    if (b > now + MAX_BEAT_AHEAD_MS) {
      this.c.counters.jumps++;
      return false;
    }
    if (!this.c.signed) return true;
    if (this.c.lease.beatOf(n) >= b) return true; // nothing new: not merged anyway
    if (!this.c.signed.verifyBeat(n, b, pk, sig)) {
      this.c.counters.forged++;
      return false;
    }
    return true;
  }

  sendHello(to: string, now: number, out: IpamOutput): void {
    out.send.push({
      to,
      body: encodeIpamMessage({
        t: "hello",
        epoch: this.c.epoch(),
        beat: this.c.lease.beat,
        ...(this.c.signed ? this.c.signed.beatSig(this.c.lease.beat) : {}),
        beats: this.c.lease.known(),
        free: this.c.table() ? this.c.wholeFreeBlocks(now).length : 0,
        digest: this.c.table() ? this.c.digest() : 0,
        promised: this.c.rule.outstanding(this.c.table()),
      }),
    });
  }

  /** A state message for these entries, with their certs and handovers when signed. */
  stateMsg(entries: EntryTuple[]): unknown {
    if (!this.c.signed) return encodeIpamMessage({ t: "state", epoch: this.c.epoch()!.id, entries });
    return encodeIpamMessage({ t: "state", epoch: this.c.epoch()!.id, entries, ...this.c.signed.wire(entries) });
  }

  private get chunk(): number {
    return this.c.signed ? SIGNED_CHUNK : STATE_CHUNK;
  }

  sendFull(to: string, now: number, out: IpamOutput): void {
    if (!this.c.table() || !this.c.epoch()) return;
    const all = this.c.table()!.nonBaseline();
    for (let k = 0; k === 0 || k < all.length; k += this.chunk) {
      out.send.push({ to, body: this.stateMsg(all.slice(k, k + this.chunk)) });
    }
    for (const records of memberChunks(this.c.members.records())) out.send.push({ to, body: encodeIpamMessage({ t: "members", epoch: this.c.epoch()!.id, records }) });
    // rate-limit further full syncs only once the peer is known to share our epoch: a peer that had none
    // drops this one (messages may arrive before its first hello), and must get another after it adopts ours
    const inf = this.c.info.get(to);
    if (inf?.epochOk) inf.lastSync = now;
  }

  broadcast(delta: EntryTuple[], except: string | null, out: IpamOutput): void {
    if (!this.c.epoch() || delta.length === 0) return;
    for (const p of this.c.peers) {
      if (p === except || !this.c.info.get(p)?.epochOk) continue;
      for (let k = 0; k < delta.length; k += this.chunk) {
        out.send.push({ to: p, body: this.stateMsg(delta.slice(k, k + this.chunk)) });
      }
    }
  }

  /** Flood member records (a removal we wrote, or records that changed our list) to every epoch peer but `except`. */
  broadcastMembers(records: MemberRecordWire[], except: string | null, out: IpamOutput): void {
    if (!this.c.epoch() || records.length === 0) return;
    for (const p of this.c.peers) {
      if (p === except || !this.c.info.get(p)?.epochOk) continue;
      for (const chunk of memberChunks(records)) out.send.push({ to: p, body: encodeIpamMessage({ t: "members", epoch: this.c.epoch()!.id, records: chunk }) });
    }
  }

  /**
   * Member records from a peer: in a signed cluster each is checked first (certs.ts checkAdd /
   * checkRemoval): an addition needs the grant behind it (or the node owns a block here, or founded the
   * epoch), a removal the node's own signature ("leave"), our own knowledge that it is gone ("gone"), or
   * the operator's signature ("op", which also makes the node known gone here).
   * Refused records are not passed on; forgeries (a wrong signature, a "leave" signed by another node,
   * a grant proof that does not check out) are counted in `forged`; a "gone" refused now is written by
   * this node itself once it knows the node gone (markGone).
   */
  onMembers(from: string, records: MemberRecordWire[], now: number, out: IpamOutput): void {
    const members = this.c.members;
    const changed: MemberRecordWire[] = [];
    for (const r of records) {
      const [n, kind] = r;
      if (kind === "m") {
        const proof = r[2];
        if (members.hasAdded(n) && (members.hasProof(n) || proof === null)) continue;
        const why = this.c.signed ? this.c.signed.checkAdd(n, proof) : "proven";
        if (why === "forged") {
          if (proof !== null) this.c.counters.forged++; // (an addition without proof we cannot place is only not passed on)
          continue;
        }
        if (members.add(n, why === "proven" ? proof : null)) changed.push(why === "proven" ? r : [n, "m", null]);
      } else {
        if (members.isRemoved(n)) continue;
        const rw = r[2];
        const why = this.c.signed ? this.c.signed.checkRemoval(n, rw) : "ok";
        // a validly signed "gone" of a node we do not know gone (yet) is dropped, not counted: honest
        // removals race the releases that make a node known gone, and we write our own once we know
        if (why !== "ok") {
          if (why === "forged") this.c.counters.forged++;
          continue;
        }
        if (members.remove(n, rw)) changed.push(r);
      }
    }
    if (changed.length > 0) {
      out.persist = true;
      this.broadcastMembers(changed, from, out);
    }
    // an operator's removal that checked out declared its node gone: merge the releases of it held back
    const gone = [...this.newlyGone];
    this.newlyGone.clear();
    for (const g of gone) {
      out.persist = true;
      this.mergeHeld(g, now, out);
      this.c.markGone(g, out);
    }
  }

  /** `node` is known gone now: merge the force releases of it we refused before (refusedForces). */
  mergeHeld(node: string, now: number, out: IpamOutput): void {
    const held = this.refusedForces.get(node);
    if (!held || !this.gone.has(node)) return;
    this.refusedForces.delete(node);
    this.refusedCount -= held.length;
    for (const h of held) this.onState(h.from, [h.entry], [h.cert], undefined, now, out);
  }

  onState(from: string, entries: EntryTuple[], certs: (CertWire | null)[] | undefined, handovers: (HandoverWire | null)[] | undefined, now: number, out: IpamOutput): void {
    this.mergeState(from, entries, certs, handovers, now, out);
    if (this.newlyGone.size === 0) return;
    const gone = [...this.newlyGone];
    this.newlyGone.clear();
    for (const g of gone) {
      this.mergeHeld(g, now, out);
      this.c.markGone(g, out);
    }
  }

  private mergeState(from: string, entries: EntryTuple[], certs: (CertWire | null)[] | undefined, handovers: (HandoverWire | null)[] | undefined, now: number, out: IpamOutput): void {
    const table = this.c.table()!;
    let delta: EntryTuple[];
    const proofs = new Map<number, Exclude<ReturnType<SignedState["check"]>, string>>();
    if (this.c.signed) {
      // verify every entry that would change our table before anything is merged (or forwarded)
      const ok: EntryTuple[] = [];
      entries.forEach((e, k) => {
        const [i, owner, version, kind] = e;
        if (i >= table.count) return void ok.push(e); // merge refuses the batch
        let wins: boolean;
        try {
          wins = compareEntries({ owner, version, kind }, table.get(i), i) > 0;
        } catch {
          return void ok.push(e); // a conflict: merge refuses the batch
        }
        if (!wins) return;
        const cw = certs?.[k];
        const why = this.c.signed!.check(e, cw, handovers?.[k]);
        if (why === "jump") this.c.counters.jumps++;
        else if (why === "forged" || why === "release") {
          this.c.counters.forged++;
          if (why === "release") {
            // validly signed by its writer, only not authorised (yet): kept until we see the node gone ourselves
            this.c.counters.releasesRefused++;
            const released = cw![0]; // the cert's `from`: the node whose block was forced
            if (this.refusedCount < MAX_REFUSED_FORCES) {
              const list = this.refusedForces.get(released) ?? [];
              list.push({ from, entry: e, cert: cw! });
              this.refusedForces.set(released, list);
              this.refusedCount++;
            }
          }
        } else {
          ok.push(e);
          proofs.set(i, why);
        }
      });
      if (ok.length < entries.length && ok.length === 0) return;
      entries = ok;
    }
    const clashes: number[] = [];
    try {
      delta = table.merge(entries);
    } catch (e) {
      if (!(e instanceof IpamError && e.code === "ERR_CONFLICT")) throw e;
      // Refuse only the entries that conflict and merge the rest, so one disputed block cannot stop
      // every other block from converging.
      this.c.refuse(from, e, out);
      delta = [];
      for (const x of entries) {
        try {
          delta.push(...table.merge([x]));
        } catch (e2) {
          if (!(e2 instanceof IpamError && e2.code === "ERR_CONFLICT")) throw e2;
          clashes.push(x[0]);
        }
      }
    }
    for (const i of clashes) this.c.settleClash(i, now, out);
    if (delta.length === 0) return;
    for (const [i, owner, version, kind] of delta) {
      const p = proofs.get(i);
      if (p) this.c.signed?.keepCert([i, owner, version, kind], p.cert, p.handover);
    }
    out.persist = true;
    this.c.dropLost(delta, out);
    this.broadcast(delta, from, out);
  }

  /** A member's hello (its epoch known to match ours or not): heartbeats, free blocks, digest; a full sync when the tables differ. */
  onHello(from: string, m: HelloFrom, inf: PeerInfo, now: number, out: IpamOutput): void {
    if (m.epoch.id === this.c.epoch()!.id && this.beatOk(from, m.beat, m.pk, m.sig, now)) {
      this.c.lease.mergeBeat(from, m.beat, now, m.pk, m.sig);
      this.c.rule.proposerBeat(from, m.beat);
    }
    if (m.epoch.id !== this.c.epoch()!.id) {
      inf.epochOk = false;
      this.c.refuse(from, new IpamError("ERR_EPOCH_MISMATCH", `peer ${from} belongs to a separately bootstrapped IPAM ${m.epoch.id} (${m.epoch.range}); ours is ${this.c.epoch()!.id}; refusing to merge`), out);
      return;
    }
    if (!inf.epochOk) {
      inf.epochOk = true;
      this.c.clearConflict(from);
    }
    inf.free = m.free;
    inf.digest = m.digest;
    for (const [n, b, pk, sig] of m.beats) if (n !== from && this.beatOk(n, b, pk, sig, now)) this.c.lease.mergeBeat(n, b, now, pk, sig);
    if (m.digest !== this.c.digest() && (inf.lastSync === null || now - inf.lastSync >= this.c.cfg.syncInterval)) this.sendFull(from, now, out);
  }
}
