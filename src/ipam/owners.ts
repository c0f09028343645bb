/**
 * The cheap read-only view of who owns which block (IpamNode.owners()): the range and (cidr, owner) of
 * every block, nothing else. Route policy reads it on every routing recompute and every source-table
 * refresh; before, those built the full status (status.ts buildStatus: formatted CIDRs, allocations,
 * members, lease, ...) each time, 8 times a second on an idle agent (issue 11).
 *
 * Kept per node by OwnersCache: looked at again only when the block table's revision (table.ts: bumped by
 * every write and every merge that changed something) or the table object itself changed, and then a new
 * view object only when an owner actually changed (a pin or a version bump keeps the old view). So
 *   view === previous view   <=>   same owners,   and   `revision` grows with every new view.
 * The CIDR strings are formatted once per node (the range and block size never change in a node).
 */
import { blockAt, formatCidr, type Cidr } from "./cidr.js";
import type { BlockTable } from "./table.js";

export interface IpamOwners {
  /** grows by one with every new view (a changed owner, a new table); equal revisions: equal views */
  readonly revision: number;
  /** the cluster range, as in IpamStatus.range */
  readonly range: string;
  /** every block of the range in index order, as IpamStatus.blocks (cidr, owner) */
  readonly blocks: readonly { readonly cidr: string; readonly owner: string }[];
}

export class OwnersCache {
  private view: IpamOwners | undefined;
  private table: BlockTable | null = null;
  private tableRev = -1;
  private revision = 0;
  private cidrs: string[] | undefined;
  private readonly rangeStr: string;
  /** views built (tests: an unchanged table builds none) */
  builds = 0;

  constructor(
    private readonly range: Cidr,
    private readonly blockPrefix: number,
  ) {
    this.rangeStr = formatCidr(range);
  }

  /** The view of `table` (undefined: no table, not part of a cluster IPAM yet). */
  get(table: BlockTable | null): IpamOwners | undefined {
    if (!table) return undefined;
    if (table === this.table && table.revision === this.tableRev) return this.view;
    const entries = table.all();
    const prev = this.view;
    this.table = table;
    this.tableRev = table.revision;
    if (prev && prev.blocks.length === entries.length && entries.every((e, i) => e.owner === prev.blocks[i]!.owner)) return prev;
    const cidrs = this.cidrStrings(entries.length);
    this.builds++;
    this.view = { revision: ++this.revision, range: this.rangeStr, blocks: entries.map((e, i) => ({ cidr: cidrs[i]!, owner: e.owner })) };
    return this.view;
  }

  private cidrStrings(n: number): string[] {
    if (!this.cidrs || this.cidrs.length !== n) {
      this.cidrs = [];
      for (let i = 0; i < n; i++) this.cidrs.push(formatCidr(blockAt(this.range, this.blockPrefix, i)));
    }
    return this.cidrs;
  }
}
