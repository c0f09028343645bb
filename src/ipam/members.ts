/**
 * The member list of one IPAM node (docs/ipam.md section 5, "Membership"): who counts in every majority.
 * A node is added in the round that grants it its first block (the grant needs promises from a majority
 * of the members before it, and every acceptor counts the newcomer from the moment it promised:
 * consensus.ts), and stays a member whatever happens to its blocks — reclaim never removes anyone. It is
 * removed only by a removal record: its own graceful `leave()`, a node that saw it gone (a Kubernetes
 * Node deletion, or an operator's release) — and a signed cluster accepts a "gone" removal only where the
 * receiver knows the node gone too (certs.ts checkRemoval) — or the operator's signed removal ("op",
 * `weftnet ipam release NODE`), which stands on the operator's signature alone (also for a node that owns
 * no block).
 *
 * The replicated state is two grow-only sets, added and removed, and the list is a function of them and
 * the block table: every owner (an owner is always a member), plus every added node not removed. Merging
 * is set union, so it is a join (commutative, associative, idempotent) and every node that has seen the
 * same records has the same list. The proof of an addition (the grant, with its majority's promises) is
 * kept so that a node that never saw the grant — the block was reclaimed before the grant reached it —
 * can check the addition itself; which proof a node keeps does not change the list.
 */
import { certFromJson, certJson, certOf, certWire } from "./certs.js";
import { fnv1a32, type BlockTable } from "./table.js";
import type { AddProofWire, CertWire, MemberRecordWire, RemovalReason, RemovalWire } from "./wire.js";

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");
const unhex = (s: unknown) => new Uint8Array(Buffer.from(String(s), "hex"));

/** A member record as persisted in the snapshot (JSON: keys and signatures in hex). */
export type MemberRecordJson = [string, "m" | "x", unknown];

export class Members {
  /** nodes added: node -> the grant that added it, when known (null: the founder, an owner we saw, or unsigned) */
  private readonly added = new Map<string, AddProofWire | null>();
  /** nodes removed: node -> the signed removal (null in unsigned clusters) */
  private readonly removed = new Map<string, RemovalWire | null>();
  private cachedDigest: number | null = null;

  /** The members: every owner in the table, and every added node not removed. */
  list(table: BlockTable): Set<string> {
    const m = table.owners();
    for (const n of this.added.keys()) if (!this.removed.has(n)) m.add(n);
    return m;
  }

  isRemoved(node: string): boolean {
    return this.removed.has(node);
  }

  /** Nodes removed from the list (left, or seen gone). */
  removedNodes(): string[] {
    return [...this.removed.keys()].sort();
  }

  /** Added nodes that own nothing in `table` (members by their record alone). */
  withoutBlocks(table: BlockTable): string[] {
    const owners = table.owners();
    return [...this.added.keys()].filter((n) => !owners.has(n) && !this.removed.has(n)).sort();
  }

  /**
   * Record an addition (a checked one: the caller verified it). Returns true if the list's records
   * changed — a new node, or the first proof of a node we only knew as an owner (worth passing on).
   */
  add(node: string, proof: AddProofWire | null): boolean {
    if (this.added.has(node)) {
      if (proof === null || this.added.get(node) !== null) return false;
      this.added.set(node, proof);
      return true;
    }
    this.added.set(node, proof);
    this.cachedDigest = null;
    return true;
  }

  hasAdded(node: string): boolean {
    return this.added.has(node);
  }

  hasProof(node: string): boolean {
    return this.added.get(node) !== null && this.added.get(node) !== undefined;
  }

  /** Record a removal (a checked one). Returns true if it is new. */
  remove(node: string, proof: RemovalWire | null): boolean {
    if (this.removed.has(node)) return false;
    this.removed.set(node, proof);
    this.cachedDigest = null;
    return true;
  }

  /** Every record, for a full sync. */
  records(): MemberRecordWire[] {
    const out: MemberRecordWire[] = [];
    for (const [n, p] of [...this.added].sort(([a], [b]) => (a < b ? -1 : 1))) out.push([n, "m", p]);
    for (const [n, p] of [...this.removed].sort(([a], [b]) => (a < b ? -1 : 1))) out.push([n, "x", p]);
    return out;
  }

  record(node: string, kind: "m" | "x"): MemberRecordWire | null {
    if (kind === "m") return this.added.has(node) ? [node, "m", this.added.get(node)!] : null;
    return this.removed.has(node) ? [node, "x", this.removed.get(node)!] : null;
  }

  /** Order-independent digest of the records (which nodes are added and removed; not the proofs). */
  digest(): number {
    if (this.cachedDigest !== null) return this.cachedDigest;
    this.cachedDigest = fnv1a32([...[...this.added.keys()].sort().map((n) => `m:${n};`), ...[...this.removed.keys()].sort().map((n) => `x:${n};`)]);
    return this.cachedDigest;
  }

  snapshot(): MemberRecordJson[] {
    return this.records().map(([n, k, p]): MemberRecordJson => {
      if (p === null) return [n, k, null];
      if (k === "m") {
        const [i, v, ...cw] = p as AddProofWire;
        return [n, k, [i, v, certJson(certOf(cw as unknown as CertWire))]];
      }
      const [reason, by, pk, sig] = p as RemovalWire;
      return [n, k, [reason, by, hex(pk), hex(sig)]];
    });
  }

  restore(recs: readonly MemberRecordJson[]): void {
    for (const [n, k, p] of recs) {
      if (typeof n !== "string") continue;
      if (k === "m") {
        const q = p as [number, number, unknown] | null;
        this.add(n, q ? [q[0], q[1], ...certWire(certFromJson(q[2]))] : null);
      } else if (k === "x") {
        const q = p as [string, string, string, string] | null;
        this.remove(n, q ? [q[0] as RemovalReason, q[1], unhex(q[2]), unhex(q[3])] : null);
      }
    }
  }
}
