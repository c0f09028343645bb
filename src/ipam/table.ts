/**
 * Block-ownership CRDT: one entry per CIDR-aligned block of the cluster range.
 *
 *   entry = { owner: nodeId, version: uint, kind: "t" | "p" | "c" | "f" | "o" }
 *     "t" transfer: written by the owner at `version-1` (founding is version 0, owner = founder); an
 *                   owner also writes "t" to itself to unpin an empty block
 *     "p" pin:      written by the owner on its own block, recorded by a majority before the owner
 *                   hands out addresses from it; a pinned block is never claimed (node.ts)
 *     "c" claim:    written by an heir that reclaims a silent owner's block (see node.ts)
 *     "f" force:    written by a node that saw the owner gone itself (its Kubernetes Node deleted)
 *     "o" operator force: written by the node an operator's signed `weftnet ipam release NODE` was run on
 *                   (the operator's signature names that node as the new owner, certs.ts)
 *
 * Merge is a per-block join over a total order, so it is commutative, associative and idempotent:
 *   higher version wins; at equal version o > f > c > p > t; two claims/forces at equal version: lower owner id
 *   wins (concurrent heirs converge to one winner); two *transfers* (or two pins) at the same version naming
 *   different owners are rejected (IpamError ERR_CONFLICT) — the whole remote batch is refused (node.ts then
 *   merges it entry by entry, refusing only the conflicting entries; docs/ipam.md "Merge" on disputed pins).
 */
import { WeftError } from "../errors.js";

export type IpamErrorCode =
  | "ERR_CONFLICT" // remote data breaks a CRDT invariant
  | "ERR_EPOCH_MISMATCH" // peer belongs to a separately bootstrapped IPAM
  | "ERR_RANGE_MISMATCH" // peer's cluster range / block size differs from our configuration
  | "ERR_INVARIANT" // our own state is broken: a bug, thrown loudly
  | "ERR_NOT_READY" // no cluster yet, or allocation frozen (see partition rule)
  | "ERR_EXHAUSTED" // no free address in owned blocks (a block request was sent)
  | "ERR_CONFIG" // bad configuration / snapshot
  | "ERR_FORBIDDEN"; // an operation this node may not perform without an authorisation it lacks (force release)

export class IpamError extends WeftError {
  static override readonly name = "IpamError";
  constructor(
    override readonly code: IpamErrorCode,
    message: string,
  ) {
    super(code, message);
  }
}

export type EntryKind = "t" | "p" | "c" | "f" | "o";
export interface Entry {
  readonly owner: string;
  readonly version: number;
  readonly kind: EntryKind;
}
/** Wire / snapshot form of one changed entry: [blockIndex, owner, version, kind]. */
export type EntryTuple = [number, string, number, EntryKind];

/**
 * "o" above "f": an operator's release beats every other force of the same block version on every node
 * alike (the order depends on the entry alone, never on what a node can verify), so a force refused and
 * held back (node.ts refusedForces) and merged once the node is known gone cannot win a tie against it.
 */
const KIND_RANK: Record<EntryKind, number> = { t: 0, p: 1, c: 2, f: 3, o: 4 };

/** >0 if a wins, <0 if b wins, 0 if identical. Throws ERR_CONFLICT on two different transfers at one version. */
export function compareEntries(a: Entry, b: Entry, index: number): number {
  if (a.version !== b.version) return a.version - b.version;
  if (a.kind !== b.kind) return KIND_RANK[a.kind] - KIND_RANK[b.kind];
  if (a.owner === b.owner) return 0;
  if (a.kind === "t" || a.kind === "p") {
    throw new IpamError("ERR_CONFLICT", `block ${index}: two owner writes (${a.kind}) at version ${a.version} name different owners (${a.owner}, ${b.owner})`);
  }
  return a.owner < b.owner ? 1 : -1;
}

export function sameEntry(a: Entry, b: Entry): boolean {
  return a.version === b.version && a.kind === b.kind && a.owner === b.owner;
}

export class BlockTable {
  private readonly entries: Entry[];
  private cachedDigest: number | null = null;
  /**
   * Bumped by every change of an entry (local write, merge with a delta): readers that derive a view of
   * the table (src/ipam/owners.ts) rebuild it only when this moved. Per table object: a new table (a new
   * epoch, a clone) starts again at 0, so a reader keys on the table's identity and this together.
   */
  revision = 0;

  /** A fresh table: every block owned by the founder at version 0. */
  constructor(
    readonly count: number,
    founder: string,
  ) {
    this.entries = new Array<Entry>(count);
    const base: Entry = { owner: founder, version: 0, kind: "t" };
    for (let i = 0; i < count; i++) this.entries[i] = base;
  }

  get(i: number): Entry {
    const e = this.entries[i];
    if (e === undefined) throw new IpamError("ERR_INVARIANT", `block index ${i} out of range`);
    return e;
  }

  /** Local write (transfer / claim / force). Must strictly win over the current entry. */
  write(i: number, e: Entry): void {
    if (compareEntries(e, this.get(i), i) <= 0) throw new IpamError("ERR_INVARIANT", `local write to block ${i} does not supersede the current entry`);
    this.entries[i] = e;
    this.cachedDigest = null;
    this.revision++;
  }

  /**
   * Merge remote entries; returns only those that changed our table (the delta to forward).
   * All-or-nothing: if any entry conflicts, nothing is applied and ERR_CONFLICT is thrown.
   */
  merge(remote: readonly EntryTuple[]): EntryTuple[] {
    const winners = new Map<number, Entry>();
    for (const [i, owner, version, kind] of remote) {
      if (!Number.isInteger(i) || i < 0 || i >= this.count) throw new IpamError("ERR_CONFLICT", `block index ${i} outside the table of ${this.count}`);
      const e: Entry = { owner, version, kind };
      const cur = winners.get(i) ?? this.get(i);
      if (compareEntries(e, cur, i) > 0) winners.set(i, e);
    }
    const delta: EntryTuple[] = [];
    for (const [i, e] of [...winners].sort((a, b) => a[0] - b[0])) {
      this.entries[i] = e;
      delta.push([i, e.owner, e.version, e.kind]);
    }
    if (delta.length > 0) {
      this.cachedDigest = null;
      this.revision++;
    }
    return delta;
  }

  /** Entries that differ from the founding baseline (version > 0), for full syncs and snapshots. */
  nonBaseline(): EntryTuple[] {
    const out: EntryTuple[] = [];
    this.entries.forEach((e, i) => {
      if (e.version > 0) out.push([i, e.owner, e.version, e.kind]);
    });
    return out;
  }

  all(): readonly Entry[] {
    return this.entries;
  }

  owners(): Set<string> {
    return new Set(this.entries.map((e) => e.owner));
  }

  indicesOf(owner: string): number[] {
    const out: number[] = [];
    this.entries.forEach((e, i) => {
      if (e.owner === owner) out.push(i);
    });
    return out;
  }

  /** Order-independent 32-bit FNV-1a digest of the whole table, to detect divergence cheaply in hellos. */
  digest(): number {
    if (this.cachedDigest !== null) return this.cachedDigest;
    const parts: string[] = [];
    this.entries.forEach((e, i) => {
      if (e.version > 0) parts.push(`${i}:${e.owner}:${e.version}:${e.kind};`);
    });
    this.cachedDigest = fnv1a32(parts);
    return this.cachedDigest;
  }

  clone(): BlockTable {
    const t = new BlockTable(this.count, "0000000000000000");
    this.entries.forEach((e, i) => ((t.entries as Entry[])[i] = e));
    t.cachedDigest = null;
    return t;
  }
}

/** 32-bit FNV-1a over the strings in order (UTF-16 code units): the cheap digests hellos compare. */
export function fnv1a32(parts: Iterable<string>): number {
  let h = 0x811c9dc5;
  for (const s of parts)
    for (let k = 0; k < s.length; k++) {
      h ^= s.charCodeAt(k);
      h = Math.imul(h, 0x01000193) >>> 0;
    }
  return h >>> 0;
}
