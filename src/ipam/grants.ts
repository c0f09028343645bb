/**
 * Block requests, grants and reclaim of one IPAM node (docs/ipam.md rules 2, 2b): asking a peer for a
 * block (`req` / `nak`), answering requests with a grant proposal (one round at a time, further
 * requesters queued), the heir's reclaim of a silent member's free blocks, the acceptor's side of a
 * proposal (`prop` -> `prom`), and completing proposals once a strict majority promised them. The write
 * rule itself (who may promise what) is consensus.ts; this module runs the rounds. node.ts dispatches to
 * it; it reads the node's parts through GrantsContext (live views: the epoch and table are read at each
 * use).
 */
import type { NodeParts } from "./context.js";
import type { IpamOutput } from "./output.js";
import type { IpamCounters, PeerInfo } from "./status.js";
import type { EntryTuple } from "./table.js";
import { type IpamMessage, STATE_CHUNK, encodeIpamMessage } from "./wire.js";

/** What grants and reclaim need of their node. */
export interface GrantsContext extends NodeParts {
  readonly id: string;
  readonly counters: IpamCounters;
  readonly settleUntil: Map<number, number>;
  leaseValid(now: number): boolean;
  wholeFreeBlocks(now: number): number[];
  broadcast(delta: EntryTuple[], except: string | null, out: IpamOutput): void;
  /** owners in entries we wrote are members (a grant adds its new owner to the member list) */
  noteOwners(delta: EntryTuple[]): void;
}

export class Grants {
  /** our outstanding block request: to whom, since when */
  pending: { to: string; since: number } | null = null;
  /** requesters waiting for the current grant round to end */
  private grantQueue: string[] = [];

  constructor(private readonly c: GrantsContext) {}

  /** Ask the epoch peer offering most whole free blocks for one (one request outstanding). */
  request(now: number, out: IpamOutput): void {
    const epoch = this.c.epoch();
    if (!epoch || this.pending) return;
    const target = [...this.c.peers]
      .filter((p) => {
        const inf = this.c.info.get(p);
        return inf !== undefined && inf.epochOk && inf.free >= 2;
      })
      .sort((a, b) => this.c.info.get(b)!.free - this.c.info.get(a)!.free || (a < b ? -1 : 1))[0];
    if (!target) return;
    this.pending = { to: target, since: now };
    out.send.push({ to: target, body: encodeIpamMessage({ t: "req", epoch: epoch.id }) });
  }

  /** A request that got no answer within reqTimeout is forgotten (we may ask someone else). */
  expire(now: number): void {
    if (this.pending && now - this.pending.since >= this.c.cfg.reqTimeout) this.pending = null;
  }

  /** A peer's link went down: a request to it will not be answered. */
  peerDown(peer: string): void {
    if (this.pending?.to === peer) this.pending = null;
  }

  /** Start a proposal round for `blocks` (self-promise, then `prop` to every epoch peer). */
  private propose(kind: "t" | "c", owner: string, to: string, blocks: number[], now: number, out: IpamOutput): void {
    const table = this.c.table()!;
    const until = this.c.lease.beat + this.c.cfg.reqTimeout;
    const { sent, promised } = this.c.rule.open(table, kind, owner, to, blocks, until, now);
    if (promised) out.persist = true;
    if (this.c.signed) {
      const m = this.c.rule.memberSet(table).size;
      for (const [i, v] of sent) this.c.rule.selfSign(i, this.c.signed.keys.publicKey, this.c.signed.signPromise(i, v, kind, owner, to, m), m);
    }
    if (sent.length === 0) return;
    for (const p of this.c.peers) {
      if (!this.c.info.get(p)?.epochOk) continue;
      for (let k = 0; k < sent.length; k += STATE_CHUNK) {
        out.send.push({ to: p, body: encodeIpamMessage({ t: "prop", epoch: this.c.epoch()!.id, kind, owner, to, until, blocks: sent.slice(k, k + STATE_CHUNK) }) });
      }
    }
    this.complete(now, out);
  }

  /**
   * Reclaim: for members silent for R, the deterministic heir (lowest id among us and the epoch peers
   * heard within W) proposes a claim of each of their blocks at version+1. The claim is written once a
   * strict majority of the members promised it (complete).
   */
  reclaim(now: number, out: IpamOutput): void {
    const table = this.c.table()!;
    const members = table.owners();
    for (const m of members) this.c.lease.silentFor(m, now);
    const silent = [...members].filter((m) => m !== this.c.id && this.c.lease.silentFor(m, now) >= this.c.cfg.R);
    if (silent.length === 0 || !this.c.leaseValid(now)) return;
    for (const dead of silent) {
      const candidates = [this.c.id, ...[...this.c.peers].filter((p) => p !== dead && this.c.info.get(p)?.epochOk && this.c.lease.heardWithin(p, now))];
      if (candidates.sort()[0] !== this.c.id) continue;
      // only free space: pinned blocks (the ones holding the silent node's pods) stay reserved for it
      const free = table.indicesOf(dead).filter((i) => table.get(i).kind !== "p");
      if (free.length > 0) this.propose("c", dead, this.c.id, free, now, out);
    }
  }

  /** Write every proposal a strict majority promised (and, for claims and grants, while we hold the lease). */
  complete(now: number, out: IpamOutput): void {
    const written = this.c.rule.complete(this.c.table()!, () => this.c.leaseValid(now));
    const delta = written.map((w) => w.entry);
    for (const w of written) this.c.signed?.signOwn(w.entry, w.from, w.proof);
    this.c.noteOwners(delta); // a grant to a newcomer adds it to the member list, in this same round
    for (const [i, , , kind] of delta) {
      if (kind === "c") {
        this.c.settleUntil.set(i, now + this.c.cfg.S);
        this.c.counters.claims++;
      } else {
        this.c.settleUntil.delete(i);
        this.c.counters.grants++;
      }
    }
    if (delta.length > 0) {
      out.persist = true;
      this.c.broadcast(delta, null, out);
    }
  }

  /** A peer asks for a block (`req`): propose a grant of a whole free block, queue it, or say no. */
  onRequest(from: string, now: number, out: IpamOutput): void {
    const free = this.c.leaseValid(now) ? this.c.wholeFreeBlocks(now) : [];
    if (free.length < 2 || !this.c.info.get(from)?.epochOk) {
      out.send.push({ to: from, body: encodeIpamMessage({ t: "nak", epoch: this.c.epoch()!.id }) });
      return;
    }
    if (this.c.rule.grantingTo(from)) return; // already proposing a block for this requester
    if (this.c.rule.hasGrantRound()) {
      if (!this.grantQueue.includes(from)) this.grantQueue.push(from); // one grant round at a time
      return;
    }
    this.propose("t", this.c.id, from, [free[0]!], now, out);
  }

  /** Start the next queued grant once the previous round is over. */
  nextGrant(now: number, out: IpamOutput): void {
    if (this.c.rule.hasGrantRound()) return;
    while (this.grantQueue.length > 0) {
      const to = this.grantQueue.shift()!;
      if (!this.c.peers.has(to) || !this.c.info.get(to)?.epochOk) continue;
      const free = this.c.leaseValid(now) ? this.c.wholeFreeBlocks(now) : [];
      if (free.length < 2) {
        out.send.push({ to, body: encodeIpamMessage({ t: "nak", epoch: this.c.epoch()!.id }) });
        continue;
      }
      this.propose("t", this.c.id, to, [free[0]!], now, out);
      return;
    }
  }

  /** A claim or grant proposed to us as an acceptor: promise what the write rule allows, and say which. */
  onProposal(from: string, m: Extract<IpamMessage, { t: "prop" }> & { kind: "t" | "c" }, now: number, out: IpamOutput): void {
    const kind = m.kind;
    const ok = m.blocks.filter(([i, v]) => this.c.rule.accept(this.c.table()!, i, v, from, kind, m.owner, m.to, m.until, now));
    if (ok.length > 0) {
      out.persist = true;
      out.send.push({ to: from, body: encodeIpamMessage({ t: "prom", epoch: this.c.epoch()!.id, blocks: ok, ...this.promiseSigs(ok, kind, m.owner, m.to) }) });
    }
  }

  /** Promises (or pin recordings) for a proposal of ours: checked when signed, then write what has a majority. */
  onPromise(from: string, m: Extract<IpamMessage, { t: "prom" }>, now: number, out: IpamOutput): void {
    const signed = this.c.signed;
    if (signed && (!m.sigs || !m.pk)) {
      this.c.counters.forged++;
      return;
    }
    this.c.rule.promised(
      from,
      m.blocks,
      signed && m.sigs && m.pk
        ? {
            pk: m.pk,
            sigs: m.sigs,
            m: m.m ?? 0,
            check: (i, p, sig) => {
              const ok = signed.verifyPromise(from, m.pk!, sig, i, p.v, p.kind, p.owner, p.to, m.m ?? 0);
              if (!ok) this.c.counters.forged++;
              return ok;
            },
          }
        : undefined,
    );
    this.complete(now, out);
    this.nextGrant(now, out);
  }

  /** A peer has no block to give us. */
  onNak(from: string, inf: PeerInfo): void {
    if (this.pending?.to === from) this.pending = null;
    inf.free = 0;
  }

  /** Our signatures of the promises we give (signed clusters). */
  promiseSigs(blocks: [number, number][], kind: string, from: string, to: string): { sigs?: Uint8Array[]; pk?: Uint8Array; m?: number } {
    return this.c.signed ? this.c.signed.promiseSigs(blocks, kind, from, to) : {};
  }
}
