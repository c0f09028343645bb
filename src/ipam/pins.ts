/**
 * Pins of one IPAM node (docs/ipam.md rule 7): keeping a reserve of confirmed pinned blocks so allocation
 * never waits, unpinning an empty block the reserve does not need, recording other members' pins as an
 * acceptor, and settling a disputed pin. node.ts dispatches to it; it reads the node's parts through
 * PinsContext (live views: the epoch and table are read at each use).
 */
import type { NodeParts } from "./context.js";
import type { Allocations } from "./allocations.js";
import type { IpamOutput } from "./output.js";
import type { EntryTuple } from "./table.js";
import { encodeIpamMessage } from "./wire.js";

const NEG = Number.NEGATIVE_INFINITY;

/** What pins need of their node. */
export interface PinsContext extends NodeParts {
  readonly id: string;
  readonly allocs: Allocations;
  readonly settleUntil: ReadonlyMap<number, number>;
  freeAddresses(now: number): number;
  allocatableBlocks(now: number): number[];
  completeProposals(now: number, out: IpamOutput): void;
  dropLost(delta: EntryTuple[], out: IpamOutput): void;
  broadcast(delta: EntryTuple[], except: string | null, out: IpamOutput): void;
  promiseSigs(blocks: [number, number][], kind: string, from: string, to: string): { sigs?: Uint8Array[]; pk?: Uint8Array; m?: number };
}

export class Pins {
  constructor(private readonly c: PinsContext) {}

  /** Blocks we own and could pin now (unpinned or pin unconfirmed, not settling, not doomed, no round open); ones holding pods first. */
  pinnable(now: number): number[] {
    const table = this.c.table();
    if (!table) return [];
    return table
      .indicesOf(this.c.id)
      .filter((i) => !this.c.rule.isConfirmed(table, i) && !((this.c.settleUntil.get(i) ?? NEG) > now) && !this.c.rule.isDoomed(i))
      .sort((a, b) => this.c.allocs.usedIn(b) - this.c.allocs.usedIn(a) || a - b);
  }

  get reserve(): number {
    return Math.max(1, Math.floor(this.c.allocs.usableSize() / 4));
  }

  /**
   * Keep allocation instant: pin a block whenever free space in confirmed pins falls below a quarter
   * block (or a block holding pods is not pinned, e.g. after an upgrade). One pin round at a time.
   * Returns true if a round is open (new or already running).
   */
  keepReserve(now: number, out: IpamOutput): boolean {
    const table = this.c.table();
    if (!table || !this.c.epoch()) return false;
    if (this.c.rule.pinRound()) return true;
    const cands = this.pinnable(now);
    const i = cands[0];
    if (i === undefined) return false;
    if (this.c.allocs.usedIn(i) === 0 && this.c.freeAddresses(now) >= this.reserve) return false;
    const until = this.c.lease.beat + this.c.cfg.reqTimeout;
    const pv = this.c.rule.openPin(table, i, until);
    if (!pv) return false;
    out.persist = true;
    this.c.signed?.signOwn([i, this.c.id, pv[1], "p"], this.c.id);
    this.c.broadcast([[i, this.c.id, pv[1], "p"]], null, out);
    for (const p of this.c.peers) {
      if (!this.c.info.get(p)?.epochOk) continue;
      out.send.push({ to: p, body: encodeIpamMessage({ t: "prop", epoch: this.c.epoch()!.id, kind: "p", owner: this.c.id, to: this.c.id, until, blocks: [pv] }) });
    }
    this.c.completeProposals(now, out);
    return true;
  }

  /** Unpin one empty pinned block when the other pins keep the reserve (so a silent node's free space can be reclaimed). */
  maybeUnpin(now: number, out: IpamOutput): void {
    const table = this.c.table()!;
    const free = this.c.freeAddresses(now);
    for (const i of this.c.allocatableBlocks(now)) {
      if (this.c.allocs.usedIn(i) !== 0 || free - this.c.allocs.usableSize() < this.reserve) continue;
      const e = table.get(i);
      table.write(i, { owner: this.c.id, version: e.version + 1, kind: "t" });
      this.c.signed?.signOwn([i, this.c.id, e.version + 1, "t"], this.c.id);
      this.c.rule.confirmed.delete(i);
      out.persist = true;
      this.c.broadcast([[i, this.c.id, e.version + 1, "t"]], null, out);
      return;
    }
  }

  /**
   * Two pins at one version naming different owners (docs/ipam.md "Disputed pins"): a claim and a grant
   * of one block version can both be written when the grant's promises were voided by the granter's
   * silence before the grant reached them; each new owner then pins version+1 in its own part of a
   * partition. At most one of the two pins is confirmed (the two recording majorities intersect, and a
   * node that recorded one refuses the other). The owner of the confirmed pin settles the dispute: it
   * pins again one version higher, which wins everywhere by version and keeps its confirmation (only an
   * owner writes on top of a pin). The owner of the unconfirmed pin never allocated from it and takes
   * the higher pin when it arrives.
   */
  settleClash(i: number, now: number, out: IpamOutput): void {
    const table = this.c.table()!;
    if (!this.c.rule.isConfirmed(table, i)) return;
    const e = table.get(i);
    table.write(i, { owner: this.c.id, version: e.version + 1, kind: "p" });
    this.c.rule.confirmed.set(i, e.version + 1);
    this.c.signed?.signOwn([i, this.c.id, e.version + 1, "p"], this.c.id);
    out.persist = true;
    this.c.broadcast([[i, this.c.id, e.version + 1, "p"]], null, out);
  }

  /** A member asks us to record its pin of its own blocks ([block, version]): record what we may, and say which. */
  onPinProposal(from: string, blocks: [number, number][], now: number, out: IpamOutput): void {
    const ok: [number, number][] = [];
    const changed: EntryTuple[] = [];
    for (const [i, v] of blocks) {
      const d = this.c.rule.acceptPin(this.c.table()!, i, v, from, now);
      if (d === null) continue;
      ok.push([i, v]);
      changed.push(...d);
    }
    if (changed.length > 0) {
      out.persist = true;
      this.c.dropLost(changed, out);
      this.c.broadcast(changed, from, out);
    }
    if (ok.length > 0) out.send.push({ to: from, body: encodeIpamMessage({ t: "prom", epoch: this.c.epoch()!.id, blocks: ok, ...this.c.promiseSigs(ok, "p", from, from) }) });
  }
}
